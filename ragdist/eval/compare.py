"""The comparison: which rows exist, where their generator and retriever come from, and running them.

Rows (ragdist.eval.runner.STRATEGIES, in table order):
  closed_book      the generator fine-tuned on (question, answer) alone, asked without passages
  base_rag         the base generator (never fine-tuned) given the retrieved passages at inference
  closed_book_rag  the closed-book fine-tuned generator given the retrieved passages at inference
  pretext          the reader after its pretext stage alone (reading tasks from the corpus, no questions),
                   given the retrieved passages: what reading buys before any QA fine-tuning
  rag              the generator fine-tuned with retrieved passages, evaluated with retrieval
  joint            a jointly trained generator + query encoder, with its own index snapshot
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.data.qa import QAExample
from ragdist.errors import ConfigError
from ragdist.eval import metrics as M
from ragdist.eval.generation import eval_device, from_main, is_main
from ragdist.eval.robustness import Passage, passage_text
from ragdist.eval.runner import STRATEGIES, EvalConfig, Retrieve, evaluate_strategy, retrieval_depth

log = logging.getLogger(__name__)

BASE = "<base>"  # the generator built from the run's model config (the starting point of every row)

LABELS = {
    "closed_book": "fine-tune only (closed book)",
    "base_rag": "RAG at inference only (base model)",
    "closed_book_rag": "RAG at inference only (closed-book fine-tuned)",
    "pretext": "reader pretext only (no QA fine-tuning)",
    "rag": "RAG fine-tuned (with retrieval)",
    "joint": "RAG fine-tuned + joint retriever",
}


@dataclass
class Strategy:
    name: str
    model: str  # a saved generator dir, or BASE
    retriever: str | None  # "main" | "joint" | None for closed book
    label: str = ""
    checks: bool = True  # run the top-k sweep and robustness checks (off for an untrained generator)
    fmt: Any = None  # the prompt format its generator was trained with (trainer.examples)

    def __post_init__(self) -> None:
        self.label = self.label or LABELS.get(self.name, self.name)


def plan(
    ckpts: dict[str, str], *, wanted: Sequence[str], base: bool, joint_checkpoint: str | None
) -> list[Strategy]:
    """The rows that can be evaluated from what exists, in table order, limited to `wanted`."""
    unknown = [w for w in wanted if w not in STRATEGIES]
    if unknown:
        raise ConfigError(f"eval.strategies: unknown {unknown} (known: {STRATEGIES})")
    rows: dict[str, Strategy] = {}
    if "closed_book" in ckpts:
        rows["closed_book"] = Strategy("closed_book", ckpts["closed_book"], None)
        # The same model as the rag row would be a duplicate (eval.checkpoint gives one model for both).
        if ckpts.get("rag") != ckpts["closed_book"]:
            rows["closed_book_rag"] = Strategy("closed_book_rag", ckpts["closed_book"], "main")
    if base:
        rows["base_rag"] = Strategy("base_rag", BASE, "main")
    if "pretext" in ckpts:
        # The main figures only: the rag row is the one whose robustness matters.
        rows["pretext"] = Strategy("pretext", ckpts["pretext"], "main", checks=False)
    if "rag" in ckpts:
        rows["rag"] = Strategy("rag", ckpts["rag"], "main")
    if joint_checkpoint:
        rows["joint"] = Strategy("joint", joint_checkpoint, "joint")
    return [rows[n] for n in STRATEGIES if n in rows and n in wanted]


# --------------------------------------------------------------------------- joint runs


@dataclass
class JointRun:
    """What a joint-training run must provide to be evaluated as a row."""

    run_dir: str
    checkpoint: str
    snapshot: str
    encoder: Any  # an EmbedderConfig for the query encoder
    train_file: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    fmt: Any = None  # its trainer.examples (prompt templates)


def resolve_joint(cfg: EvalConfig, default_embedder: Any) -> JointRun:
    """Find the generator, index snapshot and query encoder of `eval.joint_run` (overrides first)."""
    import dataclasses

    from ragdist.config import as_object, load_resolved
    from ragdist.index import snapshot as snap
    from ragdist.prompts import recorded_format

    run = Path(cfg.joint_run)
    if not run.is_dir():
        raise ConfigError(f"eval.joint_run={cfg.joint_run!r}: no such run directory")
    saved = load_resolved(run / "resolved.yaml") if (run / "resolved.yaml").is_file() else None

    tried = (
        [cfg.joint_checkpoint]
        if cfg.joint_checkpoint
        else [str(run / "checkpoints" / v) for v in ("joint", "rag")]
    )
    ckpt = next((c for c in tried if (Path(c) / "config.json").is_file()), None)
    if ckpt is None:
        raise ConfigError(f"eval.joint_run={cfg.joint_run!r}: no generator checkpoint (looked for {tried})")

    snapshot = cfg.joint_snapshot or (saved.index.snapshot if saved is not None else "")
    if not snapshot:
        raise ConfigError(
            f"eval.joint_run={cfg.joint_run!r}: no index snapshot (set eval.joint_snapshot or index.snapshot in its resolved.yaml)"
        )
    snapshot = str(snap.resolve(snapshot))
    snap.read_manifest(snapshot)

    encoder = dataclasses.replace(
        as_object(saved.embedder) if saved is not None else default_embedder, progress=False
    )
    enc_dir = cfg.joint_encoder or (str(run / "retriever") if (run / "retriever").is_dir() else "")
    if enc_dir:
        if not Path(enc_dir).is_dir():
            raise ConfigError(f"eval.joint_encoder={enc_dir!r}: no such directory")
        # A sentence-transformers dir has modules.json; anything else is read as a plain HF encoder.
        kind = "sentence-transformers" if (Path(enc_dir) / "modules.json").is_file() else "hf"
        encoder = dataclasses.replace(encoder, name=enc_dir, kind=kind)

    training: dict[str, Any] = {}
    for name in ("joint", "rag"):
        f = run / f"train_{name}.json"
        if f.is_file():
            training = json.loads(f.read_text())
            training.pop("history", None)
            break
    return JointRun(
        run_dir=str(run),
        checkpoint=ckpt,
        snapshot=snapshot,
        encoder=encoder,
        train_file=str(saved.data.train) if saved is not None else "",
        training=training,
        # joint training reads one passage per row whatever trainer.examples says; its checkpoint records it
        fmt=recorded_format(ckpt, as_object(saved.trainer.examples) if saved is not None else None),
    )


# --------------------------------------------------------------------------- retrieval


class ServiceRetriever:
    """Text in, passages out, through the retrieval service exactly as training queries it (dense,
    hybrid or re-ranked by config), but with the client's cache off so that latency is real."""

    def __init__(self, rcfg: Any, embedder: Any, *, index_embedder: str | None = None):
        import dataclasses

        from ragdist.retrieval.retriever import ShardedRetriever

        self.client = ShardedRetriever(
            dataclasses.replace(rcfg, cache_size=0), embedder=embedder, index_embedder=index_embedder
        )
        self.partial_calls = 0

    def __call__(self, questions: list[str], k: int) -> list[list[Passage]]:
        out = self.client.retrieve(list(questions), k)
        if getattr(self.client, "last_partial", False):
            self.partial_calls += 1
            log.warning("retrieval answered from some shards only (a shard is down): results are partial")
        return out


def rank_all(
    retrieve: Retrieve, examples: Sequence[QAExample], depth: int, batch_size: int
) -> tuple[list[list[Passage]], float]:
    """Each question's passages to `depth`, and the batched retrieval time per question."""
    ranked: list[list[Passage]] = []
    t0 = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        ranked += retrieve([ex.question for ex in examples[i : i + batch_size]], depth)
    return ranked, (time.perf_counter() - t0) / max(1, len(examples))


def retrieval_report(
    examples: Sequence[QAExample], ranked: Sequence[Sequence[Passage]], ks: Sequence[int]
) -> dict[str, Any]:
    """P@k, R@k, nDCG@k, MRR against gold ids (questions without gold ids are skipped), answer recall@k,
    and full recall curves for k = 1..depth."""
    depth = max((len(r) for r in ranked), default=0)
    ks = sorted({k for k in ks if 0 < k <= max(depth, 1)})
    per_q, curve, ans_curve = [], [], []
    for ex, r in zip(examples, ranked):
        ids = [str(p["id"]) for p in r]
        texts = [passage_text(p) for p in r]
        row = M.retrieval_scores(ids, ex.gold_ids, ks) if ex.gold_ids else {}
        row.update({f"answer_recall@{k}": M.answer_recall_at_k(texts, ex.answers, k) for k in ks})
        per_q.append(row)
        curve.append(
            [M.recall_at_k(ids, ex.gold_ids, k) if ex.gold_ids else float("nan") for k in range(1, depth + 1)]
        )
        ans_curve.append([M.answer_recall_at_k(texts, ex.answers, k) for k in range(1, depth + 1)])
    agg = M.aggregate(per_q)
    with_gold = sum(1 for ex in examples if ex.gold_ids)
    curve_arr = np.asarray(curve, dtype=np.float64).reshape(len(curve), depth)
    return {
        "metrics": agg,
        "questions_with_gold": with_gold,
        "depth": depth,
        "recall_curve": [float(np.nanmean(c)) if with_gold else float("nan") for c in curve_arr.T],
        "answer_recall_curve": np.asarray(ans_curve, dtype=np.float64)
        .reshape(len(ans_curve), depth)
        .mean(0)
        .tolist(),
    }


# --------------------------------------------------------------------------- the run


def run_comparison(
    strategies: Sequence[Strategy],
    examples: Sequence[QAExample],
    *,
    cfg: EvalConfig,
    top_k: int,
    retrievers: dict[str, Retrieve],
    load_model: Callable[[str], tuple[Any, Any]],
    pools: dict[str, Sequence[Passage]] | None = None,
    nli: Any | None = None,
) -> dict[str, Any]:
    """Evaluate every row; retrieval happens once per retriever and is shared by its rows."""
    pools = pools or {}
    depth = retrieval_depth(cfg, top_k)
    ranked: dict[str, list[list[Passage]]] = {}
    retrieval: dict[str, Any] = {}
    for name in sorted({s.retriever for s in strategies if s.retriever}):
        if name not in retrievers and is_main():
            raise ConfigError(
                f"no retriever {name!r} for rows {[s.name for s in strategies if s.retriever == name]}"
            )
        # Retrieved once, on rank 0; every rank generates from the same passages.
        ranked[name], batched_s = from_main(lambda r=name: rank_all(retrievers[r], examples, depth, cfg.batch_size))
        retrieval[name] = retrieval_report(examples, ranked[name], [*cfg.recall_ks, top_k])
        retrieval[name]["batched_retrieval_s_per_q"] = batched_s
        retrieval[name]["partial_calls"] = getattr(retrievers.get(name), "partial_calls", 0)
        log.info(
            "retrieval %s: depth %d, %s",
            name,
            depth,
            {k: round(v, 3) for k, v in retrieval[name]["metrics"].items() if k.startswith("recall@")},
        )
    results, predictions, latency = {}, {}, {}
    for s in strategies:
        t0 = time.perf_counter()
        model, tokenizer = load_model(s.model)
        model = model.to(eval_device())
        out = evaluate_strategy(
            model,
            tokenizer,
            examples,
            ranked=ranked.get(s.retriever) if s.retriever else None,
            top_k=top_k if s.retriever else 0,
            cfg=cfg,
            retrieve=retrievers.get(s.retriever) if s.retriever else None,
            pool=pools.get(s.retriever, ()) if s.retriever else (),
            nli=nli,
            checks=s.checks,
            fmt=s.fmt,
        )
        del model
        m = out["metrics"]
        if not is_main():  # the other ranks only helped generate
            continue
        if s.retriever:
            m.update(retrieval[s.retriever]["metrics"])
            m["batched_retrieval_s_per_q"] = retrieval[s.retriever]["batched_retrieval_s_per_q"]
        m["eval_s"] = time.perf_counter() - t0
        results[s.name], predictions[s.name], latency[s.name] = m, out["rows"], out["latency"]
        log.info(
            "eval %s: EM %.3f F1 %.3f faithfulness %.3f hallucination %.3f (%.0fs)",
            s.name,
            m["em"],
            m["f1"],
            m.get("faithfulness", float("nan")),
            m["hallucination"],
            m["eval_s"],
        )
    return {
        "results": results,
        "predictions": predictions,
        "latency_samples": latency,
        "retrieval": retrieval,
        "strategies": {
            s.name: {"label": s.label, "model": s.model, "retriever": s.retriever} for s in strategies
        },
    }
