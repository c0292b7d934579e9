"""Training step time: live retrieval vs precomputed contexts, and the framework vs a plain PyTorch loop.

Same tiny generator (conf/model/tiny.yaml), same examples (tests/data), 2 ranks on this node,
DeepSpeed ZeRO-2 on CPU over gloo. Three modes, interleaved round by round so load drift on a
shared machine hits all alike:

- live:        ragdist's loop; every batch's passages come from the Ray retrieval service (client
               cache off), built in the prefetch thread;
- precomputed: ragdist's loop; the same passages, looked up in memory;
- plain:       no ragdist: torch DDP over gloo, AdamW, LambdaLR, grad clipping, over the very same
               batches as tensors already in memory (built by the same code, before timing);
- live_cached: as live, with the client's query cache on (its default): what later epochs cost once
               every question has been asked (the cache is warm after the first round);
- engine_loop: a hand-written loop driving the very same engine (DeepSpeed ZeRO-2 through ragdist's
               engine, gloo) over the same batches already in memory: `loss_ratio`-free measure of
               what ragdist's loop itself costs (`loop_ratio` = precomputed tokens/s ÷ this).

Per mode, the median step time over the measured (post-warm-up) steps of all rounds, and rank 0's
median CPU seconds per step (which other load on a shared machine disturbs less). One JSON line per
run, then the summary as the last line:

    python bench/train_step.py --rounds 3 --steps 30 --warmup 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data"
MODES = ("live", "precomputed", "plain", "live_cached", "engine_loop")


def _model_cfg():
    from ragdist.config import as_object, compose

    return as_object(compose(["model=tiny", "recipe=plain"]).model)


def _trainer(args, max_steps: int):
    from ragdist.train.engine import TrainerConfig

    t = TrainerConfig(
        engine="deepspeed", zero_stage=2, micro_batch_size=args.micro_batch, max_steps=max_steps,
        warmup_steps=5, lr=1e-3, max_seq_len=args.seq_len, log_every=10**9, omp_threads=1,
    )  # fmt: skip
    for key in ("prefetch_depth", "cpu_collectives"):
        if getattr(args, key) is not None:
            setattr(t, key, getattr(args, key))
    t.fused_optimizer = args.fused_optimizer
    return t


def plain_loop(module, batches, trainer, world: int) -> tuple[list[float], list[float]]:
    """What a user would write without ragdist: DDP, AdamW, schedule, clipping, nothing else."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ragdist.train.engine import lr_lambda

    model = DDP(module)
    opt = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=trainer.lr, betas=tuple(trainer.betas),
        weight_decay=trainer.weight_decay,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(trainer))
    times, cpus = [], []
    t_prev, c_prev = time.perf_counter(), time.process_time()
    for b in batches:
        loss = model(**b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), trainer.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        now, c_now = time.perf_counter(), time.process_time()
        times.append(now - t_prev)
        cpus.append(c_now - c_prev)
        t_prev, c_prev = now, c_now
    return times, cpus


def engine_loop(engine, batches) -> tuple[list[float], list[float]]:
    """What a user would write around the same engine: step it over ready batches, read the loss."""
    times, cpus = [], []
    t_prev, c_prev = time.perf_counter(), time.process_time()
    for b in batches:
        float(engine.train_step(b))
        now, c_now = time.perf_counter(), time.process_time()
        times.append(now - t_prev)
        cpus.append(c_now - c_prev)
        t_prev, c_prev = now, c_now
    return times, cpus


def rank_main(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    from ragdist import distributed as rdist
    from ragdist.data.qa import load_qa
    from ragdist.embed import EmbedderConfig, build_embedder
    from ragdist.retrieval.client import RetrievalClient, RetrievalConfig
    from ragdist.train.engines import build_engine
    from ragdist.train.examples import ExampleBuilder
    from ragdist.train.loop import build_module_fn, train_variant
    from ragdist.train.model import load_tokenizer
    from ragdist.train.peft import PeftConfig
    from ragdist.train.trainer import positions, take
    from ragdist.utils.logger import LoggerConfig, RunLogger

    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(1)
    rank, world = rdist.init_process_group()
    model_cfg = _model_cfg()
    tok = load_tokenizer(model_cfg)
    train = load_qa(DATA / "train.jsonl")
    rcfg = RetrievalConfig(address=spec["ray"], service_name=spec["service"], cache_size=0)
    embedder = build_embedder(EmbedderConfig(progress=False, dtype=args.query_dtype))
    client = RetrievalClient(rcfg, embedder=embedder)
    cached = RetrievalClient(dataclasses.replace(rcfg, cache_size=RetrievalConfig().cache_size), embedder=embedder)
    fixed = dict(zip([ex.question for ex in train], client.retrieve([ex.question for ex in train], args.top_k)))

    def precomputed(questions, k):
        return [fixed[q][:k] for q in questions]

    n_steps = args.warmup + args.steps
    trainer = _trainer(args, n_steps)
    # the plain loop's batches: exactly what ragdist's loop builds for these positions
    builder = ExampleBuilder(tok, trainer.examples, top_k=args.top_k, max_len=trainer.max_seq_len, retrieve=precomputed)
    stream = take(positions(len(train), rank, world, trainer.micro_batch_size, trainer.seed, 0, 0), n_steps)
    batches = [builder.build(train, p.ids, p.epoch) for p in stream]
    tokens = torch.tensor([float(sum(b.tokens for b in batches))])
    dist.all_reduce(tokens)
    tokens_per_step = float(tokens.item()) / n_steps
    logger = RunLogger(LoggerConfig(), spec["work"], enabled=False)
    runs = []
    for r in range(args.rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            if mode == "plain":
                torch.manual_seed(0)
                module = build_module_fn(model_cfg, tok, PeftConfig())()
                times, cpus = plain_loop(module, [b.tensors for b in batches], trainer, world)
                del module
            elif mode == "engine_loop":
                engine = build_engine(trainer, build_module_fn(model_cfg, tok, PeftConfig()), Path(spec["work"]) / mode)
                times, cpus = engine_loop(engine, [b.tensors for b in batches])
                engine.close()
            else:
                out = train_variant(
                    "rag", train, trainer=trainer, model_cfg=model_cfg, tokenizer=tok, top_k=args.top_k,
                    retrieve={"live": client.retrieve, "live_cached": cached.retrieve}.get(mode, precomputed),
                    run_dir=Path(spec["work"]) / mode,
                    logger=logger, export=False,
                )  # fmt: skip
                times = [h["step_s"] for h in out["history"]]
                cpus = [h["cpu_s"] for h in out["history"]]
                waits = [h["retrieval_wait_s"] for h in out["history"][args.warmup :]]
            measured = times[args.warmup :]
            rec = {
                "round": r,
                "mode": mode,
                "step_s": statistics.median(measured),
                "tokens_per_s": tokens_per_step / statistics.median(measured),
            }
            if mode not in ("plain", "engine_loop"):
                rec["retrieval_wait_s"] = statistics.median(waits)
            rec["cpu_s"] = statistics.median(cpus[args.warmup :])
            rec["_times"] = measured
            rec["_cpus"] = cpus[args.warmup :]
            runs.append(rec)
            if rank == 0:
                print(json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}), flush=True)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"runs": runs, "tokens_per_step": tokens_per_step}))
    dist.barrier()
    rdist.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--prefetch-depth", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--cpu-collectives", choices=["shm", "gloo"], default=None, help="default: the trainer's")
    ap.add_argument("--fused-optimizer", action="store_true", help="trainer.fused_optimizer=true")
    ap.add_argument("--query-dtype", choices=["fp32", "bf16"], default="fp32", help="the ranks' query encoder (embedder.dtype)")
    ap.add_argument("--rank-worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        rank_main(args.rank_worker)
        return

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ragdist.data.corpus import chunk_documents, load_documents
    from ragdist.distributed import launch_local
    from ragdist.embed import EmbedderConfig, build_embedder
    from ragdist.index.builder import IndexConfig, build_snapshot
    from ragdist.retrieval.client import RetrievalConfig, start_service, stop_service
    from ragdist.retrieval.cluster import init_ray

    work = Path(tempfile.mkdtemp(prefix="ragdist-bench-train-"))
    embedder = build_embedder(EmbedderConfig(progress=False))
    chunks = chunk_documents(load_documents(DATA / "corpus.jsonl"), embedder.tokenizer, 128, 32)
    snap = build_snapshot(chunks, embedder.encode([c.text for c in chunks]), IndexConfig(num_shards=2, root=str(work / "idx")),
                          embedder_name=embedder.name)  # fmt: skip
    address = init_ray(None, num_cpus=2, namespace="ragdist")  # a loopback cluster of its own
    rcfg = RetrievalConfig(address=address, service_name="bench-train-step")
    start_service(str(snap), rcfg)
    spec = {"args": vars(args) | {"rank_worker": ""}, "ray": address, "service": rcfg.service_name,
            "work": str(work), "out": str(work / "result.json")}  # fmt: skip
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_ADDRESS=address)
    try:
        rc = launch_local([sys.executable, str(Path(__file__).resolve()), "--rank-worker", str(work / "spec.json")], 2, env=env)
    finally:
        stop_service(rcfg)
    if rc != 0:
        sys.exit(f"bench ranks failed with status {rc}")
    res = json.loads((work / "result.json").read_text())
    per_mode = {m: [t for r in res["runs"] if r["mode"] == m for t in r["_times"]] for m in MODES}
    step = {m: statistics.median(ts) for m, ts in per_mode.items()}
    mean = {m: statistics.fmean(ts) for m, ts in per_mode.items()}
    tps = {m: res["tokens_per_step"] / step[m] for m in MODES}
    cpu = {m: statistics.median(t for r in res["runs"] if r["mode"] == m for t in r["_cpus"]) for m in MODES}
    summary = {
        "bench": "train_step",
        "engine": "deepspeed-zero2-cpu",
        "ranks": 2,
        "model": "conf/model/tiny.yaml",
        "micro_batch": args.micro_batch,
        "rounds": args.rounds,
        "steps_per_run": args.steps,
        "query_dtype": args.query_dtype,
        "fused_optimizer": args.fused_optimizer,
        "step_s_live": step["live"],
        "step_s_precomputed": step["precomputed"],
        "ratio": step["live"] / step["precomputed"],
        "tokens_per_s": tps["live"],
        "tokens_per_s_precomputed": tps["precomputed"],
        "tokens_per_s_plain": tps["plain"],
        "framework_ratio": tps["live"] / tps["plain"],
        "framework_ratio_precomputed": tps["precomputed"] / tps["plain"],
        # means over the same steps: what a whole run's throughput sees (a median can hide work
        # that lands on a few steps, such as one retrieval call for several batches)
        "step_s_mean_live": mean["live"],
        "step_s_mean_precomputed": mean["precomputed"],
        "step_s_mean_plain": mean["plain"],
        "ratio_mean": mean["live"] / mean["precomputed"],
        "framework_ratio_mean": mean["plain"] / mean["live"],
        # ragdist's loop vs a hand-written loop over the same engine and batches: the loop's own cost
        "step_s_engine_loop": step["engine_loop"],
        "loop_ratio": tps["precomputed"] / tps["engine_loop"],
        "loop_ratio_mean": mean["engine_loop"] / mean["precomputed"],
        "step_s_live_cached": step["live_cached"],
        "ratio_cached": step["live_cached"] / step["precomputed"],
        "retrieval_wait_s_live": statistics.median(r["retrieval_wait_s"] for r in res["runs"] if r["mode"] == "live"),
        # rank 0's CPU seconds per step (all its threads): less sensitive to other load than wall time
        "cpu_s_live": cpu["live"],
        "cpu_s_precomputed": cpu["precomputed"],
        "cpu_s_plain": cpu["plain"],
        "cpu_s_live_cached": cpu["live_cached"],
        "cpu_ratio": cpu["live"] / cpu["precomputed"],
        "cpu_ratio_cached": cpu["live_cached"] / cpu["precomputed"],
        "framework_cpu_ratio": cpu["plain"] / cpu["live"],
        "framework_cpu_ratio_precomputed": cpu["plain"] / cpu["precomputed"],
        "load_avg_1m": os.getloadavg()[0],
        "cpu_collectives": args.cpu_collectives or "trainer default",
        "targets": {"ratio": "<= 1.05", "ratio_mean": "<= 1.05", "loop_ratio": ">= 0.97"},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
