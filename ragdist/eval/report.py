"""The run report: a table on the console, report.md and report.json in the run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ragdist.index.snapshot import atomic_write_text

LABELS = {
    "rag": "RAG fine-tuned (with retrieval)",
    "closed_book": "fine-tune only (closed book)",
}


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3g}" if isinstance(x, float) else str(x)


def table(results: dict[str, dict[str, Any]]) -> str:
    head = "| strategy | EM | F1 | R@1 | R@k | k | p50 retrieval ms | p50 generation ms | prompt tokens/q | n |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in results.items():
        k = m.get("top_k", 0)
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                LABELS.get(name, name),
                _fmt(m.get("em"), True),
                _fmt(m.get("f1"), True),
                _fmt(m.get("recall@1"), True),
                _fmt(m.get(f"recall@{k}"), True) if k else "–",
                k,
                _fmt(1000 * m["retrieval_latency_s"]["p50"]) if m.get("retrieval_latency_s") else "–",
                _fmt(1000 * m["generation_latency_s"]["p50"]),
                _fmt(m.get("prompt_tokens")),
                m.get("n"),
            )
        )
    return "\n".join(lines)


def write_report(run_dir: str | Path, results: dict[str, dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(run_dir)
    report = {"results": results, **extra}
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, default=str))
    md = ["# ragdist run report", "", table(results), ""]
    for key, value in extra.items():
        if isinstance(value, dict) and key == "training":
            md += ["## Training", ""]
            for name, s in value.items():
                md.append(
                    f"- {name}: {s['steps']} steps on {s['world_size']} ranks in {s['elapsed_s']:.0f}s; "
                    f"loss {s['first_loss']:.3f} → {s['last_loss']:.3f}"
                )
            md.append("")
    atomic_write_text(run_dir / "report.md", "\n".join(md))
    return report
