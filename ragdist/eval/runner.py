"""Evaluate a generator on held-out questions, with retrieved passages or closed book."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ragdist.data.qa import QAExample
from ragdist.eval import metrics as M
from ragdist.train.examples import collate_prompts, prompt_ids


@dataclass
class EvalConfig:
    max_new_tokens: int = 16
    batch_size: int = 32
    max_questions: int | None = None
    max_prompt_len: int = 256
    checkpoint: str = ""  # ragdist-eval: model dir to evaluate ("" = the run's checkpoints)
    run_dir: str = ""  # ragdist-eval: a finished run whose checkpoints to evaluate


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    *,
    top_k: int,
    retrieve: Callable[[list[str], int], list[list[dict[str, Any]]]] | None,
    cfg: EvalConfig,
) -> dict[str, Any]:
    """EM / F1 of generated answers; recall@k against gold ids when retrieving; per-stage latency."""
    model.eval()
    examples = examples[: cfg.max_questions] if cfg.max_questions else examples
    rows: list[dict[str, Any]] = []
    ret_lat, gen_lat = [], []
    for i in range(0, len(examples), cfg.batch_size):
        batch = examples[i : i + cfg.batch_size]
        t0 = time.perf_counter()
        if top_k > 0 and retrieve is not None:
            passages = retrieve([ex.question for ex in batch], top_k)
        else:
            passages = [[] for _ in batch]
        t1 = time.perf_counter()
        prompts = [prompt_ids(tokenizer, ex.question, ps, cfg.max_prompt_len) for ex, ps in zip(batch, passages)]
        answers = generate_answers(model, tokenizer, prompts, cfg.max_new_tokens)
        t2 = time.perf_counter()
        ret_lat.append((t1 - t0) / len(batch))
        gen_lat.append((t2 - t1) / len(batch))
        for ex, ps, pred, pr in zip(batch, passages, answers, prompts):
            ids = [p["id"] for p in ps]
            row = {
                "id": ex.id,
                "question": ex.question,
                "answers": ex.answers,
                "prediction": pred,
                "retrieved": ids,
                "em": M.exact_match(pred, ex.answers),
                "f1": M.token_f1(pred, ex.answers),
                "prompt_tokens": len(pr),
            }
            if top_k > 0 and ex.gold_ids:
                row[f"recall@{top_k}"] = M.recall_at_k(ids, ex.gold_ids, top_k)
                row["recall@1"] = M.recall_at_k(ids, ex.gold_ids, 1)
            rows.append(row)
    agg = M.aggregate([{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in rows])
    agg["n"] = len(rows)
    agg["retrieval_latency_s"] = M.percentiles(ret_lat) if top_k > 0 else {}
    agg["generation_latency_s"] = M.percentiles(gen_lat)
    agg["top_k"] = top_k
    return {"metrics": agg, "rows": rows}


def mean_or_nan(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")
