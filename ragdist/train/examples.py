"""Training and eval examples built from retrieved passages: passages, then question, then answer.

A training batch is made in two stages, both deterministic in (seed, epoch, example index) so that
building it in a background thread (prefetch) or inline gives the same tensors:

1. selection — retrieved passages (top-k, plus lower ranks when those feed distractors) become the
   passages of the example: distractors replace or join them with probability p, the gold passage
   is injected when retrieval missed it, and the order is shuffled (training only);
2. encoding — one example with all passages (`concat`), one per passage (`sequential`, as RA-DIT
   trains), or one whose context is a generated summary of the passages (`summarize`), truncated
   to the token budget with the answer always kept. The tokens themselves (plain prompt or chat
   template) come from `ragdist.prompts`, which evaluation uses too.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragdist.errors import ConfigError, IndexError_
from ragdist.prompts import (  # noqa: F401  (the prompt functions are also reached through this module)
    IGNORE,
    _ids,
    collate_prompts,
    encode_train,
    format_passages,
    prompt_ids,
)
from ragdist.train.config import ExamplesConfig
from ragdist.utils.cache import LRU

log = logging.getLogger(__name__)



class TokenMemo:
    """Token ids of recently encoded texts, so a passage that recurs (across batches, epochs, or as
    several questions' context) costs one tokenizer call; the ids are exactly the tokenizer's.

    Bounded (least recently used entries go first); ids are stored as int32 arrays; safe to share
    between threads.
    """

    def __init__(self, tokenizer: Any, size: int = 16384):
        self.tokenizer, self.size = tokenizer, size
        self._memo = LRU(size)
        self.hits = self.misses = 0

    def __call__(self, text: str) -> list[int]:
        hit = self._memo.get(text)
        if hit is not None:
            self.hits += 1
            return hit.tolist()
        self.misses += 1
        ids = _ids(self.tokenizer, text)
        self._memo.put(text, array("i", ids))
        return ids


def collate_train(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        m = len(r["input_ids"])
        ids[i, :m] = torch.tensor(r["input_ids"])
        labels[i, :m] = torch.tensor(r["labels"])
        mask[i, :m] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PassageStore:
    """Passages by id (chunk id, or document id → its first chunk), for gold injection and random distractors.

    Loaded from a snapshot's Parquet files (checksummed like the shards load them); kept small:
    id, document id, title and text only.
    """

    def __init__(self, passages: list[dict[str, Any]]):
        if not passages:
            raise IndexError_("passage store is empty")
        self.passages = passages
        self.by_id: dict[str, dict[str, Any]] = {}
        for p in passages:
            self.by_id.setdefault(str(p["id"]), p)
            if p.get("doc_id") is not None:
                self.by_id.setdefault(str(p["doc_id"]), p)

    @classmethod
    def from_snapshot(cls, snapshot: str | Path) -> PassageStore:
        import pyarrow.parquet as pq

        from ragdist.index.snapshot import read_manifest, verify_file

        snapshot = Path(snapshot)
        manifest = read_manifest(snapshot)
        out: list[dict[str, Any]] = []
        for info in manifest["shards"]:
            table = pq.read_table(verify_file(snapshot, manifest, info["meta"]), columns=["id", "doc_id", "title", "text"])
            out += table.to_pylist()
        return cls(out)

    def get(self, pid: str) -> dict[str, Any] | None:
        return self.by_id.get(str(pid))

    def sample(self, rng: np.random.Generator, n: int, exclude: set[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        # Bounded: with a corpus barely larger than `exclude` a few tries may come back empty.
        for j in rng.integers(0, len(self.passages), size=4 * n + 8):
            p = self.passages[int(j)]
            if p["id"] not in exclude:
                out.append(p)
                exclude = exclude | {p["id"]}
                if len(out) == n:
                    break
        return out


def _is_gold(p: dict[str, Any], gold: set[str]) -> bool:
    return str(p.get("id")) in gold or str(p.get("doc_id")) in gold


def passage_log_posterior(passages: Sequence[dict[str, Any]], temperature: float) -> np.ndarray | None:
    """log p(passage | question) over passages: log-softmax of their dense `score`s / temperature; None
    when one has no score (BM25 or hybrid results, an injected gold passage, a random distractor)."""
    scores = [p.get("score") for p in passages]
    if not scores or any(s is None for s in scores):
        return None
    z = np.asarray(scores, dtype=np.float64) / temperature
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def select_passages(
    retrieved: Sequence[dict[str, Any]],
    *,
    top_k: int,
    gold_ids: Sequence[str],
    fmt: ExamplesConfig,
    rng: np.random.Generator,
    store: PassageStore | None,
    train: bool,
) -> list[dict[str, Any]]:
    """The passages one example shows: top-k, then (training only) the gold passage dropped, distractors,
    gold injection, shuffle."""
    chosen = list(retrieved[:top_k])
    if not train or top_k == 0:
        return chosen
    gold = set(gold_ids)
    dropped = bool(fmt.drop_gold_p > 0 and gold and rng.random() < fmt.drop_gold_p)
    if dropped:
        # As if retrieval had missed: the next ranks move up, and they feed the distractors below.
        retrieved = [p for p in retrieved if not _is_gold(p, gold)]
        chosen = list(retrieved[:top_k])
    if fmt.distractor_p > 0:
        flips = rng.random(len(chosen)) < fmt.distractor_p
        n = int(flips.sum())
        if n:
            if fmt.distractor_source == "lower_ranks":
                pool = list(retrieved[top_k : top_k + n])
            else:
                pool = store.sample(rng, n, {p["id"] for p in chosen}) if store else []
            slots = [i for i, f in enumerate(flips) if f][: len(pool)]
            if fmt.distractor_mode == "replace":
                for i, d in zip(slots, pool):
                    chosen[i] = d
            else:
                chosen += pool[: len(slots)]
    if dropped:
        chosen = [p for p in chosen if not _is_gold(p, gold)]  # a random distractor may be gold too
    elif fmt.inject_gold_p > 0 and gold and store is not None and not any(_is_gold(p, gold) for p in chosen):
        if rng.random() < fmt.inject_gold_p:
            found = next((store.get(g) for g in gold_ids if store.get(g) is not None), None)
            if found is not None:
                # The gold passage takes the lowest-ranked slot, as if retrieval had ranked it there.
                chosen = chosen[:-1] + [found] if len(chosen) >= top_k else chosen + [found]
    if fmt.shuffle_passages and len(chosen) > 1:
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    if fmt.aggregation == "sequential" and fmt.sequential_rows == "sample" and len(chosen) > 1:
        logp = passage_log_posterior(chosen, fmt.passage_temperature)
        probs = np.exp(logp) if logp is not None else None  # None: uniform
        chosen = [chosen[int(rng.choice(len(chosen), p=probs))]]
    return chosen


def answer_shape(answer: str) -> str:
    """The answer's form: runs of capitals, small letters and digits each as one symbol, the rest kept
    ("Port Moresby" -> "Aa Aa", "7440-47-3" -> "9-9-9", "LIEA" -> "A")."""
    out: list[str] = []
    for ch in answer:
        sym = "A" if ch.isupper() else "a" if ch.isalpha() else "9" if ch.isdigit() else ch
        if not out or out[-1] != sym or sym not in "Aa9":
            out.append(sym)
    return "".join(out)


_UPPER, _LOWER, _DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz", "0123456789"
_FORM_RUN = re.compile(r"[^\W\d_]+|\d+|.", re.S)


def word_pieces(tokenizer: Any) -> list[str]:
    """The tokenizer's vocabulary entries that are plain lower-case words or word pieces (2+ letters):
    what `AnswerSwap`'s made-up answers are spelt from, so they split into tokens as real words do."""
    vocab = tokenizer.get_vocab()
    texts = (tokenizer.convert_tokens_to_string([t]) for t in vocab)
    return sorted({t for t in texts if len(t) >= 2 and t.isalpha() and t.islower() and t.isascii()})


def made_up_answer(answer: str, pieces: Sequence[str], rng: np.random.Generator, words_only: bool = False) -> str:
    """A string of `answer`'s form that no passage holds: each word of 4+ letters (not all capitals)
    becomes random word pieces joined to at least its length less one (capitalised at its start if it
    was: "McAllen" comes out as one capitalised word); unless `words_only`,
    also each run of digits as many random digits (no leading zero), each all-capital run (a code) as
    many random capitals and shorter words random letters; the rest is kept ("Port Moresby" -> "Enagos
    Alenaacola", "KKD" -> "HVR", "1,240" -> "8,208")."""
    out = []
    for m in _FORM_RUN.finditer(answer):
        w = m.group(0)
        is_word = w.isalpha() and len(w) >= 4 and not w.isupper() and bool(pieces)
        if words_only and not is_word:
            out.append(w)
        elif w.isdigit():
            out.append("".join(_DIGITS[int(rng.integers(1 if i == 0 and len(w) > 1 else 0, 10))]
                               for i in range(len(w))))
        elif not w.isalpha():
            out.append(w)
        elif is_word:
            made = ""
            while len(made) < len(w) - 1:
                made += pieces[int(rng.integers(len(pieces)))]
            out.append(made[0].upper() + made[1:] if w[0].isupper() else made)
        else:
            out.append("".join((_UPPER if c.isupper() else _LOWER)[int(rng.integers(26))] for c in w))
    return "".join(out)


class AnswerSwap:
    """Counterfactual training examples (`trainer.examples.swap_answer_p`): an example's answer, replaced
    as a whole word in its question and shown passages by another training answer of the same shape, or
    (`swap_made_up_p` of the swaps) by a made-up string of that shape (`made_up_answer`): that other
    answer with its words made up (`made_up="words"`), or the whole answer made up (`"all"`)."""

    def __init__(self, examples: Sequence[Any], p: float, made_up_p: float = 0.0, pieces: Sequence[str] = (),
                 made_up: str = "words"):
        self.p, self.made_up_p, self.pieces, self.words_only = p, made_up_p, list(pieces), made_up == "words"
        pools: dict[str, set[str]] = {}
        for ex in examples:
            for ans in ex.answers[:1]:
                if ans.strip():
                    pools.setdefault(answer_shape(ans), set()).add(ans)
        self.pools = {shape: sorted(answers) for shape, answers in pools.items() if len(answers) > 1}

    def __call__(
        self, ex: Any, passages: list[dict[str, Any]], rng: np.random.Generator
    ) -> tuple[str, str, list[dict[str, Any]]]:
        """(question, answer, passages) of the example as shown: swapped with probability p."""
        answer = ex.answers[0]
        if not passages or rng.random() >= self.p:
            return ex.question, answer, passages
        made_up = self.made_up_p > 0 and rng.random() < self.made_up_p
        pool = self.pools.get(answer_shape(answer))
        word = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)")
        if not (pool or made_up) or not answer.strip() or not any(word.search(p["text"]) for p in passages):
            return ex.question, answer, passages
        if made_up and not self.words_only:  # the whole answer made up in its own form
            new = made_up_answer(answer, self.pieces, rng)
        else:  # another training answer of its shape, its words made up under `words`
            new = pool[int(rng.integers(len(pool)))] if pool else answer
            if made_up:
                new = made_up_answer(new, self.pieces, rng, words_only=True)
        if new == answer:
            return ex.question, answer, passages
        def swap(text: str) -> str:
            return word.sub(lambda _: new, text)
        shown = [dict(p, title=swap(str(p.get("title", ""))), text=swap(p["text"])) for p in passages]
        return swap(ex.question), new, shown


class Summarizer:
    """A frozen causal LM that condenses an example's passages into a short context (greedy, cached)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, fmt: ExamplesConfig, cache_size: int = 10_000):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.cache = LRU(cache_size)

    @torch.no_grad()
    def __call__(self, passage_lists: list[list[dict[str, Any]]]) -> list[str]:
        keys = [tuple(str(p.get("id", p["text"])) for p in ps) for ps in passage_lists]
        todo = [i for i, k in enumerate(keys) if k not in self.cache and passage_lists[i]]
        if todo:
            prompts = []
            for i in todo:
                text = "".join(format_passages(passage_lists[i], self.fmt))
                ids = _ids(self.tokenizer, text)[: self.fmt.summary_max_input]
                prompt = self.fmt.summary_prompt.format(passages=self.tokenizer.decode(ids))
                prompts.append(_ids(self.tokenizer, prompt))
            batch = collate_prompts(prompts, self.tokenizer.pad_token_id)
            out = self.model.generate(
                **batch,
                max_new_tokens=self.fmt.summary_max_new_tokens,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for i, row in zip(todo, new):
                self.cache.put(keys[i], self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return [self.cache.get(k, "") if ps else "" for k, ps in zip(keys, passage_lists)]


@dataclass
class Fetched:
    """`ExampleBuilder.fetch`'s result: the retrieved passages per example (and their summaries)."""

    retrieved: list[list[dict[str, Any]]]
    chosen: list[list[dict[str, Any]]] | None  # the passages shown, when fetch already selected them (summarize)
    summaries: list[str] | None
    retrieval_s: float
    fetch_s: float


@dataclass
class Batch:
    """One rank's micro-batch, ready for the engine, with what was needed to build it."""

    tensors: dict[str, torch.Tensor]
    example_ids: list[int]
    passage_ids: list[list[str]]
    build_s: float  # retrieval + selection + encoding, wherever it ran
    retrieval_s: float
    tokens: int = field(default=0)


class ExampleBuilder:
    """Turns example indices into a training batch: retrieve, select, aggregate, encode, collate."""

    def __init__(
        self,
        tokenizer: Any,
        fmt: ExamplesConfig,
        *,
        top_k: int,
        max_len: int,
        retrieve: Callable[[list[str], int], list[list[dict[str, Any]]]] | None,
        store: PassageStore | None = None,
        summarizer: Summarizer | None = None,
        seed: int = 0,
    ):
        if top_k > 0 and retrieve is None:
            raise ConfigError("examples with passages need a retrieval function (top_k > 0)")
        if fmt.aggregation == "summarize" and top_k > 0 and summarizer is None:
            raise ConfigError("trainer.examples.aggregation=summarize needs a summarizer model")
        needs_store = fmt.inject_gold_p > 0 or (fmt.distractor_p > 0 and fmt.distractor_source == "random")
        if needs_store and store is None and top_k > 0:
            raise ConfigError(
                "trainer.examples.inject_gold_p / distractor_source=random need the snapshot's passages "
                "(a PassageStore); none was given"
            )
        self.tokenizer, self.fmt, self.top_k, self.max_len = tokenizer, fmt, top_k, max_len
        self.retrieve, self.store, self.summarizer, self.seed = retrieve, store, summarizer, seed
        self.ids = TokenMemo(tokenizer)
        self._swap: AnswerSwap | None = None

    def swapper(self, examples: Sequence[Any] | Mapping[int, Any]) -> AnswerSwap | None:
        """The answer swap (`swap_answer_p` > 0, passages shown), its pools built once from the first
        training example list it is given (a source whose batches are drawn per position, as a dict,
        gives its list first)."""
        if self.fmt.swap_answer_p <= 0 or self.top_k == 0:
            return None
        if self._swap is None and not isinstance(examples, Mapping):
            pieces = word_pieces(self.tokenizer) if self.fmt.swap_made_up_p > 0 else ()
            if self.fmt.swap_made_up_p > 0 and not pieces:
                log.warning("trainer.examples.swap_made_up_p=%s: the tokenizer has no lower-case word pieces to spell "
                            "made-up words from; %s", self.fmt.swap_made_up_p,
                            "words are swapped as they are" if self.fmt.swap_made_up == "words"
                            else "words are made up letter by letter")
            self._swap = AnswerSwap(examples, self.fmt.swap_answer_p, self.fmt.swap_made_up_p, pieces,
                                    self.fmt.swap_made_up)
        return self._swap

    def fetch_k(self) -> int:
        """How many ranks to retrieve: top-k, plus the lower ranks that distractors, or the passages
        standing in for a dropped gold one, come from."""
        if (self.fmt.distractor_p > 0 and self.fmt.distractor_source == "lower_ranks") or self.fmt.drop_gold_p > 0:
            return self.top_k + (self.fmt.over_retrieve or self.top_k)
        return self.top_k

    def build(self, examples: Sequence[Any], ids: Sequence[int], epoch: int, *, train: bool = True) -> Batch:
        return self.assemble(examples, ids, epoch, self.fetch(examples, ids, epoch, train=train), train=train)

    def fetch(self, examples: Sequence[Any], ids: Sequence[int], epoch: int, *, train: bool = True) -> Fetched:
        """What a batch needs from outside this process, and the model work it may hold (summaries).

        Meant for a background thread: it waits on the service (or runs the summarizer's torch
        kernels), both of which leave the GIL to the training thread. The cheap Python work —
        selection, prompts, collation — is `assemble`'s, on the training thread, where it does not
        contend for the GIL with the step's own Python.
        """
        t0 = time.perf_counter()
        batch = [examples[int(i)] for i in ids]
        if self.top_k > 0:
            retrieved = self.retrieve([ex.question for ex in batch], self.fetch_k())  # type: ignore[misc]
        else:
            retrieved = [[] for _ in batch]
        t1 = time.perf_counter()
        chosen = summaries = None
        if self.top_k > 0 and self.fmt.aggregation == "summarize":
            chosen = self.select(batch, ids, retrieved, epoch, train)
            summaries = self.summarizer(chosen)  # type: ignore[misc]
        return Fetched(retrieved=retrieved, chosen=chosen, summaries=summaries, retrieval_s=t1 - t0,
                       fetch_s=time.perf_counter() - t0)  # fmt: skip

    def select(
        self, batch: Sequence[Any], ids: Sequence[int], retrieved: list[list[dict[str, Any]]], epoch: int, train: bool
    ) -> list[list[dict[str, Any]]]:
        chosen = []
        for ex, i, ps in zip(batch, ids, retrieved):
            # Keyed by the example, not by a shared stream: the same choice whichever thread, rank
            # or resume point builds it.
            rng = np.random.default_rng([self.seed, epoch, int(i)])
            chosen.append(
                select_passages(
                    ps, top_k=self.top_k, gold_ids=ex.gold_ids, fmt=self.fmt, rng=rng, store=self.store, train=train
                )
            )
        return chosen

    def assemble(
        self, examples: Sequence[Any], ids: Sequence[int], epoch: int, fetched: Fetched, *, train: bool = True
    ) -> Batch:
        """The batch from what `fetch` brought: select, aggregate, encode, collate."""
        t0 = time.perf_counter()
        batch = [examples[int(i)] for i in ids]
        chosen = fetched.chosen if fetched.chosen is not None else self.select(batch, ids, fetched.retrieved, epoch, train)
        swap = self.swapper(examples) if train and self.fmt.aggregation != "summarize" else None
        if swap is not None:
            batch, chosen = self.swapped(swap, batch, ids, chosen, epoch)
        rows = self.encode(batch, chosen, fetched.summaries)
        tensors = collate_train(rows, self.tokenizer.pad_token_id)
        return Batch(
            tensors=tensors,
            example_ids=[int(i) for i in ids],
            passage_ids=[[str(p.get("id", "")) for p in ps] for ps in chosen],
            build_s=fetched.fetch_s + time.perf_counter() - t0,
            retrieval_s=fetched.retrieval_s,
            tokens=int(tensors["attention_mask"].sum()),
        )

    def swapped(
        self, swap: AnswerSwap, batch: Sequence[Any], ids: Sequence[int], chosen: list[list[dict[str, Any]]], epoch: int
    ) -> tuple[list[Any], list[list[dict[str, Any]]]]:
        out_batch, out_chosen = [], []
        for ex, i, ps in zip(batch, ids, chosen):
            # its own stream, keyed like selection's: the same swap on any thread, rank or resume
            rng = np.random.default_rng([self.seed, epoch, int(i), 1])
            question, answer, shown = swap(ex, ps, rng)
            out_batch.append(ex if answer == ex.answers[0] else dataclasses.replace(ex, question=question, answers=[answer]))
            out_chosen.append(shown)
        return out_batch, out_chosen

    def encode(
        self, batch: Sequence[Any], chosen: list[list[dict[str, Any]]], summaries: list[str] | None = None
    ) -> list[dict[str, list[int]]]:
        tok, fmt, n, ids = self.tokenizer, self.fmt, self.max_len, self.ids
        agg = fmt.aggregation if self.top_k > 0 else "concat"
        if agg == "concat":
            return [encode_train(tok, ex.question, ps, ex.answers[0], n, fmt, ids) for ex, ps in zip(batch, chosen)]
        if agg == "sequential":
            rows = []
            for ex, ps in zip(batch, chosen):
                for p in ps or [None]:
                    rows.append(encode_train(tok, ex.question, [p] if p else [], ex.answers[0], n, fmt, ids))
            return rows
        if summaries is None:
            summaries = self.summarizer(chosen)  # type: ignore[misc]
        return [
            encode_train(tok, ex.question, [{"title": "summary", "text": s}] if s else [], ex.answers[0], n, fmt, ids)
            for ex, s in zip(batch, summaries)
        ]
