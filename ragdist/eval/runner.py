"""Evaluate one generator on held-out questions: answers, faithfulness, tokens, robustness, latency.

A strategy is a generator plus, optionally, a retriever. Retrieval is done once per retriever to
a depth that covers every check (top-k sweep, recall curves, hard distractors), and each check
takes a prefix or a perturbation of that ranking, so every strategy sharing a retriever sees
exactly the same contexts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragdist.data.qa import QAExample
from ragdist.eval import metrics as M
from ragdist.eval.config import STRATEGIES, EvalConfig  # noqa: F401 - the schema lives in eval/config.py
from ragdist.eval.generation import generate, generate_scored, generate_sharded, is_main
from ragdist.eval.robustness import (
    Passage,
    insert_at_random,
    passage_text,
    pick_distractors,
    question_rng,
    reorder,
)
from ragdist.prompts import prompt_ids
from ragdist.train.examples import passage_log_posterior

Retrieve = Callable[[list[str], int], list[list[Passage]]]

def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    return generate(model, tokenizer, prompts, max_new_tokens)[0]


@dataclass
class Generations:
    predictions: list[str]
    prompt_tokens: list[int]
    generated_tokens: list[int]
    seconds_per_q: list[float]  # batch time shared out over the batch


def generate_all(
    model: Any,
    tokenizer: Any,
    examples: Sequence[QAExample],
    contexts: Sequence[Sequence[Passage]] | None,
    cfg: EvalConfig,
    fmt: Any | None = None,
) -> Generations:
    """Every question's answer, generated in batches over all ranks (collective under a process group).

    A model trained on one passage per example (`trainer.examples.aggregation=sequential`) is asked
    the same way: one prompt per passage, and the question's answer is the one with the highest
    log p(passage | question) + log p(answer | passage, question), RAG-Sequence's choice. The first
    term is the retriever's softmax over the passages' scores at `eval.retriever_temperature`
    (`eval.passage_prior=retriever`, where every passage carries a dense score), else uniform. Either
    way the order of the passages does not matter. Its token and time figures are the sums over the prompts.
    """
    ctxs = contexts if contexts is not None else [[] for _ in examples]
    groups = [question_prompts(tokenizer, ex.question, ctx, cfg.max_prompt_len, fmt) for ex, ctx in zip(examples, ctxs)]
    flat = [p for g in groups for p in g]
    sequential = len(flat) > len(groups)
    out = generate_sharded(
        model, tokenizer, flat, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, scores=sequential
    )
    gen = Generations([], [], [], [])
    at = 0
    for g, ctx in zip(groups, ctxs):
        span = range(at, at + len(g))
        at += len(g)
        if sequential and len(g) > 1:
            prior = passage_prior(ctx, cfg) if len(ctx) == len(g) else np.zeros(len(g))
            best = max(span, key=lambda j: (out.logprobs[j] + prior[j - span.start], -j))
        else:
            best = span[0]
        gen.predictions.append(out.texts[best])
        gen.prompt_tokens.append(sum(len(flat[j]) for j in span))
        gen.generated_tokens.append(sum(out.generated_tokens[j] for j in span))
        gen.seconds_per_q.append(sum(out.seconds_per_q[j] for j in span))
    return gen


def passage_prior(passages: Sequence[Passage], cfg: EvalConfig) -> np.ndarray:
    """log p(passage | question) over one question's passages: the retriever's softmax over their
    dense scores at `cfg.retriever_temperature`; uniform (zeros) when `cfg.passage_prior=uniform` or
    when a passage has no dense score of its own (BM25, hybrid, re-ranked, a random distractor)."""
    if cfg.passage_prior != "retriever" or any("rerank_score" in p for p in passages):
        return np.zeros(len(passages))
    logp = passage_log_posterior(passages, cfg.retriever_temperature)
    return logp if logp is not None else np.zeros(len(passages))


def question_prompts(
    tokenizer: Any, question: str, passages: Sequence[Passage], budget: int, fmt: Any | None = None
) -> list[list[int]]:
    """The prompt(s) one question is asked with: one, holding every passage; or, for a model trained
    with `aggregation=sequential`, one per passage (one without any when there are none)."""
    if getattr(fmt, "aggregation", "concat") == "sequential" and len(passages) > 1:
        return [prompt_ids(tokenizer, question, [p], budget, fmt) for p in passages]
    return [prompt_ids(tokenizer, question, passages, budget, fmt)]


def em_of(examples: Sequence[QAExample], predictions: Sequence[str]) -> float:
    return float(np.mean([M.exact_match(p, ex.answers) for ex, p in zip(examples, predictions)]))


def f1_of(examples: Sequence[QAExample], predictions: Sequence[str]) -> float:
    return float(np.mean([M.token_f1(p, ex.answers) for ex, p in zip(examples, predictions)]))


def _p95(xs: Sequence[float]) -> float:
    return M.percentiles(xs, (95,))["p95"]


def probe_latency(
    model: Any,
    tokenizer: Any,
    examples: Sequence[QAExample],
    retrieve: Retrieve | None,
    top_k: int,
    cfg: EvalConfig,
    fmt: Any | None = None,
) -> dict[str, list[float]]:
    """Per-question latency as a user would see it: one question at a time, retrieval then generation."""
    qs = list(examples[: cfg.latency_samples])
    warm = qs[: min(cfg.latency_warmup, len(qs))]
    out: dict[str, list[float]] = {"retrieval": [], "generation": [], "e2e": []}
    for j, ex in enumerate(warm + qs):
        t0 = time.perf_counter()
        ctx = retrieve([ex.question], top_k)[0] if retrieve is not None and top_k > 0 else []
        t1 = time.perf_counter()
        prompts = question_prompts(tokenizer, ex.question, ctx, cfg.max_prompt_len, fmt)
        generate_scored(model, tokenizer, prompts, cfg.max_new_tokens, scores=len(prompts) > 1)
        t2 = time.perf_counter()
        if j < len(warm):
            continue
        if retrieve is not None and top_k > 0:
            out["retrieval"].append(t1 - t0)
        out["generation"].append(t2 - t1)
        out["e2e"].append(t2 - t0)
    return out


def evaluate_strategy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[QAExample],
    *,
    ranked: Sequence[Sequence[Passage]] | None,
    top_k: int,
    cfg: EvalConfig,
    retrieve: Retrieve | None = None,
    pool: Sequence[Passage] = (),
    nli: Any | None = None,
    checks: bool = True,
    fmt: Any | None = None,
) -> dict[str, Any]:
    """Every per-strategy figure. `ranked` holds each question's passages to the retrieval depth
    (None = closed book); `retrieve` is used, uncached, only for the latency probe; `fmt` is the
    training recipe's prompt format (trainer.examples), so the model is asked as it was taught."""
    model.eval()
    closed = ranked is None or top_k <= 0
    contexts = None if closed else [list(r[:top_k]) for r in ranked]  # type: ignore[index]
    main = generate_all(model, tokenizer, examples, contexts, cfg, fmt)
    q_only = [len(prompt_ids(tokenizer, ex.question, [], cfg.max_prompt_len, fmt)) for ex in examples]
    rows: list[dict[str, Any]] = []
    for i, ex in enumerate(examples):
        ctx = None if contexts is None else contexts[i]
        scores = M.score_answer(
            main.predictions[i], ex.answers, None if ctx is None else [passage_text(p) for p in ctx]
        )
        rows.append(
            {
                "id": ex.id,
                "question": ex.question,
                "answers": ex.answers,
                "prediction": main.predictions[i],
                "retrieved": [] if ctx is None else [p["id"] for p in ctx],
                **scores,
                "prompt_tokens": main.prompt_tokens[i],
                "generated_tokens": main.generated_tokens[i],
            }
        )
    # Once, on rank 0 (under a process group the other ranks only help generate; rank 0 reports).
    main_rank = is_main()
    if nli is not None and contexts is not None and main_rank:
        from ragdist.eval.faithfulness import claim

        scores = nli.scores(
            ["\n".join(passage_text(p) for p in ctx) for ctx in contexts],
            [claim(ex.question, r["prediction"]) for ex, r in zip(examples, rows)],
        )
        for r, s in zip(rows, scores):
            answered = r["answered"] > 0
            r["nli_score"] = float(s) if answered else float("nan")
            r["faithfulness_nli"] = float(s >= cfg.nli_threshold) if answered else float("nan")
    numeric = [
        {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for r in rows
    ]
    m: dict[str, Any] = M.aggregate(numeric)
    added = [p - q for p, q in zip(main.prompt_tokens, q_only)]
    m.update(
        n=len(rows),
        top_k=0 if closed else top_k,
        prompt_tokens=float(np.mean(main.prompt_tokens)),
        prompt_tokens_p95=_p95(main.prompt_tokens),
        generated_tokens=float(np.mean(main.generated_tokens)),
        generated_tokens_p95=_p95(main.generated_tokens),
        question_tokens=float(np.mean(q_only)),
        retrieval_added_tokens=float(np.mean(added)),
        retrieval_added_tokens_p95=_p95(added),
        tokens_per_q=float(np.mean(main.prompt_tokens) + np.mean(main.generated_tokens)),
        batched_generation_s_per_q=float(np.mean(main.seconds_per_q)),
    )
    if not closed and checks:
        m.update(
            _sweep_and_robustness(model, tokenizer, examples, ranked, top_k, cfg, pool, main.predictions, fmt)
        )  # type: ignore[arg-type]
    lat: dict[str, list[float]] = {"retrieval": [], "generation": [], "e2e": []}
    if main_rank:  # one question at a time, as a user sees it: timed where nothing else generates
        lat = probe_latency(model, tokenizer, examples, None if closed else retrieve, top_k, cfg, fmt)
        m["retrieval_latency_s"] = M.percentiles(lat["retrieval"]) if lat["retrieval"] else {}
        m["generation_latency_s"] = M.percentiles(lat["generation"])
        m["e2e_latency_s"] = M.percentiles(lat["e2e"])
    return {"metrics": m, "rows": rows, "latency": lat}


def _sweep_and_robustness(
    model: Any,
    tokenizer: Any,
    examples: Sequence[QAExample],
    ranked: Sequence[Sequence[Passage]],
    top_k: int,
    cfg: EvalConfig,
    pool: Sequence[Passage],
    main_predictions: list[str],
    fmt: Any | None = None,
) -> dict[str, Any]:
    # Greedy decoding is deterministic, so a context set already generated for (k=1 reversed is k=1,
    # k=top_k is the main run, ...) is looked up instead of generated again.
    def key(contexts: Sequence[Sequence[Passage]]) -> tuple:
        return tuple(tuple(str(p.get("id")) for p in ctx) for ctx in contexts)

    done = {key([list(r[:top_k]) for r in ranked]): main_predictions}

    def run(contexts: list[list[Passage]]) -> list[str]:
        k = key(contexts)
        if k not in done:
            done[k] = generate_all(model, tokenizer, examples, contexts, cfg, fmt).predictions
        return done[k]

    out: dict[str, Any] = {"em_at_k": {}, "f1_at_k": {}}
    depth = max((len(r) for r in ranked), default=0)
    for k in sorted(set(cfg.topk_sweep)):
        if k < 0 or k > depth:
            continue
        preds = run([list(r[:k]) for r in ranked])
        out["em_at_k"][str(k)] = em_of(examples, preds)
        out["f1_at_k"][str(k)] = f1_of(examples, preds)
    if cfg.distractors:
        out["em_distractors"], out["distractors_added"] = {}, {}
    for n in sorted(set(d for d in cfg.distractors if d > 0)):
        contexts, added = [], []
        for i, (ex, r) in enumerate(zip(examples, ranked)):
            rng = question_rng(cfg.seed, i, 1000 + n)
            extra = pick_distractors(
                r,
                top_k,
                n,
                gold_ids=ex.gold_ids,
                answers=ex.answers,
                source=cfg.distractor_source,
                pool=pool,
                rng=rng,
            )
            contexts.append(insert_at_random(r[:top_k], extra, rng))
            added.append(len(extra))
        out["em_distractors"][str(n)] = em_of(examples, run(contexts))
        out["distractors_added"][str(n)] = float(np.mean(added))
    if cfg.order_checks:
        out["em_reversed"] = em_of(examples, run([reorder(r[:top_k], "reversed") for r in ranked]))
        shuffled = [
            reorder(r[:top_k], "shuffled", question_rng(cfg.seed, i, 7)) for i, r in enumerate(ranked)
        ]
        out["em_shuffled"] = em_of(examples, run(shuffled))
    return out


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    *,
    top_k: int,
    retrieve: Retrieve | None,
    cfg: EvalConfig,
    fmt: Any | None = None,
) -> dict[str, Any]:
    """One strategy end to end, retrieving with `retrieve` itself (no shared ranking)."""
    examples = examples[: cfg.max_questions] if cfg.max_questions else examples
    ranked = None
    if top_k > 0 and retrieve is not None:
        depth = retrieval_depth(cfg, top_k)
        ranked = []
        for i in range(0, len(examples), cfg.batch_size):
            ranked += retrieve([ex.question for ex in examples[i : i + cfg.batch_size]], depth)
    return evaluate_strategy(
        model, tokenizer, examples, ranked=ranked, top_k=top_k, cfg=cfg, retrieve=retrieve
    )


def retrieval_depth(cfg: EvalConfig, top_k: int) -> int:
    """How deep to retrieve once so that every check can take a prefix of the same ranking."""
    depth = max([top_k, *cfg.recall_ks, *cfg.topk_sweep])
    if cfg.distractor_source == "hard" and cfg.distractors:
        # Room to skip passages below the top-k that still contain the answer.
        depth = max(depth, top_k + 4 * max(cfg.distractors))
    return depth
