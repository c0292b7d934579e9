"""Greedy answer generation, in one process or sharded over every rank of a process group.

Outside a process group (or with one rank) each function here is the one-process behaviour.
Inside one, evaluation runs SPMD: every rank calls the same functions in the same order with the
same questions; generation is split (whole batches dealt round-robin, each the very batch one
process would generate, so the answers are the same), and rank 0 alone does what must happen
once (retrieval, the latency probe, model-based faithfulness, the report).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ragdist.prompts import answer_ids, collate_prompts, stop_token_ids


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def eval_device() -> torch.device:
    """This rank's accelerator (LOCAL_RANK's GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def from_main(make: Callable[[], Any]) -> Any:
    """`make()` on rank 0 and its value on every rank (pickled): for what must happen once, e.g.
    retrieval through the service, whose passages every rank then generates from."""
    rank, n = world()
    if n == 1:
        return make()
    box = [make() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


#: `eval.max_new_tokens=null`: room for the longest training answer, and this much more.
BUDGET_MARGIN = 1.25


@dataclass
class AnswerBudget:
    """How many tokens an answer may take: `tokens`, from `longest` (the longest training answer,
    through the token that ends it, each question counted by its shortest answer), and how many
    eval questions have no answer that fits (`over`, of `questions`), which no model could get right."""

    tokens: int
    longest: int
    over: int
    questions: int


def answer_budget(tokenizer: Any, train: list[Any], evals: list[Any], max_new_tokens: int | None) -> AnswerBudget:
    """`max_new_tokens`, or when it is None the budget the training answers call for: a generation
    budget below an answer's length makes that answer a miss whatever the model knows (an electron
    configuration of 21 tokens cut at 12), while a model stops at its end token anyway."""

    def need(answers: list[str]) -> int:
        return min((len(answer_ids(tokenizer, a)) for a in answers), default=0)

    longest = max((need(ex.answers) for ex in train), default=0)
    tokens = max_new_tokens or max(4, math.ceil(longest * BUDGET_MARGIN))
    over = sum(1 for ex in evals if ex.answers and need(ex.answers) > tokens)
    return AnswerBudget(tokens=tokens, longest=longest, over=over, questions=len(evals))


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Greedy answers to one batch (left-padded, with the KV cache, on the model's device) and the
    number of tokens generated for each, up to and including the token that ended it."""
    texts, counts, _ = generate_scored(model, tokenizer, prompts, max_new_tokens, scores=False)
    return texts, counts


@torch.no_grad()
def generate_scored(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, scores: bool = True
) -> tuple[list[str], list[int], list[float]]:
    """`generate`, plus each answer's log-probability under the model (the sum over its generated
    tokens, the one that ended it included; 0.0 each when `scores` is false)."""
    stops = stop_token_ids(tokenizer)
    batch = {k: v.to(model.device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=scores,
        return_dict_in_generate=True,
    )
    step_logp = (
        model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
        if scores
        else None
    )
    texts, counts, logps = [], [], []
    for i, row in enumerate(out.sequences[:, batch["input_ids"].shape[1] :].tolist()):
        n = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        counts.append(n)
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
        logps.append(float(step_logp[i, :n].sum()) if step_logp is not None else 0.0)
    return texts, counts, logps


@dataclass
class Generated:
    texts: list[str]
    generated_tokens: list[int]
    seconds_per_q: list[float]  # each prompt's share of its batch's generation time
    logprobs: list[float] = field(default_factory=list)  # with scores=True: each answer's log-probability


def generate_sharded(
    model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
    scores: bool = False,
) -> Generated:
    """Answers to `prompts`, in their order, on every rank. Collective when a process group is up.

    The prompts are cut into batches of `batch_size` as one process would cut them; batch j is
    generated by rank j mod world size, on that rank's model (and device), and an all-gather puts
    the answers back in order.
    """
    rank, n = world()
    mine: list[tuple[int, list[str], list[int], float, list[float]]] = []
    for start in list(range(0, len(prompts), batch_size))[rank::n]:
        batch = prompts[start : start + batch_size]
        t0 = time.perf_counter()
        texts, counts, logps = generate_scored(model, tokenizer, batch, max_new_tokens, scores=scores)
        mine.append((start, texts, counts, (time.perf_counter() - t0) / len(batch), logps))
    parts: list[Any] = [mine]
    if n > 1:
        parts = [None] * n
        dist.all_gather_object(parts, mine)
    out = Generated([], [], [])
    for _, texts, counts, dt, logps in sorted((item for part in parts for item in part), key=lambda item: item[0]):
        out.texts += texts
        out.generated_tokens += counts
        out.seconds_per_q += [dt] * len(texts)
        out.logprobs += logps
    return out
