"""joint_report.{json,md} in a run directory, and one table over several joint runs.

    python -m ragdist.joint.report runs/joint-lsr runs/joint-pdist ...   # recall before/after, per run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ragdist.index.snapshot import atomic_write_text


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}"


def _ks(*recalls: dict[str, Any]) -> list[int]:
    return sorted({int(k.split("@")[1]) for r in recalls for k in r if k.startswith("recall@")})


def recall_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per run: recall@k before → after on the eval questions."""
    ks = _ks(*[r["recall_before"] for _, r in rows], *[r["recall_after"] for _, r in rows])
    head = "| run | loss | side | steps | " + " | ".join(f"R@{k} before → after" for k in ks) + " | MRR before → after |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, j in rows:
        b, a = j["recall_before"], j["recall_after"]
        cells = [f"{_pct(b.get(f'recall@{k}'))} → {_pct(a.get(f'recall@{k}'))}" for k in ks]
        lines.append(f"| {name} | {j['loss']} | {j['side']} | {j.get('steps', '–')} | " + " | ".join(cells)
                     + f" | {b.get('mrr', 0):.3f} → {a.get('mrr', 0):.3f} |")
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    j = dict(summary["joint"], steps=summary["steps"])
    md = [
        "# Joint retriever training",
        "",
        f"Loss `{j['loss']}`, side `{j['side']}`, {summary['steps']} steps on {summary['world_size']} ranks in "
        f"{summary['elapsed_s']:.0f}s. Retrieval recall on {j['recall_before'].get('questions', 0)} eval questions, "
        "in %: the query encoder (and index) as training started → as it ended.",
        "",
        recall_table([("this run", j)]),
        "",
        f"Before: index `{j['recall_before'].get('index_version')}`; after: index `{j['recall_after'].get('index_version')}` "
        f"(encoder step {j['final_index']['encoder_step']}).",
        "",
        f"Median step {j['median_step_s']:.3f}s"
        + (f"; slowest step while a refresh ran {j['max_step_during_refresh_s']:.3f}s" if j.get("max_step_during_refresh_s") else "")
        + f"; largest staleness {j['max_staleness']} steps.",
    ]
    r = j.get("refresh")
    if r:
        times = ", ".join(f"{t:.1f}" for t in r["refresh_s"]) or "–"
        md += ["", f"Refreshes: {r['refreshes_started']} started, {r['served']} served, {r['failed']} failed "
                   f"(retried), {r['discarded']} discarded; wall time each (s): {times}."]
    return "\n".join(md) + "\n"


def write_joint_report(run_dir: str | Path, summary: dict[str, Any]) -> None:
    run_dir = Path(run_dir)
    j = summary["joint"]
    data = {k: v for k, v in j.items() if k != "config"} | {"steps": summary["steps"], "config": j["config"]}
    atomic_write_text(run_dir / "joint_report.json", json.dumps(data, indent=1, default=str))
    atomic_write_text(run_dir / "joint_report.md", markdown(summary))


def main(argv: list[str] | None = None) -> int:
    runs = sys.argv[1:] if argv is None else argv
    rows = []
    for run in runs:
        f = Path(run) / "joint_report.json"
        if not f.is_file():
            print(f"{run}: no joint_report.json", file=sys.stderr)
            return 2
        rows.append((Path(run).name, json.loads(f.read_text())))
    print(recall_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
