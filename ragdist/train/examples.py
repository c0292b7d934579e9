"""Training and eval examples built from retrieved passages: passages, then question, then answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ragdist.train.model import IGNORE

PASSAGE_TEMPLATE = "passage {n}: {title}. {text}\n"
QUESTION_TEMPLATE = "question: {question}\nanswer:"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: Any, question: str, passages: Sequence[dict[str, Any]], budget: int) -> list[int]:
    """Passages first (truncated to fit `budget` tokens in all), then the question."""
    q = _ids(tokenizer, QUESTION_TEMPLATE.format(question=question))
    room = budget - len(q)
    if room < 0:
        return q[-budget:]
    ctx: list[int] = []
    for n, p in enumerate(passages, start=1):
        if room <= 0:
            break
        piece = _ids(tokenizer, PASSAGE_TEMPLATE.format(n=n, title=p.get("title", ""), text=p["text"]))[:room]
        ctx += piece
        room -= len(piece)
    bos = [tokenizer.cls_token_id] if getattr(tokenizer, "cls_token_id", None) is not None else []
    return bos + ctx + q if len(bos) + len(ctx) + len(q) <= budget else ctx + q


def encode_train(
    tokenizer: Any, question: str, passages: Sequence[dict[str, Any]], answer: str, max_len: int
) -> dict[str, list[int]]:
    """Loss only on the answer (and the end-of-answer token); the answer is never truncated away."""
    ans = _ids(tokenizer, " " + answer) + [tokenizer.eos_token_id]
    ans = ans[: max(1, max_len // 2)]
    prompt = prompt_ids(tokenizer, question, passages, max_len - len(ans))
    return {"input_ids": prompt + ans, "labels": [IGNORE] * len(prompt) + ans}


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


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded, so generation continues right after each prompt."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
