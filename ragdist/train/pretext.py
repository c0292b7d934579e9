"""Retrieval-augmented pretext training of the reader: reading tasks made from the corpus itself.

Before it sees a single question, the generator learns to read retrieved passages (in the spirit of
Atlas, Izacard et al. 2022, with REALM's salient-span masking). A task is one passage's salient span
(a name, code or number: words with capitals past their first letter or after a sentence's start, or
with digits) masked out of its sentence:

    passage "Kokoda Airport is an airport serving Kokoda, ... Its IATA code is KKD and its ICAO ..."
    query   "Kokoda Airport: Its IATA code is ___"                  target "KKD"

The query (the passage's title, then up to `context_words` words of the span's sentence around the
blank) is sent to the retrieval service like a question; the passages it returns, shown exactly as
RAG fine-tuning shows them (same templates, distractors, gold injection, shuffled order), hold the
original passage among their neighbours or, for `drop_gold_p` of the tasks, not. The span never
appears in the query, so the target can only be copied from a passage, and the model must tell the
right passage from the others by what the query says about it — what a question will ask of it. Spans
that recur in many passages (template words, country codes) are skipped: they can be guessed from
priors, which is what the reader must not learn. For `made_up_p` of the tasks the span is made up anew
in its form, in the passages shown and the target (the QA steps' `AnswerSwap`, every swap made up), so
that a corpus small enough to be learnt by heart within the stage is still read.

Tasks are made lazily, one per passage per epoch (a new span each epoch), so the stage scales with the
corpus and holds nothing beyond the passage store.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ragdist.data.qa import QAExample
from ragdist.errors import DataError
from ragdist.train.config import PRETEXT_TASKS as TASKS  # noqa: F401 - the task names
from ragdist.train.config import PretextConfig  # noqa: F401 - the schema's home is train/config.py
from ragdist.train.examples import ExampleBuilder, PassageStore
from ragdist.train.prefetch import Lookahead

if TYPE_CHECKING:
    from ragdist.train.trainer import Position

BLANK = "___"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD = re.compile(r"\S+")
_LEAD = "(\"'\u201c\u2018"
_TRAIL = ",.;:!?)\"'\u201d\u2019"


@dataclass(frozen=True)
class Span:
    start: int  # character offsets in the passage text
    end: int
    sentence: tuple[int, int]  # the sentence holding it
    words: int


def _core(text: str, m: re.Match) -> tuple[int, int, bool]:
    """A word's offsets without surrounding punctuation, and whether punctuation followed it."""
    s, e = m.start(), m.end()
    while s < e and text[s] in _LEAD:
        s += 1
    end0 = e
    while e > s and text[e - 1] in _TRAIL:
        e -= 1
    return s, e, e < end0


def _salient(word: str, first: bool) -> bool:
    if any(c.isdigit() for c in word):
        return True
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return False
    return any(c.isupper() for c in letters[1:]) or (letters[0].isupper() and not first)


def _runs(text: str, s0: int, sent: str) -> Iterator[list[tuple[int, int]]]:
    """The runs of salient words of one sentence starting at `s0`, as (start, end) offsets in `text`."""
    run: list[tuple[int, int]] = []
    for j, m in enumerate(_WORD.finditer(sent)):
        a, b, stop = _core(sent, m)
        if a >= b or not _salient(sent[a:b], j == 0) or (m.group(0)[0] in _LEAD and run):
            if run:
                yield run
            run = []
            if a >= b or not _salient(sent[a:b], j == 0):
                continue
        run.append((s0 + a, s0 + b))
        if stop:
            yield run
            run = []
    if run:
        yield run


def salient_spans(text: str, max_words: int = 4) -> list[Span]:
    """Runs of salient words (names, codes, numbers) within sentences, at most `max_words` long.

    A word followed by punctuation ("London,") ends its run, so a list of places gives one span each.
    """
    spans: list[Span] = []
    pos = 0
    for sent in _SENTENCE.split(text):
        s0 = text.index(sent, pos)
        pos = s0 + len(sent)
        spans += [Span(r[0][0], r[-1][1], (s0, pos), len(r)) for r in _runs(text, s0, sent) if len(r) <= max_words]
    return spans


def span_counts(passages: Sequence[dict[str, Any]], max_words: int) -> Counter:
    """In how many passages each span text occurs as a span."""
    c: Counter = Counter()
    for p in passages:
        c.update({p["text"][s.start : s.end] for s in salient_spans(p["text"], max_words)})
    return c


def make_query(passage: dict[str, Any], span: Span, cfg: PretextConfig, kind: str = "cloze") -> str:
    """The passage's title, then the words of the span's sentence around a blank (cloze), or the words
    before the span, across sentences (prefix)."""
    text = passage["text"]
    a, b = span.sentence
    title = str(passage.get("title") or "").strip()
    if kind == "section":
        return title if cfg.title and title else " ".join(text.split()[: cfg.context_words])
    if kind == "prefix":
        body = " ".join(text[: span.start].split()[-cfg.context_words :])
    else:
        left = text[a : span.start].split()[-cfg.context_words :]
        right = text[span.end : b].split()[: cfg.context_words] if len(left) < 3 else []
        body = " ".join([*left, BLANK, *right])
    return f"{title}: {body}" if cfg.title and title else body


def target_of(passage: dict[str, Any], span: Span, cfg: PretextConfig, kind: str = "cloze") -> str:
    """The span (cloze), the span and the words after it (prefix), or the passage's first words (section);
    `prefix_words` words in all."""
    text = passage["text"]
    if kind == "cloze":
        return text[span.start : span.end]
    start = span.start if kind == "prefix" else 0
    if kind == "section" and not (cfg.title and str(passage.get("title") or "").strip()):
        start = list(_WORD.finditer(text))[: cfg.context_words][-1].end()  # past the words the query shows
    words = list(_WORD.finditer(text, start))[: cfg.prefix_words]
    return text[words[0].start() : words[-1].end()] if words else text[span.start : span.end]


class ReadingTasks:
    """Task i of epoch e: passage i's (the next passage that has a usable span, if it has none) masked span
    for that epoch — the same whichever thread, rank or resume point asks for it."""

    def __init__(self, store: PassageStore, cfg: PretextConfig, *, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.kinds = tuple(dict.fromkeys(cfg.tasks))
        self.passages = store.passages
        rng = np.random.default_rng([seed, 11])
        sample = self.passages
        if len(sample) > cfg.df_sample:
            sample = [sample[int(i)] for i in rng.choice(len(sample), cfg.df_sample, replace=False)]
        self.df = span_counts(sample, cfg.span_words)
        self.max_df = max(1, int(cfg.max_span_df * len(sample)))
        self._spans: dict[int, list[Span]] = {}
        if not any(self.spans(i) for i in range(min(len(self.passages), 1000))):
            raise DataError(
                "pretext: no passage among the first 1,000 has a usable salient span (names, codes, numbers "
                "unique to their passage); set trainer.pretext.steps=0"
            )

    def __len__(self) -> int:
        return len(self.passages)

    def spans(self, i: int) -> list[Span]:
        """Passage i's spans that can be tasks: rare in the corpus, not already in the query."""
        got = self._spans.get(i)
        if got is None:
            p = self.passages[i]
            text = p["text"]
            got = []
            for s in salient_spans(text, self.cfg.span_words):
                value = text[s.start : s.end]
                if self.df.get(value, 0) > self.max_df or any(
                    value in make_query(p, s, self.cfg, k) for k in self.kinds if k != "section"
                ):
                    continue
                got.append(s)
            if len(self._spans) < 200_000:  # a bounded memo; past it spans are recomputed
                self._spans[i] = got
        return got

    def task(self, i: int, epoch: int) -> QAExample:
        n = len(self.passages)
        for j in range(n):
            k = (i + j) % n
            spans = self.spans(k)
            if spans:
                break
        rng = np.random.default_rng([self.seed, epoch, i, 17])
        s = spans[int(rng.integers(len(spans)))]
        kind = self.kinds[int(rng.integers(len(self.kinds)))] if len(self.kinds) > 1 else self.kinds[0]
        p = self.passages[k]
        return QAExample(
            id=f"pretext-{kind}-{p['id']}-{s.start}",
            question=make_query(p, s, self.cfg, kind),
            answers=[target_of(p, s, self.cfg, kind)],
            gold_ids=[str(p["id"])],
        )


class _TaskSource:
    """A batch source whose examples for a position come from `examples_at(pos)`."""

    prefetch = True
    builder: ExampleBuilder
    lookahead: int

    def examples_at(self, pos: Position) -> dict[int, QAExample]:
        raise NotImplementedError

    def stream(self, positions: Iterator[Position]) -> Iterator[Position]:
        b = self.builder
        if b.retrieve is None or b.top_k == 0 or self.lookahead <= 1:
            return positions
        la = Lookahead(b.retrieve, positions, lambda p: [e.question for e in self.examples_at(p).values()], self.lookahead)
        b.retrieve = la
        return la.positions()

    def fetch(self, pos: Position) -> Any:
        examples = self.examples_at(pos)
        return examples, self.builder.fetch(examples, pos.ids, pos.epoch)

    def build(self, pos: Position, fetched: Any) -> Any:
        examples, got = fetched
        return self.builder.assemble(examples, pos.ids, pos.epoch, got)


class PretextSource(_TaskSource):
    """The pretext stage's batch source: one reading task per passage per epoch (see the module docstring)."""

    def __init__(self, store: PassageStore, builder: ExampleBuilder, cfg: PretextConfig, *, seed: int = 0,
                 lookahead: int = 1):  # fmt: skip
        self.tasks = ReadingTasks(store, cfg, seed=seed)
        self.builder, self.lookahead = builder, lookahead
        self.num_examples = len(self.tasks)
        if builder is not None:
            # the span swaps (trainer.examples.swap_answer_p, set from `made_up_p` by the stage) make
            # spans up; no answer pools
            builder.swapper([])

    def examples_at(self, pos: Position) -> dict[int, QAExample]:
        return {i: self.tasks.task(i, pos.epoch) for i in pos.ids}


class MixedSource(_TaskSource):
    """RAG fine-tuning's examples with a share (`trainer.pretext.mix`) replaced by reading tasks, drawn
    per example from its position, so that learning the questions does not unlearn reading."""

    def __init__(self, examples: Sequence[QAExample], builder: ExampleBuilder, tasks: ReadingTasks, share: float,
                 *, seed: int = 0, lookahead: int = 1):  # fmt: skip
        self.examples, self.tasks, self.share, self.seed = examples, tasks, share, seed
        self.builder, self.lookahead = builder, lookahead
        if builder is not None:
            builder.swapper(examples)  # answer swaps draw from the QA answers, not the reading tasks'
        self.num_examples = len(examples)

    def examples_at(self, pos: Position) -> dict[int, QAExample]:
        out = {}
        for i in pos.ids:
            rng = np.random.default_rng([self.seed, pos.epoch, i, 29])
            if rng.random() < self.share:
                out[i] = self.tasks.task(int(rng.integers(len(self.tasks))), pos.epoch)
            else:
                out[i] = self.examples[i]
        return out
