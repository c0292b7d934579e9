"""How to retrieve, chosen by measurement on training questions: fusion weights, then dense | bm25 | hybrid.

    mode, table = choose_mode(rcfg, embedder, train_examples)   # needs the service running
    resolve_mode(cfg.retrieval, embedder, train_examples)       # mode=auto -> the choice, in the config

A seeded sample of `retrieval.auto.questions` training questions is split in two: the first part
tunes hybrid's reciprocal-rank fusion (lexical weight x RRF constant, a small grid), the held-out
part compares dense, BM25 and the tuned hybrid by R@k (gold ids; answer-in-top-k where a file has
none), MRR breaking ties; a full tie keeps the simpler mode (dense, then bm25). Every figure comes
from `RetrievalClient.retrieve`, as training asks it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.data.qa import QAExample
from ragdist.errors import DataError
from ragdist.eval import metrics as M
from ragdist.eval.robustness import passage_text
from ragdist.retrieval.client import RetrievalClient
from ragdist.retrieval.config import HybridConfig, RetrievalConfig, retrieval_mode

log = logging.getLogger(__name__)

CHOICES = ("dense", "bm25", "hybrid")  # in order of preference on a tie: the simpler first


class MemoEmbedder:
    """An embedder that encodes each distinct text once: the clients of a sweep differ only in fusion."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.name = inner.name
        self._memo: dict[str, np.ndarray] = {}
        self.encode_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if new:
            t0 = time.perf_counter()
            self._memo.update(zip(new, self.inner.encode(new)))
            self.encode_s += time.perf_counter() - t0
        return np.stack([self._memo[t] for t in texts]).astype(np.float32, copy=False)


def variant(rcfg: RetrievalConfig, mode: str, hybrid: HybridConfig | None = None, *, rerank: bool = False
            ) -> RetrievalConfig:
    """`rcfg` answering in one fixed mode, re-ranked only if asked, with the cache off (every query is real)."""
    h = dataclasses.replace(hybrid or rcfg.hybrid, enabled=False)
    r = rcfg.rerank if rerank else dataclasses.replace(rcfg.rerank, model="")
    return dataclasses.replace(rcfg, mode=mode, hybrid=h, rerank=r, cache_size=0)


def rank(rcfg: RetrievalConfig, embedder: Any, questions: Sequence[str], depth: int, batch_size: int
         ) -> tuple[list[list[dict[str, Any]]], float]:
    """Each question's passages to `depth`, asked in batches; and the seconds it took."""
    client = RetrievalClient(rcfg, embedder=embedder)
    out: list[list[dict[str, Any]]] = []
    t0 = time.perf_counter()
    for i in range(0, len(questions), batch_size):
        out += client.retrieve(list(questions[i : i + batch_size]), depth)
    return out, time.perf_counter() - t0


def criterion(examples: Sequence[QAExample], k: int) -> str:
    """recall@k against gold ids where the questions have them, else answer_recall@k."""
    return f"recall@{k}" if any(ex.gold_ids for ex in examples) else f"answer_recall@{k}"


def score(examples: Sequence[QAExample], ranked: Sequence[Sequence[dict[str, Any]]], k: int) -> dict[str, float]:
    """R@k and MRR (gold ids) and answer-in-top-k, averaged over the questions (NaN-skipping)."""
    rows = []
    for ex, r in zip(examples, ranked):
        ids = [str(p["id"]) for p in r]
        row = M.retrieval_scores(ids, ex.gold_ids, [k]) if ex.gold_ids else {}
        row[f"answer_recall@{k}"] = M.answer_recall_at_k([passage_text(p) for p in r], ex.answers, k)
        rows.append(row)
    agg = M.aggregate(rows)
    return {key: agg[key] for key in (f"recall@{k}", "mrr", f"answer_recall@{k}") if key in agg}


def split(examples: Sequence[QAExample], n: int, holdout: float, seed: int) -> tuple[list[QAExample], list[QAExample]]:
    """A seeded sample of `n` questions: (tuning part, held-out part)."""
    pool = list(examples)
    random.Random(seed).shuffle(pool)
    pool = pool[:n]
    n_held = min(len(pool) - 1, max(1, round(len(pool) * holdout)))
    return pool[n_held:], pool[:n_held]


def _best(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    # Highest metric, then MRR; on a full tie the earliest row (the preferred one) wins.
    def key(i: int) -> tuple[float, float, int]:
        r = rows[i]
        m, mrr = r.get(metric, float("nan")), r.get("mrr", float("nan"))
        return (-1.0 if np.isnan(m) else m, -1.0 if np.isnan(mrr) else mrr, -i)

    return rows[max(range(len(rows)), key=key)]


def sweep_fusion(rcfg: RetrievalConfig, embedder: Any, examples: Sequence[QAExample], k: int
                 ) -> tuple[HybridConfig, list[dict[str, Any]]]:
    """Hybrid's fusion weights by R@k on `examples`: lexical weight (dense weight 1) x RRF constant.

    The configured fusion is measured first, so that without a measurable difference it stays.
    """
    a, metric = rcfg.auto, criterion(examples, k)
    qs = [ex.question for ex in examples]
    h0 = rcfg.hybrid
    # Only the ratio of the two weights matters to the ranking.
    configured = (h0.lexical_weight / h0.dense_weight if h0.dense_weight > 0 else float("inf"), int(h0.rrf_k))
    grid = [configured] + [(float(w), int(r)) for r in a.rrf_ks for w in a.lexical_weights
                           if (float(w), int(r)) != configured]
    rows = []
    for w, rrf_k in grid:
        h = dataclasses.replace(h0, dense_weight=1.0 if np.isfinite(w) else 0.0,
                                lexical_weight=w if np.isfinite(w) else 1.0, rrf_k=rrf_k)
        ranked, secs = rank(variant(rcfg, "hybrid", h), embedder, qs, k, a.batch_size)
        rows.append({"dense_weight": h.dense_weight, "lexical_weight": h.lexical_weight, "rrf_k": rrf_k,
                     **score(examples, ranked, k), "seconds": secs})
    best = _best(rows, metric)
    tuned = dataclasses.replace(h0, enabled=False, dense_weight=best["dense_weight"],
                                lexical_weight=best["lexical_weight"], rrf_k=best["rrf_k"])
    return tuned, rows


def choose_mode(rcfg: RetrievalConfig, embedder: Any, examples: Sequence[QAExample], *, k: int | None = None
                ) -> tuple[str, dict[str, Any]]:
    """The best of dense, bm25 and (tuned) hybrid by R@k on held-out training questions, and the table.

    `table["hybrid"]` holds the fusion weights the sweep chose (what mode=hybrid should then use).
    """
    a = rcfg.auto
    k = int(k or a.k or rcfg.top_k)
    if len(examples) < 2:
        raise DataError(f"retrieval.mode=auto: needs at least 2 training questions, got {len(examples)}")
    tune, held = split(examples, a.questions, a.holdout, a.seed)
    memo = embedder if isinstance(embedder, MemoEmbedder) else MemoEmbedder(embedder)
    t0 = time.perf_counter()
    tuned, sweep = sweep_fusion(rcfg, memo, tune, k)
    metric = criterion(held, k)
    qs = [ex.question for ex in held]
    modes = []
    for mode in CHOICES:
        ranked, secs = rank(variant(rcfg, mode, tuned if mode == "hybrid" else None), memo, qs, k, a.batch_size)
        modes.append({"mode": mode, **score(held, ranked, k), "seconds": secs})
    chosen = _best(modes, metric)["mode"]
    table = {
        "mode": chosen,
        "k": k,
        "metric": metric,
        "tune_questions": len(tune),
        "holdout_questions": len(held),
        "hybrid": {"dense_weight": tuned.dense_weight, "lexical_weight": tuned.lexical_weight,
                   "rrf_k": tuned.rrf_k, "depth": tuned.depth},
        "sweep": sweep,
        "modes": modes,
        "seconds": time.perf_counter() - t0,
    }
    return chosen, table


def format_table(table: dict[str, Any]) -> str:
    """The choice as markdown: the fusion sweep (tuning questions), then the modes (held-out questions)."""
    metric, k = table["metric"], table["k"]

    def pct(x: Any) -> str:
        return "–" if x is None or np.isnan(x) else f"{100 * float(x):.1f}"

    def mrr(x: Any) -> str:
        return "–" if x is None or np.isnan(x) else f"{float(x):.3f}"

    h = table["hybrid"]
    lines = [
        f"Fusion sweep on {table['tune_questions']} training questions ({metric} in %; the first row is the "
        "configured fusion):",
        "",
        "| dense weight | lexical weight | rrf_k | " + metric + " | MRR |",
        "|---|---|---|---|---|",
        *[f"| {r['dense_weight']:g} | {r['lexical_weight']:g} | {r['rrf_k']} | {pct(r.get(metric))} | "
          f"{mrr(r.get('mrr'))} |" for r in table["sweep"]],
        "",
        f"Chosen fusion: dense weight {h['dense_weight']:g}, lexical weight {h['lexical_weight']:g}, "
        f"rrf_k {h['rrf_k']}. Modes on "
        f"{table['holdout_questions']} held-out training questions (k = {k}):",
        "",
        f"| mode | {metric} | MRR | answer in top-{k} |",
        "|---|---|---|---|",
        *[f"| {r['mode']}{' (chosen)' if r['mode'] == table['mode'] else ''} | {pct(r.get(metric))} | "
          f"{mrr(r.get('mrr'))} | {pct(r.get(f'answer_recall@{k}'))} |" for r in table["modes"]],
    ]
    return "\n".join(lines)


def resolve_mode(node: Any, embedder: Any, examples: Sequence[QAExample], *, out: str | Path | None = None
                 ) -> dict[str, Any] | None:
    """A run config's `retrieval` node with mode=auto: the measured choice written into it (mode and,
    for hybrid, the fusion weights), the table logged and saved to `out`. Any other mode: untouched."""
    from ragdist.config import as_object

    rcfg = as_object(node) if not isinstance(node, RetrievalConfig) else node
    if retrieval_mode(rcfg) != "auto":
        return None
    mode, table = choose_mode(rcfg, embedder, examples)
    node.mode = mode
    node.hybrid.enabled = False
    if mode == "hybrid":
        node.hybrid.dense_weight = table["hybrid"]["dense_weight"]
        node.hybrid.lexical_weight = table["hybrid"]["lexical_weight"]
        node.hybrid.rrf_k = table["hybrid"]["rrf_k"]
    log.info("retrieval.mode=auto -> %s (%.0fs)\n%s", mode, table["seconds"], format_table(table))
    if out is not None:
        from ragdist.eval.report import clean
        from ragdist.index.snapshot import atomic_write_text

        atomic_write_text(Path(out), json.dumps(clean(table), indent=2))
    return table
