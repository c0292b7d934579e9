"""The retrieval service vs one in-process FAISS index, on the same vectors, in one run.

(a) one in-process `faiss.IndexFlatIP` holding every vector, using every core;
(b) the service: 2 shard actors (1 thread each) over the same vectors, queried through the client;
    by default twice, with the exact fp32 scan (`service_*`) and with the bf16 scan + exact fp32
    re-scoring (`service_bf16_*`), both checked id for id against (a).

Timings are interleaved (a, b, a, b, …) so load drift on a shared machine hits both alike; the
figures are medians. The ids of (b) are checked against (a). Then the same comparison for an IVF
index at matched recall: the shards share one trained coarse quantizer, so at equal nprobe the
service probes the same lists as the single index and returns the same neighbours.

    python bench/retrieval.py                      # 200k x 384, k=10, batches 16,64,256,1024
    python bench/retrieval.py --nb 50000 --repeats 3 --no-ivf
    python bench/retrieval.py --device gpu --flat-backend faiss --flat-dtype fp32 --no-ivf   # faiss-gpu, both sides

With `--device gpu`, (a) is the same index moved to the GPU (faiss-gpu) and the shard actors take the
GPUs too (`retrieval.device=gpu`, as many shards per GPU as needed to fit them all).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # non-Linux
        return os.cpu_count() or 1


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _lat(ts: list[float]) -> dict[str, float]:
    p = np.percentile(np.asarray(ts) * 1000.0, [50, 99])
    return {"p50": round(float(p[0]), 2), "p99": round(float(p[1]), 2)}


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)]))


def _serve(snapshot, cfg_kwargs: dict):
    from ragdist.retrieval.client import RetrievalClient, RetrievalConfig, start_service

    cfg = RetrievalConfig(**cfg_kwargs)
    start_service(str(snapshot), cfg)
    return cfg, RetrievalClient(cfg)


def compare(name: str, inproc, clients: dict, queries: dict[int, np.ndarray], k: int, repeats: int) -> dict:
    """QPS and latency per batch size of in-process search and of each service client; id agreement."""
    out: dict = {"inprocess_qps": {}, "inprocess_latency_ms": {}}
    for c in clients:
        out.update({f"{c}_qps": {}, f"{c}_latency_ms": {}, f"{c}_ratio": {}, f"{c}_id_mismatches": 0})
    for bs, q in queries.items():
        _, ref = inproc.search(q, k)
        fns = {"inprocess": lambda q=q: inproc.search(q, k)}
        for c, client in clients.items():
            out[f"{c}_id_mismatches"] += int((client.search(q, k, passages=False).ids != ref).sum())
            fns[c] = lambda q=q, client=client: client.search(q, k, passages=False)
        t = _interleaved(fns, repeats)
        a = bs / statistics.median(t["inprocess"])
        out["inprocess_qps"][str(bs)] = round(a, 1)
        out["inprocess_latency_ms"][str(bs)] = _lat(t["inprocess"])
        line = f"[{name}] batch {bs:5d}: in-process {a:8.1f} qps (p50 {_lat(t['inprocess'])['p50']:.1f} ms)"
        for c in clients:
            b = bs / statistics.median(t[c])
            out[f"{c}_qps"][str(bs)] = round(b, 1)
            out[f"{c}_latency_ms"][str(bs)] = _lat(t[c])
            out[f"{c}_ratio"][str(bs)] = round(b / a, 3)
            line += f" | {c} {b:8.1f} qps x{b / a:4.2f} (p50 {_lat(t[c])['p50']:.1f} ms)"
        print(line, flush=True)
    for c in clients:
        out[f"{c}_ratio_min"] = min(out[f"{c}_ratio"].values())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nb", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batches", default="16,64,256,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--flat-backend", default="auto", choices=["auto", "faiss", "torch"])
    ap.add_argument("--flat-dtype", default="both", choices=["fp32", "bf16", "both"],
                    help="service's torch scan: fp32 (exact), bf16 (bf16 scan + exact fp32 re-scoring), or both")
    ap.add_argument("--check-every-s", type=float, default=0.0, help="client's version/epoch check period")
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--nprobes", default="8,16,32,64,128")
    ap.add_argument("--target-recall", type=float, default=0.9)
    ap.add_argument("--no-ivf", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                    help="gpu: in-process faiss-gpu vs shard actors on the GPU(s)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import faiss

    from ragdist.data.corpus import Chunk
    from ragdist.index.builder import IndexConfig, build_snapshot
    from ragdist.index.reader import faiss_gpus, to_gpu
    from ragdist.retrieval.client import stop_service
    from ragdist.retrieval.cluster import init_ray

    cores = _cores()
    faiss.omp_set_num_threads(cores)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    rng = np.random.default_rng(args.seed)
    xb = _normed(rng, args.nb, args.d)
    queries = {bs: _normed(rng, bs, args.d) for bs in batches}
    chunks = [Chunk(id=f"c{i}", doc_id=f"d{i}", text="") for i in range(args.nb)]
    print(f"# nb={args.nb} d={args.d} k={args.k} cores={cores} faiss={faiss.__version__} "
          f"loadavg={os.getloadavg()[0]:.2f}", flush=True)

    gpus = faiss_gpus()
    if args.device == "gpu" and not gpus:
        raise SystemExit("--device gpu: faiss sees no GPU (install the [gpu] extra, faiss-gpu-cu12)")
    init_ray(num_cpus=cores)
    base = dict(threads_per_shard=1, replicas=1, flat_backend=args.flat_backend, check_every_s=args.check_every_s,
                cache_size=0, timeout_s=600, attempt_timeout_s=600, device=args.device)
    if args.device == "gpu":
        base["shards_per_gpu"] = -(-args.shards // gpus)  # every shard placed, none waiting for a GPU
    dtypes = ["fp32", "bf16"] if args.flat_dtype == "both" else [args.flat_dtype]
    result: dict = {"nb": args.nb, "d": args.d, "k": args.k, "shards": args.shards, "cores": cores,
                    "flat_backend": args.flat_backend, "repeats": args.repeats, "device": args.device}
    with tempfile.TemporaryDirectory(prefix="ragdist-bench-") as tmp:
        flat = faiss.IndexFlatIP(args.d)
        flat.add(xb)
        if args.device == "gpu":
            flat = to_gpu(flat, 0)
        t0 = time.perf_counter()
        snap = build_snapshot(chunks, xb, IndexConfig(num_shards=args.shards, root=f"{tmp}/flat"), embedder_name="rand")
        result["snapshot_build_s"] = round(time.perf_counter() - t0, 1)
        services = {}
        for dt in dtypes:
            t0 = time.perf_counter()
            services[dt] = _serve(snap, dict(base, service_name=f"bench-flat-{dt}", flat_dtype=dt))
            result[f"service_start_s_{dt}"] = round(time.perf_counter() - t0, 1)
        names = {dt: "service" if i == 0 else f"service_{dt}" for i, dt in enumerate(dtypes)}
        res = compare("flat", flat, {names[dt]: services[dt][1] for dt in dtypes}, queries, args.k, args.repeats)
        result.update(res)
        result["flat_dtype"] = dtypes[0]
        result["ratio_min"] = res["service_ratio_min"]
        result["service_ratio"] = res["service_ratio"]
        result["ids_identical"] = res["service_id_mismatches"] == 0
        for dt in dtypes:
            info = services[dt][1].metrics(replicas=True)
            result[f"shard_backends_{dt}"] = [r.get("backend") for r in info["replicas"]]
            result[f"shard_calibration_{dt}"] = [r.get("calibration") for r in info["replicas"]]
            result[f"shard_devices_{dt}"] = [r.get("device") for r in info["replicas"]]
            stop_service(services[dt][0])
        del flat

        if not args.no_ivf:
            factory = f"IVF{args.nlist},Flat"
            icfg = IndexConfig(num_shards=args.shards, root=f"{tmp}/ivf", factory=factory, recall_queries=0,
                               train_sample=min(args.nb, 64 * args.nlist))
            t0 = time.perf_counter()
            isnap = build_snapshot(chunks, xb, icfg, embedder_name="rand")
            build_s = time.perf_counter() - t0
            from ragdist.index.builder import train_template

            single = train_template(icfg, xb)  # same seed and sample: the same quantizer as the shards
            single.add(xb)
            probe_q = queries[max(batches)]
            truth = faiss.IndexFlatIP(args.d)
            truth.add(xb)
            _, gt = truth.search(probe_q, args.k)
            del truth
            sweep, chosen = {}, None
            for nprobe in [int(p) for p in args.nprobes.split(",")]:
                faiss.extract_index_ivf(single).nprobe = nprobe
                r = _recall(single.search(probe_q, args.k)[1], gt)
                sweep[nprobe] = round(r, 4)
                if chosen is None and r >= args.target_recall:
                    chosen = nprobe
            chosen = chosen or max(sweep)
            faiss.extract_index_ivf(single).nprobe = chosen
            icfg_serve, iclient = _serve(isnap, dict(base, service_name="bench-ivf", nprobe=chosen))
            ivf = compare("ivf", single, {"service": iclient}, queries, args.k, max(3, args.repeats // 2))
            ivf["recall_inprocess"] = sweep[chosen]
            ivf["recall_service"] = round(_recall(iclient.search(probe_q, args.k, passages=False).ids, gt), 4)
            ivf.update(factory=factory, nprobe=chosen, recall_sweep=sweep, build_s=round(build_s, 1),
                       target_recall=args.target_recall)
            stop_service(icfg_serve)
            result["ivf"] = ivf
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
