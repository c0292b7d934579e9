"""Hydra multirun sweeps: one wandb group per sweep, and a summary table of every job's metrics at the end.

Registered for every run in conf/config.yaml (`hydra.callbacks.sweep_summary`); it only acts in
multirun mode:

    ragdist-train -m index.num_shards=1,2,4 retrieval.top_k=1,3,5            # local, one job after another
    ragdist-train -m hydra/launcher=slurm index.num_shards=1,2 retrieval.top_k=1,3   # as SLURM jobs

When the sweep ends, <sweep dir>/summary.md and summary.json hold one row per job: the overrides
that vary, its status, and its report's metrics (EM, F1, recall@k per strategy; final training loss).
`hydra.callbacks.sweep_summary.metric=rag/em` picks the column that names the best job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ragdist.index.snapshot import atomic_write_text

log = logging.getLogger("ragdist")

SUMMARY_METRICS = ("em", "f1")  # shown per strategy, plus recall@<top_k>


def sweep_group(sweep_dir: str | Path) -> str:
    """The wandb group a sweep's runs share: named after its directory, unique per sweep."""
    p = Path(sweep_dir)
    return f"sweep-{p.parent.name}-{p.name}" if p.parent.name not in ("", "multirun") else f"sweep-{p.name}"


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()]
    return sorted(dirs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def job_row(job_dir: Path) -> dict[str, Any]:
    """One job of a sweep: its overrides and, if it wrote a report, the report's scalar metrics."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict[str, Any] = {
        "job": job_dir.name,
        "dir": str(job_dir),
        "overrides": list(overrides),
        "metrics": {},
    }
    report_path = job_dir / "report.json"
    if not report_path.is_file():
        row["status"] = "no report"
        return row
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as e:
        row["status"] = f"unreadable report.json ({e.msg}, line {e.lineno})"
        return row
    row["status"] = "completed"
    metrics = row["metrics"]
    for strategy, values in (report.get("results") or {}).items():
        for k, v in (values or {}).items():
            if _scalar(v):
                metrics[f"{strategy}/{k}"] = float(v)
    for variant, s in (report.get("training") or {}).items():
        for k in ("last_loss", "first_loss", "steps", "elapsed_s"):
            if _scalar((s or {}).get(k)):
                metrics[f"train/{variant}/{k}"] = float(s[k])
    return row


def _plain(override: str) -> str:
    # overrides.yaml keeps Hydra's escaping (`sweep-$\{hydra\:job.num\}`); show what was typed
    return re.sub(r"\\(.)", r"\1", override)


def _varying(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The override keys whose values differ between jobs, and the overrides all jobs share."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"]) for r in rows]
    keys: list[str] = []
    for p in parsed:
        keys += [k for k in p if k not in keys]
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    common = [_plain(f"{k}={parsed[0][k]}") for k in keys if k not in varying and k in parsed[0]]
    return varying, common


def _fmt(v: Any, column: str) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if column.startswith("train/") else f"{100 * v:.1f}"


def summarize(sweep_dir: str | Path, metric: str = "", group: str = "") -> dict[str, Any]:
    """Read every job's report under `sweep_dir`; write summary.json and summary.md there."""
    sweep_dir = Path(sweep_dir)
    rows = [job_row(d) for d in _job_dirs(sweep_dir)] if sweep_dir.is_dir() else []
    varying, common = _varying(rows) if rows else ([], [])
    strategies: list[str] = []
    for r in rows:
        for k in r["metrics"]:
            s = k.split("/", 1)[0]
            if s != "train" and s not in strategies:
                strategies.append(s)
    columns: list[str] = []
    for s in strategies:
        for m in SUMMARY_METRICS:
            if any(f"{s}/{m}" in r["metrics"] for r in rows):
                columns.append(f"{s}/{m}")
        recalls = sorted({k for r in rows for k in r["metrics"] if k.startswith(f"{s}/recall@")},
                         key=lambda k: int(k.rsplit("@", 1)[1]) if k.rsplit("@", 1)[1].isdigit() else 0)  # fmt: skip
        # recall at the swept top-k differs per job; recall@1 is comparable across all of them
        columns += [k for k in recalls if k.endswith("@1")]
    columns += sorted(
        {k for r in rows for k in r["metrics"] if k.startswith("train/") and k.endswith("/last_loss")}
    )
    metric = (
        metric
        or next((c for c in columns if c.endswith("/f1") and c.startswith("rag/")), "")
        or (columns[0] if columns else "")
    )
    scored = [r for r in rows if metric in r["metrics"]]
    # a best job only where the metric tells jobs apart
    best = (
        max(scored, key=lambda r: r["metrics"][metric])
        if len({r["metrics"][metric] for r in scored}) > 1
        else None
    )
    summary = {
        "sweep_dir": str(sweep_dir),
        "wandb_group": group,
        "varying": varying,
        "common_overrides": common,
        "metric": metric,
        "best_job": best["job"] if best else None,
        "jobs": rows,
    }
    atomic_write_text(sweep_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(sweep_dir / "summary.md", render(summary, columns))
    return summary


def render(summary: dict[str, Any], columns: list[str]) -> str:
    rows, varying = summary["jobs"], summary["varying"]
    head = ["job", *varying, "status", *columns]
    lines = [
        f"# Sweep {summary['sweep_dir']}",
        "",
        f"{len(rows)} jobs; wandb group `{summary['wandb_group'] or '-'}`; "
        f"common overrides: {' '.join(summary['common_overrides']) or '-'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        params = dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"])
        mark = " ★" if r["job"] == summary["best_job"] else ""
        cells = [r["job"] + mark, *(_plain(params.get(k, "")) for k in varying), r["status"]]
        cells += [_fmt(r["metrics"].get(c), c) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["best_job"] is not None:
        lines += ["", f"★ best by {summary['metric']} (EM, F1, recall in %)."]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """The Hydra side: set the sweep's wandb group before the jobs start, summarize when they end."""

    def __init__(self, metric: str = "", enabled: bool = True) -> None:
        self.metric = metric
        self.enabled = enabled
        self.group = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        # wandb.init reads WANDB_RUN_GROUP when a run names no group; jobs run in this process
        # (basic launcher) or inherit its environment (submitit's sbatch exports it).
        self.group = os.environ.get("WANDB_RUN_GROUP") or sweep_group(config.hydra.sweep.dir)
        os.environ["WANDB_RUN_GROUP"] = self.group

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarize(sweep_dir, self.metric, self.group)
        text = (sweep_dir / "summary.md").read_text()
        print("\n" + text, flush=True)
        print(f"sweep summary: {sweep_dir / 'summary.md'} ({len(summary['jobs'])} jobs)", flush=True)
