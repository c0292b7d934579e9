"""Evaluation wall time over 2 ranks vs 1, same questions, same model, same report.

The built-in airport data (300 held-out questions by default), each question given its own gold
passage and one other passage as retrieved context (fixed: the benchmark is about generation, not
the retrieval service). The generator is the default tiny one (conf/model/tiny.yaml, random
weights: it never stops early, so every answer costs eval.max_new_tokens steps), saved to disk and
loaded by each rank. One strategy's whole evaluation — `evaluate_strategy`: the main answers, the
top-k sweep, the distractor and passage-order checks, and the latency probe on rank 0 — timed on:

- 1rank:   one process with all the cores (torch threads = cores), what a user runs today;
- 1rank_1t: one process with one thread (the per-rank thread count of the 2-rank run);
- 2ranks:  2 processes (gloo), one thread each, batches dealt round-robin (ragdist's sharded eval).

Modes interleave round by round; medians over rounds; the predictions of every mode must be
identical. Besides wall time, the CPU seconds of the busiest rank: on a machine that others load,
what the evaluation would take on otherwise idle cores. The last line is one JSON object:

    python bench/eval.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODES = {"1rank": (1, os.cpu_count() or 1), "1rank_1t": (1, 1), "2ranks": (2, 1)}


def _examples(n: int):
    from ragdist.data.builtin import materialize
    from ragdist.data.corpus import read_jsonl
    from ragdist.data.qa import DataConfig, load_qa

    paths = materialize(DataConfig(builtin_dir=str(ROOT / "data" / "builtin")))
    docs = {obj["id"]: obj for _, obj in read_jsonl(paths["corpus"])}
    ids = sorted(docs)
    examples = load_qa(paths["eval"], n)

    def passage(doc_id):
        d = docs[doc_id]
        return {"id": doc_id + "#0", "doc_id": doc_id, "title": d.get("title", ""), "text": d["text"]}

    ranked = [
        [passage(ex.gold_ids[0].split("#")[0]), passage(ids[(7 * i + 3) % len(ids)]), passage(ids[(11 * i + 5) % len(ids)])]
        for i, ex in enumerate(examples)
    ]
    return examples, ranked


def _eval_cfg(args):
    from ragdist.eval.runner import EvalConfig

    return EvalConfig(
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_prompt_len=256,
        latency_samples=args.latency_samples, latency_warmup=1, topk_sweep=[0, 1, 2], distractors=[1],
        distractor_source="hard",
    )  # fmt: skip


def rank_main(args) -> None:
    import torch

    from ragdist import distributed as rdist
    from ragdist.eval.runner import evaluate_strategy
    from ragdist.train.model import load_generator

    threads = int(args.rank_main[1])
    torch.set_num_threads(threads)
    rank, world = rdist.init_process_group()
    examples, ranked = _examples(args.questions)
    model, tok = load_generator(args.rank_main[0])
    import torch.distributed as dist

    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluate_strategy(model, tok, examples, ranked=ranked, top_k=2, cfg=_eval_cfg(args))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    cpus = [None] * world
    dist.all_gather_object(cpus, cpu)
    if rank == 0:
        Path(args.rank_main[2]).write_text(
            json.dumps({"eval_s": seconds, "cpu_s": max(cpus), "world": world, "threads": threads,
                        "predictions": [r["prediction"] for r in out["rows"]], "em_at_k": out["metrics"]["em_at_k"]})
        )  # fmt: skip
    rdist.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--latency-samples", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rank-main", nargs=3, metavar=("MODEL", "THREADS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        rank_main(args)
        return

    from ragdist.config import as_object, compose
    from ragdist.distributed import launch_local
    from ragdist.train.model import build_generator, load_tokenizer, save_pretrained_atomic

    modes = [m for m in args.modes.split(",") if m]
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    preds: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="ragdist-bench-eval-") as tmp:
        mcfg = as_object(compose(["model=tiny", "recipe=plain"]).model)
        tok = load_tokenizer(mcfg)
        model_dir = save_pretrained_atomic(build_generator(mcfg, tok), tok, Path(tmp) / "model")
        _examples(args.questions)  # materialize the data once, before timing
        passthrough = [
            f"--{k}={getattr(args, k.replace('-', '_'))}"
            for k in ("questions", "batch-size", "max-new-tokens", "latency-samples")
        ]
        for r in range(args.rounds):
            for mode in modes:
                nproc, threads = MODES[mode]
                out = Path(tmp) / f"{mode}-{r}.json"
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
                cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough,
                       "--rank-main", str(model_dir), str(threads), str(out)]  # fmt: skip
                t0 = time.perf_counter()
                rc = launch_local(cmd, nproc, env=env)
                wall = time.perf_counter() - t0
                if rc != 0:
                    raise SystemExit(f"{mode}: ranks failed with status {rc}")
                rec = json.loads(out.read_text())
                times[mode].append(rec["eval_s"])
                cpus[mode].append(rec["cpu_s"])
                walls[mode].append(wall)
                preds.setdefault(mode, rec["predictions"])
                same = rec["predictions"] == preds[modes[0]]
                print(json.dumps({"round": r, "mode": mode, "eval_s": round(rec["eval_s"], 2), "cpu_s": round(rec["cpu_s"], 2),
                                  "launch_wall_s": round(wall, 2), "same_predictions": same}), flush=True)  # fmt: skip
    med = {m: statistics.median(v) for m, v in times.items()}
    summary = {
        "bench": "eval",
        "questions": args.questions,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "eval_s_median": {m: round(v, 2) for m, v in med.items()},
        "launch_wall_s_median": {m: round(statistics.median(v), 2) for m, v in walls.items()},
        # CPU seconds of the busiest rank: what the evaluation takes on cores nothing else uses
        "busiest_rank_cpu_s_median": {m: round(statistics.median(v), 2) for m, v in cpus.items()},
        "same_predictions": all(p == preds[modes[0]] for p in preds.values()),
    }
    if "2ranks" in med:
        for base in ("1rank", "1rank_1t"):
            if base in med:
                summary[f"2ranks_vs_{base}"] = round(med["2ranks"] / med[base], 3)
                summary[f"2ranks_vs_{base}_busiest_rank_cpu"] = round(
                    statistics.median(cpus["2ranks"]) / statistics.median(cpus[base]), 3
                )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
