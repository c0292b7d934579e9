"""Retrieval alone, every mode side by side: dense, BM25, hybrid (configured and tuned), hybrid + re-rank.

    ragdist-eval eval.retrieval_only=true                      # the built-in airports (data.max_eval of them)
    ragdist-eval eval.retrieval_only=true corpus.path=C data.train=T data.eval=E data.max_eval=null

No generator is built or loaded and nothing is trained. Every mode asks the running service through
`RetrievalClient.retrieve` in batches, exactly as training does; hybrid's fusion weights are tuned on
the training questions and `retrieval.mode=auto`'s choice is reported (ragdist.retrieval.select).
Writes report.md, report.json and plots/recall_at_k.png.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragdist.data.qa import QAExample
from ragdist.eval.compare import retrieval_report
from ragdist.eval.report import clean, num, pct
from ragdist.index.snapshot import atomic_write_text
from ragdist.retrieval.config import HybridConfig, RetrievalConfig
from ragdist.retrieval.select import MemoEmbedder, choose_mode, format_table, rank, variant

log = logging.getLogger(__name__)

LABELS = {
    "dense": "dense",
    "bm25": "BM25",
    "hybrid": "hybrid (configured fusion)",
    "hybrid_tuned": "hybrid (fusion tuned on train)",
    "hybrid_rerank": "hybrid tuned + re-rank",
}


def _weights(h: HybridConfig) -> dict[str, Any]:
    return {"dense_weight": h.dense_weight, "lexical_weight": h.lexical_weight, "rrf_k": h.rrf_k, "depth": h.depth}


def evaluate_retrieval(
    rcfg: RetrievalConfig,
    embedder: Any,
    evals: Sequence[QAExample],
    train: Sequence[QAExample],
    *,
    ks: Sequence[int],
    batch_size: int,
) -> dict[str, Any]:
    """Every mode's P@k, R@k, nDCG@k, MRR and recall curve on `evals`; the service must be running."""
    t_start = time.perf_counter()
    ks = sorted({int(k) for k in ks if k > 0})
    depth = max(ks)
    qs = [ex.question for ex in evals]
    memo = MemoEmbedder(embedder)
    # Encode the eval questions once, timed on their own: the modes below then differ only in search.
    for i in range(0, len(qs), batch_size):
        memo.encode(qs[i : i + batch_size])
    encode_s = memo.encode_s
    notes = []
    choice = None
    tuned = rcfg.hybrid
    if train:
        _, choice = choose_mode(rcfg, memo, train)
        tuned = HybridConfig(**choice["hybrid"])
        log.info("retrieval.mode=auto would choose %s\n%s", choice["mode"], format_table(choice))
    else:
        notes.append("no training questions: the fusion weights are the configured ones")
    variants = {
        "dense": variant(rcfg, "dense"),
        "bm25": variant(rcfg, "bm25"),
        "hybrid": variant(rcfg, "hybrid"),
        "hybrid_tuned": variant(rcfg, "hybrid", tuned),
    }
    if rcfg.rerank.model:
        variants["hybrid_rerank"] = variant(rcfg, "hybrid", tuned, rerank=True)
    else:
        notes.append("hybrid + re-rank not run: no re-ranker configured (retrieval.rerank.model = a local "
                     "cross-encoder directory; none ships with ragdist, and nothing is downloaded)")
    results: dict[str, Any] = {}
    for name, v in variants.items():
        ranked, secs = rank(v, memo, qs, depth, batch_size)
        r = retrieval_report(evals, ranked, ks)
        r.update(seconds=secs, ms_per_question=1000 * secs / max(1, len(qs)),
                 config={"mode": v.mode, **(_weights(v.hybrid) if v.mode == "hybrid" else {}),
                         "rerank": v.rerank.model, "rerank_top_n": v.rerank.top_n if v.rerank.model else 0})
        results[name] = r
        log.info("retrieval %s: %s (%.1fs)", name,
                 {k: round(x, 3) for k, x in r["metrics"].items() if k.startswith("recall@")}, secs)
    return {
        "retrieval": results,
        "labels": {n: LABELS[n] for n in results},
        "selection": choice,
        "setup": {"questions": len(evals), "train_questions": len(train), "ks": ks, "depth": depth,
                  "batch_size": batch_size, "query_encoding_s": encode_s, "top_k": rcfg.top_k},
        "notes": notes,
        "wall_s": time.perf_counter() - t_start,
    }


def markdown(report: dict[str, Any]) -> str:
    """Recall, precision and nDCG at each k, one row per mode; the auto choice; notes; the plot."""
    res, labels, setup = report["retrieval"], report["labels"], report["setup"]
    ks = setup["ks"]

    def table(metric: str, title: str, extra: bool = False) -> list[str]:
        head = f"| mode | {' | '.join(f'{title}@{k}' for k in ks)} |" + (" MRR | ms/question |" if extra else "")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for name, r in res.items():
            m = r["metrics"]
            cells = [pct(m.get(f"{metric}@{k}")) for k in ks]
            if extra:
                cells += ["–" if m.get("mrr") is None else f"{m['mrr']:.3f}", num(r.get("ms_per_question"))]
            lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
        return lines + [""]

    s = setup
    md = [
        "# ragdist retrieval report",
        "",
        f"{s['questions']} questions from `{s.get('eval_file', '')}` against index snapshot "
        f"`{s.get('index_snapshot', '')}` ({s.get('passages', '?')} passages); each mode retrieved the top "
        f"{s['depth']} in batches of {s['batch_size']}. No generator was loaded. Wall time "
        f"{report.get('wall_s', 0):.0f} s in all (query encoding, once: {s['query_encoding_s']:.1f} s; "
        "ms/question below is search, fusion and re-ranking after that).",
        "",
        "## Recall@k (%, gold passage ids) and MRR",
        "",
        *table("recall", "R", extra=True),
        "## Precision@k (%)",
        "",
        *table("precision", "P"),
        "## nDCG@k (%)",
        "",
        *table("ndcg", "nDCG"),
        "## Answer in the top k (%, no gold ids needed)",
        "",
        *table("answer_recall", "ans"),
    ]
    sel = report.get("selection")
    if sel:
        md += [f"## retrieval.mode=auto would choose `{sel['mode']}`", "",
               f"Measured on `{s.get('train_file', '')}` ({sel['seconds']:.0f} s).", "", format_table(sel), ""]
    md += [f"> {n}" for n in report.get("notes", [])]
    if report.get("plots"):
        md += ["", *[f"![{Path(p).stem}]({p})" for p in report["plots"]]]
    return "\n".join(md) + "\n"


def write_retrieval_report(run_dir: str | Path, report: dict[str, Any], *, plots: bool = True) -> dict[str, Any]:
    """report.json (every figure), report.md and plots/recall_at_k.png, each written atomically."""
    from ragdist.eval.plots import recall_at_k

    run_dir = Path(run_dir)
    report = clean(report)
    if plots:
        named = {"retrieval": {report["labels"].get(n, n): r for n, r in report["retrieval"].items()}}
        gold = any(r.get("questions_with_gold") for r in report["retrieval"].values())
        p = recall_at_k(named, run_dir / "plots" / "recall_at_k.png", answer_curves=not gold,
                        zoom=True)
        report["plots"] = [str(p.relative_to(run_dir))] if p is not None else []
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, allow_nan=False))
    atomic_write_text(run_dir / "report.md", markdown(report))
    return report
