"""The comparison report: the table on the console, report.md and report.json in the run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ragdist.eval.compare import LABELS
from ragdist.index.snapshot import atomic_write_text

HEADER = "| strategy | EM | F1 | faithfulness | hallucination | R@k | p50 latency | tokens/q |"


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: Any) -> str:
    return "–" if _nan(x) else f"{100 * float(x):.1f}"


def num(x: Any, digits: int = 3) -> str:
    if _nan(x):
        return "–"
    x = float(x)
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def ms(stats: Any, key: str = "p50") -> str:
    if not isinstance(stats, dict) or _nan(stats.get(key)):
        return "–"
    return num(1000 * float(stats[key]))


def _label(name: str, labels: dict[str, str] | None) -> str:
    return (labels or {}).get(name) or LABELS.get(name, name)


def _rows(head: str, lines: list[str]) -> list[str]:
    return [head, "|" + "---|" * (head.count("|") - 1), *lines]


def table(results: dict[str, dict[str, Any]], labels: dict[str, str] | None = None) -> str:
    """The headline table: one row per strategy, measured numbers only."""
    lines = []
    for name, m in results.items():
        k = m.get("top_k", 0)
        lines.append(
            f"| {_label(name, labels)} | {pct(m.get('em'))} | {pct(m.get('f1'))} | {pct(m.get('faithfulness'))} | "
            f"{pct(m.get('hallucination'))} | {pct(m.get(f'recall@{k}')) if k else '–'} | "
            f"{ms(m.get('e2e_latency_s') or m.get('generation_latency_s'))} | {num(m.get('tokens_per_q'))} |"
        )
    return "\n".join(_rows(HEADER, lines))


def _retrieval_section(report: dict[str, Any]) -> list[str]:
    out = []
    for name, r in report.get("retrieval", {}).items():
        m = r["metrics"]
        ks = sorted(int(key.split("@")[1]) for key in m if key.startswith("answer_recall@"))
        lines = [
            f"| {k} | {pct(m.get(f'precision@{k}'))} | {pct(m.get(f'recall@{k}'))} | {pct(m.get(f'ndcg@{k}'))} | "
            f"{pct(m.get(f'answer_recall@{k}'))} |"
            for k in ks
        ]
        out += [
            f"Retriever `{name}`: MRR {num(m.get('mrr'))} over the top {r['depth']}, "
            f"{r['questions_with_gold']} of the questions have gold passage ids; "
            f"batched retrieval {ms({'p50': r.get('batched_retrieval_s_per_q')})} ms/question.",
            "",
            *_rows("| k | P@k | R@k | nDCG@k | answer in top-k |", lines),
            "",
        ]
    return out


def _latency_section(results: dict[str, dict[str, Any]], labels: dict[str, str] | None) -> list[str]:
    lines = []
    for name, m in results.items():
        r, g, e = m.get("retrieval_latency_s"), m.get("generation_latency_s"), m.get("e2e_latency_s")
        lines.append(
            f"| {_label(name, labels)} | {ms(r)} | {ms(r, 'p95')} | {ms(r, 'p99')} | {ms(g)} | {ms(g, 'p95')} | "
            f"{ms(g, 'p99')} | {ms(e)} | {ms(e, 'p95')} | {ms(e, 'p99')} | "
            f"{ms({'p50': m.get('batched_generation_s_per_q')})} |"
        )
    head = (
        "| strategy | retrieval p50 | p95 | p99 | generation p50 | p95 | p99 | end to end p50 | p95 | p99 "
        "| batched generation ms/q |"
    )
    return _rows(head, lines)


def _tokens_section(results: dict[str, dict[str, Any]], labels: dict[str, str] | None) -> list[str]:
    lines = [
        f"| {_label(n, labels)} | {num(m.get('prompt_tokens'))} | {num(m.get('prompt_tokens_p95'))} | "
        f"{num(m.get('generated_tokens'))} | {num(m.get('generated_tokens_p95'))} | "
        f"{num(m.get('retrieval_added_tokens'))} | {num(m.get('retrieval_added_tokens_p95'))} |"
        for n, m in results.items()
    ]
    head = "| strategy | prompt mean | prompt p95 | generated mean | generated p95 | added by retrieval mean | p95 |"
    return _rows(head, lines)


def _robustness_section(
    results: dict[str, dict[str, Any]], labels: dict[str, str] | None, source: str
) -> list[str]:
    with_ctx = {n: m for n, m in results.items() if m.get("top_k")}
    if not with_ctx:
        return []
    ns = sorted({int(d) for m in with_ctx.values() for d in m.get("em_distractors", {})})
    orders = any("em_reversed" in m for m in with_ctx.values())
    cols = ["clean"] + [f"+{n} {source} distractor{'s' if n > 1 else ''}" for n in ns]
    cols += ["reversed", "shuffled"] if orders else []
    lines = []
    for name, m in with_ctx.items():
        cells = [pct(m.get("em"))] + [pct(m.get("em_distractors", {}).get(str(n))) for n in ns]
        cells += [pct(m.get("em_reversed")), pct(m.get("em_shuffled"))] if orders else []
        lines.append(f"| {_label(name, labels)} | " + " | ".join(cells) + " |")
    return _rows("| strategy | " + " | ".join(cols) + " |", lines)


def _topk_section(results: dict[str, dict[str, Any]], labels: dict[str, str] | None) -> list[str]:
    ks = sorted({int(k) for m in results.values() for k in m.get("em_at_k", {})})
    if not ks:
        return []
    lines = [
        f"| {_label(n, labels)} | " + " | ".join(pct(m.get("em_at_k", {}).get(str(k))) for k in ks) + " |"
        for n, m in results.items()
        if m.get("em_at_k")
    ]
    return _rows("| strategy | " + " | ".join(f"k={k}" for k in ks) + " |", lines)


def _nli_section(results: dict[str, dict[str, Any]], labels: dict[str, str] | None, model: str) -> list[str]:
    lines = [
        f"| {_label(n, labels)} | {pct(m.get('faithfulness'))} | {pct(m.get('faithfulness_nli'))} | {num(m.get('nli_score'))} |"
        for n, m in results.items()
        if "faithfulness_nli" in m
    ]
    if not lines:
        return []
    return [
        f"Model-based check with `{model}`:",
        "",
        *_rows("| strategy | string match | NLI | mean NLI score |", lines),
    ]


def _pretext_section(report: dict[str, Any], labels: dict[str, str] | None) -> list[str]:
    """The reader's pretext stage: its steps and loss, and what it answers before and after QA fine-tuning."""
    s = (report.get("training") or {}).get("pretext")
    if not s:
        return []
    results = report["results"]
    k = (report.get("setup") or {}).get("top_k")
    out = [
        "## Reader pretext training",
        "",
        f"Before any question, the reader trained {s.get('steps')} steps on reading tasks made from the corpus "
        "(a salient span — name, code, number — masked out of a passage's sentence is the query; the retrieval "
        "service returns its passages; the target is the span, copied from the passage that holds it): "
        f"loss {float(s.get('first_loss', float('nan'))):.3f} → {float(s.get('last_loss', float('nan'))):.3f} "
        f"in {float(s.get('elapsed_s', 0)):.0f}s on {s.get('world_size')} ranks. The RAG fine-tuned row starts from "
        "these weights.",
        "",
    ]
    rows = [n for n in ("pretext", "rag") if n in results]
    if rows:
        out += _rows("| reader | EM | F1 |", [
            f"| {_label(n, labels)} | {pct(results[n].get('em'))} | {pct(results[n].get('f1'))} |" for n in rows
        ]) + ["", f"EM and F1 in %, k = {k} passages.", ""]  # fmt: skip
    return out


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    labels = {n: s["label"] for n, s in report.get("strategies", {}).items()}
    setup = report.get("setup", {})
    k = setup.get("top_k") or next((m.get("top_k") for m in results.values() if m.get("top_k")), 0)
    md = ["# ragdist evaluation report", ""]
    if setup:
        md += [
            f"{setup.get('questions')} held-out questions from `{setup.get('eval_file')}` "
            f"(never in `{setup.get('train_file')}`); base generator: {setup.get('base_model')}; "
            f"index snapshot `{setup.get('index_snapshot')}`.",
            "",
        ]
    md += [
        table(results, labels),
        "",
        f"EM, F1, faithfulness, hallucination and R@k in %, k = {k} passages. Faithfulness: share of given "
        "answers found in the passages the generator saw (after normalization); hallucination: share of questions "
        "answered wrongly with an answer not in those passages. p50 latency: retrieval + generation for one "
        "question at a time, ms. tokens/q: prompt + generated tokens per question.",
        "",
    ]
    if report.get("retrieval"):
        md += ["## Retrieval", "", *_retrieval_section(report)]
    md += ["## Latency (ms per question)", "", *_latency_section(results, labels), ""]
    md += ["## Token cost (per question)", "", *_tokens_section(results, labels), ""]
    rob = _robustness_section(results, labels, setup.get("distractor_source", ""))
    if rob:
        md += ["## Robustness (EM %)", "", *rob, ""]
    topk = _topk_section(results, labels)
    if topk:
        md += ["## EM vs number of passages (%)", "", *topk, ""]
    nli = _nli_section(results, labels, setup.get("nli_model", ""))
    if nli:
        md += ["## Faithfulness, model-based", "", *nli, ""]
    joint = report.get("joint_retriever") or {}
    if joint:
        from ragdist.joint.report import recall_table

        md += ["## Joint retriever training", "",
               "Retrieval on the eval questions, in %: the query encoder (and index) as joint training started → as it ended.",
               "", recall_table(list(joint.items())), ""]  # fmt: skip
    md += _pretext_section(report, labels)
    training = report.get("training") or {}
    if training:
        md += ["## Training", ""]
        for name, s in training.items():
            if not s:
                continue
            md.append(
                f"- {name}: {s.get('steps')} steps on {s.get('world_size')} ranks in {float(s.get('elapsed_s', 0)):.0f}s; "
                f"loss {float(s.get('first_loss', float('nan'))):.3f} → {float(s.get('last_loss', float('nan'))):.3f}"
            )
        md.append("")
    for note in report.get("notes", []):
        md.append(f"> {note}")
    if report.get("notes"):
        md.append("")
    if report.get("plots"):
        md += ["## Plots", ""]
        md += [f"![{Path(p).stem}]({p})" for p in report["plots"]]
        md.append("")
    return "\n".join(md)


def clean(x: Any) -> Any:
    """JSON-safe: NaN and inf become null (strict JSON readers reject NaN), numpy scalars become floats."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(
    run_dir: str | Path, results: dict[str, dict[str, Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    """report.json (every figure) and report.md, each written atomically."""
    run_dir = Path(run_dir)
    report = clean({"results": results, **extra})
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, default=str, allow_nan=False))
    atomic_write_text(run_dir / "report.md", markdown(report))
    return report
