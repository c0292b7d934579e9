"""What an asynchronous index refresh costs training: step times while a refresh runs, side by side.

    .venv/bin/python bench/refresh.py                      # built-in airports (1000 passages), 2 runs each
    .venv/bin/python bench/refresh.py --entities 2000 --steps 60 --repeats 3

Each repeat trains joint (loss lsr, side=both) twice on 2 ranks with the same data and seed:
  refresh   — a refresh every `--every` steps (re-embed the corpus on Ray, new index version, swap);
  baseline  — the same run without any refresh (the machine's own step-time jitter).
It reports the median step time, the slowest step while a refresh was in flight (refresh runs) or
overall (baseline), and the refresh's wall time and embedding rate. The refresh's embed workers and
coordinator run at `os.nice(joint.refresh_nice)` with `joint.refresh_threads` torch threads each.

One JSON line per run, then a last line:
  {"median_step_s", "max_step_during_refresh_s", "ratio" (= max during refresh / median; target ≤ 1.2),
   "refresh_s", "embed_docs_per_s", "baseline": {...}, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_run(args: argparse.Namespace, out: Path, refresh: bool, seed: int) -> dict:
    from ragdist.config import compose
    from ragdist.recipes.training import launch_training, prepare, stop_owned_service

    overrides = [
        "recipe=plain", "joint=lsr", "joint.side=both", "trainer.variants=[rag]", f"trainer.max_steps={args.steps}",
        f"trainer.micro_batch_size={args.batch}", f"trainer.log_every={args.steps}", "trainer.warmup_steps=0",
        f"trainer.seed={seed}", f"data.num_entities={args.entities}", f"index.root={out / 'index'}",
        f"joint.refresh_nice={args.nice}", f"joint.refresh_threads={args.threads}", f"joint.refresh_workers={args.workers}",
        "joint.refresh_final=false", "joint.record_examples=false", "joint.recall_ks=[1]",
        f"joint.refresh_every={args.every if refresh else 0}", f"retrieval.service_name=bench-refresh-{os.getpid()}",
        f"run_dir={out / ('refresh' if refresh else 'baseline') / str(seed)}",
    ]
    cfg = compose(overrides)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare(cfg)
    try:
        launch_training(cfg)
    finally:
        stop_owned_service(cfg)
    s = json.loads((Path(cfg.run_dir) / "train_rag.json").read_text())
    hist = s["history"][args.skip:]  # the first steps pay for warm-up (imports, first allocations)
    steps = [h["step_s"] for h in hist]
    during = [h["step_s"] for h in hist if h["refresh_inflight"]]
    r = s["joint"]["refresh"] or {}
    return {
        "mode": "refresh" if refresh else "baseline",
        "seed": seed,
        "steps": len(steps),
        "median_step_s": statistics.median(steps),
        "max_step_s": max(steps),
        "steps_during_refresh": len(during),
        "max_step_during_refresh_s": max(during) if during else None,
        "median_step_during_refresh_s": statistics.median(during) if during else None,
        "refreshes_served": r.get("served", 0),
        "refresh_s": r.get("refresh_s", []),
        "embed_docs_per_s": r.get("embed_docs_per_s", []),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=1000, help="built-in airports (= passages to re-embed)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the statistics")
    ap.add_argument("--batch", type=int, default=4, help="questions per rank and step")
    ap.add_argument("--every", type=int, default=10, help="refresh every N steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nice", type=int, default=19)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-refresh")
    args = ap.parse_args()

    from ragdist.recipes.common import setup_logging
    from ragdist.retrieval.cluster import init_ray

    setup_logging()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_ray(num_cpus=os.cpu_count())
    out = Path(args.out).resolve()
    runs = []
    for rep in range(args.repeats):
        for refresh in (True, False):  # interleaved, so slow phases of a shared machine hit both
            r = one_run(args, out, refresh, seed=rep)
            runs.append(r)
            print(json.dumps(r), flush=True)

    def med(mode: str, key: str) -> float | None:
        vals = [r[key] for r in runs if r["mode"] == mode and r[key] is not None]
        return statistics.median(vals) if vals else None

    ref = [r for r in runs if r["mode"] == "refresh"]
    refresh_s = [t for r in ref for t in r["refresh_s"]]
    rates = [x for r in ref for x in r["embed_docs_per_s"] if x]
    median_step = med("refresh", "median_step_s")
    max_during = med("refresh", "max_step_during_refresh_s")
    base_med, base_max = med("baseline", "median_step_s"), med("baseline", "max_step_s")
    summary = {
        "passages": args.entities,
        "steps": args.steps,
        "repeats": args.repeats,
        "refresh_every": args.every,
        "nice": args.nice,
        "threads_per_worker": args.threads,
        "workers": args.workers,
        "median_step_s": median_step,
        "max_step_during_refresh_s": max_during,
        "ratio": (max_during / median_step) if (max_during and median_step) else None,
        "median_step_during_refresh_s": med("refresh", "median_step_during_refresh_s"),
        "refresh_s": statistics.median(refresh_s) if refresh_s else None,
        "embed_docs_per_s": statistics.median(rates) if rates else None,
        "refreshes_served": sum(r["refreshes_served"] for r in ref),
        "baseline": {"median_step_s": base_med, "max_step_s": base_max,
                     "ratio": (base_max / base_med) if (base_max and base_med) else None},
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
