"""The prompt a generator sees, built here for training and evaluation alike.

Plain prompts (a tokenizer without a chat template): the passages, then the question, then the
answer after one space and the end-of-sequence token:

    [bos] passage 1: <title>. <text>\\n ... question: <question>\\nanswer: <answer></s>

Chat prompts (the tokenizer has a chat template, or `model.chat_template` gave it one): passages
and question are the user turn, the answer is the assistant turn, rendered by the template:

    <template's prefix> passage 1: ... question: <question>\\nanswer: <generation prompt> <answer><end of turn>

Either way the loss covers the answer tokens only (and the token that ends the answer), the
passages are what gets truncated to fit, and evaluation generates from exactly the prompt tokens
training put before the answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragdist.errors import ConfigError
from ragdist.train.config import (  # the defaults live there
    PASSAGE_TEMPLATE,
    QUESTION_TEMPLATE,
    ExamplesConfig,
)

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a token that carries no loss (torch's cross_entropy ignore_index)

# Written into every checkpoint ragdist-train exports: how the model was trained to read its passages.
READER_FILE = "ragdist_reader.json"
READER_KEYS = ("aggregation", "passage_template", "question_template")


# Stand-ins for the user message and the answer while a chat template is rendered once; the text
# around them is the template's own.
_USER, _ANSWER = "\x00ragdist-user\x00", "\x00ragdist-answer\x00"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def format_passages(passages: Sequence[dict[str, Any]], fmt: Any | None = None) -> list[str]:
    template = fmt.passage_template if fmt else PASSAGE_TEMPLATE
    return [template.format(n=n, title=p.get("title", ""), text=p["text"]) for n, p in enumerate(passages, start=1)]


def uses_chat(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class ChatFrame:
    """A chat template cut around one user turn and one assistant turn, as token ids."""

    prefix: list[int]  # everything before the user's message (system prompt, bos, role header)
    prompt_end: list[int]  # after the user's message, through the generation prompt
    answer_lead: str  # text the template puts before the assistant's content beyond the generation prompt
    answer_end: list[int]  # after the assistant's content, through the token that ends the turn
    template: str


_FRAMES: weakref.WeakKeyDictionary[Any, ChatFrame] = weakref.WeakKeyDictionary()


def chat_frame(tokenizer: Any) -> ChatFrame:
    """The tokenizer's chat template around one (user, assistant) exchange; cached per tokenizer."""
    template = tokenizer.chat_template
    cached = _FRAMES.get(tokenizer)
    if cached is not None and cached.template == template:
        return cached
    user = [{"role": "user", "content": _USER}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _ANSWER}], tokenize=False)
    except Exception as e:  # a template's own error (jinja2, raise_exception), whatever its type
        raise ConfigError(f"the chat template cannot render a user turn and an assistant turn: {e}") from None
    if prompt.count(_USER) != 1 or full.count(_USER) != 1 or full.count(_ANSWER) != 1:
        raise ConfigError("the chat template does not place the user message and the answer verbatim, once each")
    prefix, after_user = prompt.split(_USER)
    full_prefix, rest = full.split(_USER)
    if full_prefix != prefix:
        raise ConfigError("the chat template renders the user turn differently with and without an answer")
    between, tail = rest.split(_ANSWER)
    # Training must continue the very prompt evaluation generates from: the generation prompt.
    # Text the template adds beyond it before an answer (rare) goes with the answer.
    lead = between[len(after_user) :] if between.startswith(after_user) else ""
    answer_end = _ids(tokenizer, tail)
    stops = set(stop_token_ids(tokenizer, answer_end))
    cut = next((i + 1 for i, t in enumerate(answer_end) if t in stops), len(answer_end))
    frame = ChatFrame(
        prefix=_ids(tokenizer, prefix),
        prompt_end=_ids(tokenizer, after_user),
        answer_lead=lead,
        answer_end=answer_end[:cut],  # nothing after the turn ends (a trailing newline) is learned
        template=template,
    )
    _FRAMES[tokenizer] = frame
    return frame


def stop_token_ids(tokenizer: Any, answer_end: Sequence[int] | None = None) -> list[int]:
    """Tokens that end an answer: end-of-sequence, and with a chat template the token that closes
    the assistant's turn (`<|im_end|>`, `<|eot_id|>`, ...) when that is a special token."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if answer_end is None:
        if not uses_chat(tokenizer):
            return stops
        answer_end = chat_frame(tokenizer).answer_end
    special = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    if answer_end and answer_end[0] in special and answer_end[0] not in stops:
        stops.append(answer_end[0])
    return stops


def prompt_ids(
    tokenizer: Any,
    question: str,
    passages: Sequence[dict[str, Any]],
    budget: int,
    fmt: Any | None = None,
    ids: Callable[[str], list[int]] | None = None,
) -> list[int]:
    """The prompt's token ids, at most `budget` of them: passages first (truncated to fit), then the
    question; inside the chat template's user turn when the tokenizer has one.

    `ids(text)` tokenizes (default: the tokenizer itself; a `TokenMemo` gives the same ids faster).
    """
    ids = ids or (lambda text: _ids(tokenizer, text))
    q_template = fmt.question_template if fmt else QUESTION_TEMPLATE
    q = ids(q_template.format(question=question))
    if uses_chat(tokenizer):
        frame = chat_frame(tokenizer)
        fixed = len(frame.prefix) + len(frame.prompt_end)
        if budget - fixed < 1:
            raise ConfigError(
                f"a prompt budget of {budget} tokens cannot hold the chat template's own {fixed} tokens "
                "(raise trainer.max_seq_len / eval.max_prompt_len)"
            )
        return frame.prefix + _context(passages, q, budget - fixed, fmt, ids) + frame.prompt_end
    if budget - len(q) < 0:
        return q[-budget:]
    body = _context(passages, q, budget, fmt, ids)
    bos = [tokenizer.cls_token_id] if getattr(tokenizer, "cls_token_id", None) is not None else []
    return bos + body if len(bos) + len(body) <= budget else body


def _context(
    passages: Sequence[dict[str, Any]], q: list[int], room: int, fmt: Any | None, ids: Callable[[str], list[int]]
) -> list[int]:
    """Passages truncated so that they and the question fit in `room` tokens, then the question."""
    room -= len(q)
    if room < 0:
        return q[-(room + len(q)) :]
    ctx: list[int] = []
    for text in format_passages(passages, fmt):
        if room <= 0:
            break
        piece = ids(text)[:room]
        ctx += piece
        room -= len(piece)
    return ctx + q


def answer_ids(tokenizer: Any, answer: str, ids: Callable[[str], list[int]] | None = None) -> list[int]:
    """The answer's tokens as training teaches them, through the token that ends it."""
    ids = ids or (lambda text: _ids(tokenizer, text))
    if uses_chat(tokenizer):
        frame = chat_frame(tokenizer)
        return ids(frame.answer_lead + answer) + frame.answer_end
    return ids(" " + answer) + [tokenizer.eos_token_id]


def encode_train(
    tokenizer: Any,
    question: str,
    passages: Sequence[dict[str, Any]],
    answer: str,
    max_len: int,
    fmt: Any | None = None,
    ids: Callable[[str], list[int]] | None = None,
) -> dict[str, list[int]]:
    """Prompt then answer; loss only on the answer (and its end token), which is never truncated away."""
    ids = ids or (lambda text: _ids(tokenizer, text))
    frac = fmt.answer_max_frac if fmt else 0.5
    ans = answer_ids(tokenizer, answer, ids)[: max(1, int(max_len * frac))]
    prompt = prompt_ids(tokenizer, question, passages, max_len - len(ans), fmt, ids)
    return {"input_ids": prompt + ans, "labels": [IGNORE] * len(prompt) + ans}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded, so generation continues right after each prompt."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def write_reader_format(ckpt: Any, fmt: Any, top_k: int, *, aggregation: str | None = None) -> None:
    """Record in the checkpoint dir how its model was trained to read (`trainer.examples` keys, top-k),
    so that evaluating it another way can be pointed out (`reader_mismatch`). `aggregation` overrides
    the config's where the trainer builds its rows its own way (joint training: one passage a row)."""
    from ragdist.index.snapshot import atomic_write_text

    info = {key: getattr(fmt, key) for key in READER_KEYS}
    if aggregation is not None:
        info["aggregation"] = aggregation
    atomic_write_text(Path(ckpt) / READER_FILE, json.dumps({**info, "top_k": int(top_k)}, indent=1))


def _reader_record(ckpt: Any) -> dict[str, Any] | None:
    """The checkpoint's `READER_FILE`, or None when it has none; an unreadable one is named in a warning."""
    path = Path(ckpt) / READER_FILE
    if not path.is_file():
        return None
    try:
        trained = json.loads(path.read_text())
        if not isinstance(trained, dict):
            raise ValueError(f"a JSON {type(trained).__name__}, not an object")
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        log.warning("%s: cannot read how this checkpoint was trained to read its passages (%s); "
                    "evaluating it with this config's prompts as they are", path, e)
        return None
    return trained


def reader_mismatch(ckpt: Any, fmt: Any, top_k: int | None = None) -> list[str]:
    """The overrides (`trainer.examples.<key>=<value>`, `retrieval.top_k=<k>`) that evaluate the checkpoint
    the way it was trained, for each key where `fmt` / `top_k` differ from its record (top-k only for a
    model that did not read its passages one at a time). [] when they match or nothing was recorded; an
    unreadable record is named in a warning and compared with nothing."""
    trained = _reader_record(ckpt)
    if trained is None:
        return []
    fixes = [
        f"trainer.examples.{key}={trained[key]!r}"
        for key in READER_KEYS
        if key in trained and trained[key] != getattr(fmt, key)
    ]
    # a model that reads one passage at a time reads any number of them; one prompt of k passages does not
    concat = trained.get("aggregation", getattr(fmt, "aggregation", "")) != "sequential"
    if concat and top_k is not None and isinstance(trained.get("top_k"), int) and trained["top_k"] != top_k:
        fixes.append(f"retrieval.top_k={trained['top_k']}")
    return fixes


def recorded_format(ckpt: Any, fmt: Any) -> Any:
    """`fmt` (a `trainer.examples` config, or None for the defaults) with the checkpoint's recorded way
    of reading applied: how a model from a run whose config does not say it (a joint run) is read."""
    trained = _reader_record(ckpt)
    if not trained:
        return fmt
    base = fmt if fmt is not None else ExamplesConfig()
    return dataclasses.replace(base, **{k: trained[k] for k in READER_KEYS if k in trained})
