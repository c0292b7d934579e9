"""Fan-out + merge latency vs shard count: the retrieval service's real shard actors, many small shards.

For each shard count S (default 1, 2, 4, ..., 128) the same random vectors are cut into S Flat
shards and served by S `ShardServer` actors (Ray CPU share 0.01 each, 1 FAISS thread). Then, with
batch-1 queries, interleaved call by call:

(a) `RetrievalClient.search`: what a training rank gets (replica choice, hedging, epochs, merge);
(b) direct fan-out: one `query` call per shard actor, `ray.get` of all, `faiss.ResultHeap` merge —
    the floor set by Ray's calls and the actors themselves, without the client's bookkeeping;
(c) one in-process FAISS index over all the vectors: what a user without shards would run.

Reported per S: p50/p99 latency (ms) of each, the CPU time per call of the client process for (a)
and (b) (Ray's own threads in it included), and least-squares
fits latency = a + b*S (+ c*S^2 for the client). On one machine all S actors share its cores, so
the per-shard slope here is an upper bound of the cost the client pays per shard on a cluster,
where the actors run in parallel on their own nodes. Every service is stopped before the next S.

    python bench/fanout.py                        # S = 1..128, 200 calls per point
    python bench/fanout.py --shards 64,128 --calls 100

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

PER_ACTOR_MB = 80  # proportional set size of one idle shard actor process measured here: ~75 MB


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _lat(ts: list[float]) -> dict[str, float]:
    p = np.percentile(np.asarray(ts) * 1000.0, [50, 99])
    return {"p50": round(float(p[0]), 3), "p99": round(float(p[1]), 3)}


def _snapshot(root: str, x: np.ndarray, shards: int) -> str:
    from ragdist.data.corpus import Chunk
    from ragdist.index.builder import build_snapshot
    from ragdist.index.config import IndexConfig

    chunks = [Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=f"passage {i}") for i in range(len(x))]
    return str(build_snapshot(chunks, x, IndexConfig(root=root, num_shards=shards), embedder_name="random"))


def _direct(handles: list, q: np.ndarray, k: int) -> np.ndarray:
    import faiss
    import ray

    parts = ray.get([h.query.remote(q, k, passages=False) for h in handles], timeout=120)
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    for r in parts:
        heap.add_result(np.ascontiguousarray(r["D"]), np.ascontiguousarray(r["G"]))
    heap.finalize()
    return heap.I


def _fit(xs: list[int], ys: list[float], degree: int) -> list[float]:
    """Least-squares coefficients, constant term first."""
    if len(xs) <= degree:
        return []
    return [round(float(c), 4) for c in np.polynomial.polynomial.polyfit(xs, ys, degree)]


def measure(S: int, x: np.ndarray, queries: np.ndarray, k: int, calls: int, root: str) -> dict:
    import faiss
    import psutil
    import ray

    from ragdist.retrieval.client import RetrievalClient, RetrievalConfig, start_service, stop_service

    path = _snapshot(os.path.join(root, f"s{S}"), x, S)
    cfg = RetrievalConfig(service_name=f"fanout-{S}", actor_num_cpus=0.01, threads_per_shard=1,
                          flat_backend="faiss", cache_size=0, timeout_s=600, attempt_timeout_s=60)
    t0 = time.perf_counter()
    start_service(path, cfg)
    up_s = time.perf_counter() - t0
    pids: list[int] = []
    try:
        client = RetrievalClient(cfg)
        handles = [reps[0].handle for reps in client.view.route().replicas]  # one replica of each shard
        pids = [i["pid"] for i in ray.get([h.info.remote() for h in handles], timeout=120)]
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        times: dict[str, list[float]] = {"client": [], "direct": [], "inprocess": []}
        cpu: list[float] = []
        cpu_direct: list[float] = []
        mismatches = 0
        for i in range(calls + 10):  # 10 warm-up calls
            q = queries[i % len(queries)][None]
            t, c = time.perf_counter(), time.process_time()
            got = client.search(q, k, passages=False).ids
            dt, dc = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            direct = _direct(handles, q, k)
            dd, dcd = time.perf_counter() - t, time.process_time() - c
            t = time.perf_counter()
            _, ref = flat.search(q, k)
            di = time.perf_counter() - t
            if i >= 10:
                times["client"].append(dt)
                times["direct"].append(dd)
                times["inprocess"].append(di)
                cpu.append(dc)
                cpu_direct.append(dcd)
                mismatches += int(not (np.array_equal(got, ref) and np.array_equal(direct, ref)))
        return {
            "shards": S,
            "service_up_s": round(up_s, 1),
            "client_ms": _lat(times["client"]),
            "direct_ms": _lat(times["direct"]),
            "inprocess_ms": _lat(times["inprocess"]),
            "client_cpu_ms_per_call": round(1000 * float(np.median(cpu)), 3),
            "direct_cpu_ms_per_call": round(1000 * float(np.median(cpu_direct)), 3),
            "id_mismatches": mismatches,
        }
    finally:
        stop_service(cfg)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.5)  # the actors' processes must be gone: their memory is the next S's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()

    import psutil

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray: a local cluster on loopback only
    import ray

    from ragdist.retrieval.cluster import init_ray

    counts = sorted(int(s) for s in args.shards.split(","))
    rng = np.random.default_rng(0)
    x = _normed(rng, max(counts) * args.rows_per_shard, args.d)
    queries = _normed(rng, 64, args.d)
    init_ray(num_cpus=2)
    points, skipped = [], []
    try:
        with tempfile.TemporaryDirectory() as root:
            for S in counts:
                need = S * PER_ACTOR_MB * 2**20 + (1 << 30)
                if psutil.virtual_memory().available < need:
                    skipped.append({"shards": S, "reason": f"needs ~{need >> 20} MiB free, "
                                    f"{psutil.virtual_memory().available >> 20} MiB available"})
                    print(f"skip S={S}: {skipped[-1]['reason']}", flush=True)
                    continue
                p = measure(S, x[: S * args.rows_per_shard], queries, args.k, args.calls, root)
                points.append(p)
                print(json.dumps(p), flush=True)
    finally:
        ray.shutdown()
    xs = [p["shards"] for p in points]
    fits = {
        "client_p50_ms": {"linear": _fit(xs, [p["client_ms"]["p50"] for p in points], 1),
                          "quadratic": _fit(xs, [p["client_ms"]["p50"] for p in points], 2)},
        "client_p99_ms": {"linear": _fit(xs, [p["client_ms"]["p99"] for p in points], 1)},
        "direct_p50_ms": {"linear": _fit(xs, [p["direct_ms"]["p50"] for p in points], 1)},
        "direct_p99_ms": {"linear": _fit(xs, [p["direct_ms"]["p99"] for p in points], 1)},
        "client_cpu_ms": {"linear": _fit(xs, [p["client_cpu_ms_per_call"] for p in points], 1),
                          "quadratic": _fit(xs, [p["client_cpu_ms_per_call"] for p in points], 2)},
        "direct_cpu_ms": {"linear": _fit(xs, [p["direct_cpu_ms_per_call"] for p in points], 1)},
    }
    print(json.dumps({"rows_per_shard": args.rows_per_shard, "d": args.d, "k": args.k, "calls": args.calls,
                      "cores": len(os.sched_getaffinity(0)), "points": points, "skipped": skipped, "fits": fits}))


if __name__ == "__main__":
    main()
