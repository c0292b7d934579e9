"""PNG plots of a comparison report (matplotlib, Agg: no display needed).

Figures are built with matplotlib's object API rather than pyplot, so no global figure state or
interactive backend is involved, and each file is written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ragdist.eval.compare import LABELS

PLOTS = ["em_vs_topk", "recall_at_k", "latency", "robustness", "tokens"]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _labels(report: dict[str, Any]) -> dict[str, str]:
    return {n: s.get("label") or LABELS.get(n, n) for n, s in report.get("strategies", {}).items()}


def _v(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _em_axis(ax: Any, values: list[float]) -> None:
    # Percent axis from 0; a little headroom so a line at 0 or 100 stays visible.
    finite = [v for v in values if np.isfinite(v)]
    ax.set_ylim(0, min(102.0, max([5.0, *finite]) * 1.15))


def _closed_book_lines(ax: Any, results: dict[str, Any], labels: dict[str, str]) -> list[float]:
    """Rows without retrieval as horizontal reference lines; returns their values."""
    out = []
    for name, m in results.items():
        if not m.get("top_k"):
            v = 100 * _v(m.get("em"))
            ax.axhline(v, linestyle="--", color="grey", label=labels.get(name, name))
            out.append(v)
    return out


def em_vs_topk(report: dict[str, Any], path: Path) -> Path | None:
    results, labels = report["results"], _labels(report)
    curves = {n: m["em_at_k"] for n, m in results.items() if m.get("em_at_k")}
    if not curves:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    values = []
    for name, c in curves.items():
        ks = sorted(int(k) for k in c)
        ys = [100 * _v(c[str(k)]) for k in ks]
        ax.plot(ks, ys, marker="o", label=labels.get(name, name))
        values += ys
    values += _closed_book_lines(ax, results, labels)
    _em_axis(ax, values)
    _label(ax, "EM vs top-k", "passages in the prompt (top-k)", "exact match (%)")
    return _save(fig, path)


def _label(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def recall_at_k(
    report: dict[str, Any], path: Path, *, answer_curves: bool = True, zoom: bool = False
) -> Path | None:
    """Recall@k (gold ids) per retriever; `answer_curves` adds answer-in-top-k as dashed lines;
    `zoom` starts the y axis just below the lowest point (retrievers a point apart stay apart)."""
    retrieval = report.get("retrieval") or {}
    if not retrieval:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    values: list[float] = []
    for name, r in retrieval.items():
        ks = np.arange(1, r["depth"] + 1)
        rc = np.array([_v(x) for x in r["recall_curve"]])
        if np.isfinite(rc).any():
            ax.plot(ks, 100 * rc, marker=".", label=f"{name}: recall@k (gold ids)")
            values += list(100 * rc)
        if not answer_curves:
            continue
        ac = 100 * np.array([_v(x) for x in r["answer_recall_curve"]])
        ax.plot(ks, ac, linestyle="--", label=f"{name}: answer in top-k")
        values += list(ac)
    finite = [v for v in values if np.isfinite(v)]
    ax.set_ylim(max(0.0, np.floor(min(finite)) - 2) if zoom and finite else 0, 101 if zoom else 102)
    _label(ax, "Retrieval recall@k", "k", "%")
    return _save(fig, path)


def latency(report: dict[str, Any], path: Path) -> Path | None:
    samples = report.get("latency_samples") or {}
    if not samples:
        return None
    stages = [("retrieval", "retrieval"), ("generation", "generation"), ("e2e", "end to end")]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, stages):
        names = [n for n, s in samples.items() if s.get(key)]
        if names:
            ax.boxplot([1000 * np.asarray(samples[n][key]) for n in names], showfliers=True)
            ax.set_xticks(range(1, len(names) + 1))
            # Row keys, not the long labels: five long labels under a narrow panel overlap.
            ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{title} latency")
        ax.set_ylabel("ms per question")
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def robustness(report: dict[str, Any], path: Path) -> Path | None:
    results, labels = report["results"], _labels(report)
    rows = {n: m for n, m in results.items() if m.get("top_k")}
    if not rows:
        return None
    ns = sorted({int(d) for m in rows.values() for d in m.get("em_distractors", {})})
    conds = [("clean", lambda m: m.get("em"))]
    conds += [(f"+{n} distractors", lambda m, n=n: m.get("em_distractors", {}).get(str(n))) for n in ns]
    conds += [("reversed", lambda m: m.get("em_reversed")), ("shuffled", lambda m: m.get("em_shuffled"))]
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(conds))
    width = 0.8 / len(rows)
    values = []
    for i, (name, m) in enumerate(rows.items()):
        ys = [100 * _v(f(m)) for _, f in conds]
        ax.bar(x + i * width - 0.4 + width / 2, ys, width, label=labels.get(name, name))
        values += ys
    values += _closed_book_lines(ax, results, labels)
    _em_axis(ax, values)
    ax.set_xticks(x)
    ax.set_xticklabels([c for c, _ in conds], fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_title("EM under distractors and passage order")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def tokens(report: dict[str, Any], path: Path) -> Path | None:
    results, labels = report["results"], _labels(report)
    if not results:
        return None
    names = list(results)
    q = np.array([_v(results[n].get("question_tokens")) for n in names])
    added = np.array([_v(results[n].get("retrieval_added_tokens")) for n in names])
    gen = np.array([_v(results[n].get("generated_tokens")) for n in names])
    fig = Figure(figsize=(7.5, 0.6 * len(names) + 1.8))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, q, label="question")
    ax.barh(y, added, left=q, label="added by retrieval")
    ax.barh(y, gen, left=q + added, label="generated")
    ax.set_yticks(y)
    ax.set_yticklabels([labels.get(n, n) for n in names], fontsize=8)
    ax.invert_yaxis()  # table order, top to bottom
    ax.set_xlabel("tokens per question (mean)")
    ax.set_title("Token cost")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Every plot that has data, as PNG files under `out_dir`; returns their paths."""
    out = Path(out_dir)
    makers = {
        "em_vs_topk": em_vs_topk,
        "recall_at_k": recall_at_k,
        "latency": latency,
        "robustness": robustness,
        "tokens": tokens,
    }
    paths = [makers[name](report, out / f"{name}.png") for name in PLOTS]
    return [p for p in paths if p is not None]
