"""Exact inner-product top-k: ragdist.kernels.TorchFlatIP vs faiss.IndexFlatIP.

Builds seeded, L2-normalised random vectors, measures the median QPS of both indexes per query
batch size (measurements interleaved, so load drift on a shared machine hits both alike), checks
that the returned ids are identical, and measures the machine's fp32 GEMM rate (torch.mm of the
search shape and of a large square, max of the two) to express our throughput as a fraction of it.
With CUDA, the GPU path is also timed (and faiss.GpuIndexFlatIP when faiss has GPUs); when that path
is the Triton kernel, the torch-on-CUDA reference scan and the Triton scan forced on every batch are
timed beside it, id for id (the automatic choice runs Triton only where it was measured faster:
ragdist.kernels.topk.scan_kernel).

The last line printed is one JSON object with the figures.

    python bench/search.py --nb 200000 --d 384 --k 10 --batches 16,64,256,1024 --repeats 5
    python bench/search.py --gpu-only --nb 1000000 --db-dtype fp32   # CUDA only: Triton vs torch vs faiss-gpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # non-Linux
        return os.cpu_count() or 1


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per callable, alternating them within each repeat."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm_gflops(nb: int, d: int, batch: int, device: str = "cpu", repeats: int = 3) -> dict:
    """fp32 GEMM rate: ``(batch, d) @ (d, nb)`` and a 2048^3 square (4096^3 on GPU)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(batch, d, generator=gen).to(device)
    b = torch.randn(nb, d, generator=gen).to(device)
    out = torch.empty(batch, nb, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def shaped():
        torch.mm(a, b.T, out=out)
        sync()

    n = 4096 if device == "cuda" else 2048
    s1 = torch.randn(n, n, generator=gen).to(device)
    s2 = torch.randn(n, n, generator=gen).to(device)
    sq_out = torch.empty(n, n, device=device)

    def square():
        torch.mm(s1, s2, out=sq_out)
        sync()

    t_shaped = _median_time(shaped, repeats)
    t_square = _median_time(square, repeats)
    return {
        "search_shape": 2.0 * batch * d * nb / t_shaped / 1e9,
        "square": 2.0 * n**3 / t_square / 1e9,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nb", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batches", default="16,64,256,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--db-dtype", default="bf16", choices=["fp32", "bf16"], help="dtype of our scanned database"
    )
    ap.add_argument("--block-size", type=int, default=0, help="0 = tuned default")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores (torch and faiss)")
    ap.add_argument("--no-fp32-path", action="store_true", help="skip timing our fp32 path alongside")
    ap.add_argument("--gpu-only", action="store_true", help="only the CUDA section (needs a GPU)")
    args = ap.parse_args(argv)
    if args.gpu_only and not torch.cuda.is_available():
        raise SystemExit("--gpu-only: torch sees no CUDA GPU")

    import faiss

    from ragdist.kernels import TorchFlatIP

    threads = args.threads or _cores()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    print(
        f"# nb={args.nb} d={args.d} k={args.k} threads={threads} torch={torch.__version__} "
        f"faiss={faiss.__version__} loadavg={os.getloadavg()[0]:.2f}"
    )

    rng = np.random.default_rng(args.seed)
    xb = rng.standard_normal((args.nb, args.d), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    queries = {}
    for bs in batches:
        q = rng.standard_normal((bs, args.d), dtype=np.float32)
        queries[bs] = q / np.linalg.norm(q, axis=1, keepdims=True)

    if args.gpu_only:
        result = {"gpu": _gpu_section(args, xb, queries, batches), "loadavg_1m": round(os.getloadavg()[0], 2)}
        print(json.dumps(result))
        return result

    ref = faiss.IndexFlatIP(args.d)
    ref.add(xb)
    ours = TorchFlatIP(args.d, db_dtype=args.db_dtype, device="cpu", block_size=args.block_size)
    ours.add(xb)
    ours32 = None
    if not args.no_fp32_path and args.db_dtype != "fp32":
        ours32 = TorchFlatIP(args.d, db_dtype="fp32", device="cpu", block_size=args.block_size)
        ours32.add(xb)

    ref_bs = 256 if 256 in batches else batches[-1]
    # fp32 GEMM of the search shape, timed interleaved with the searches at ``ref_bs`` so that
    # the gemm fraction compares figures from the same time window (matters on a shared machine).
    gq = torch.randn(ref_bs, args.d)
    gxb = torch.from_numpy(xb)
    gout = torch.empty(ref_bs, args.nb)
    qps, faiss_qps, qps32 = {}, {}, {}
    gemm_shaped = 0.0
    mismatches = 0
    max_score_diff = 0.0
    for bs in batches:
        q = queries[bs]
        Dr, Ir = ref.search(q, args.k)
        D, ids = ours.search(q, args.k)
        mismatches += int((ids != Ir).sum())
        max_score_diff = max(max_score_diff, float(np.abs(D - Dr).max()))
        fns = {"faiss": lambda q=q: ref.search(q, args.k), "ours": lambda q=q: ours.search(q, args.k)}
        if ours32 is not None:
            D32, I32 = ours32.search(q, args.k)
            mismatches += int((I32 != Ir).sum())
            fns["ours_fp32"] = lambda q=q: ours32.search(q, args.k)
        if bs == ref_bs:
            fns["gemm"] = lambda: torch.mm(gq, gxb.T, out=gout)
        t = _interleaved(fns, args.repeats)
        if bs == ref_bs:
            gemm_shaped = 2.0 * ref_bs * args.d * args.nb / t["gemm"] / 1e9
        faiss_qps[bs] = bs / t["faiss"]
        qps[bs] = bs / t["ours"]
        line = f"batch {bs:5d}: faiss {faiss_qps[bs]:9.1f} qps | ours[{args.db_dtype}] {qps[bs]:9.1f} qps"
        if ours32 is not None:
            qps32[bs] = bs / t["ours_fp32"]
            line += f" | ours[fp32] {qps32[bs]:9.1f} qps"
        print(line + f" | ratio {qps[bs] / faiss_qps[bs]:.2f}x")

    ratio = {bs: qps[bs] / faiss_qps[bs] for bs in batches}
    gemm = gemm_gflops(args.nb, args.d, ref_bs)
    gemm["search_shape"] = max(gemm["search_shape"], gemm_shaped)
    gemm_rate = max(gemm.values())
    flops_per_query = 2.0 * args.d * args.nb
    gemm_fraction = qps[ref_bs] * flops_per_query / 1e9 / gemm_rate
    print(
        f"fp32 GEMM rate: {gemm['search_shape']:.1f} GF/s ({ref_bs}x{args.d} @ {args.d}x{args.nb}), "
        f"{gemm['square']:.1f} GF/s (square) -> {gemm_rate:.1f} GF/s"
    )
    print(
        f"batch {ref_bs}: ours[{args.db_dtype}] runs at {qps[ref_bs] * flops_per_query / 1e9:.1f} "
        f"fp32-equivalent GF/s = {gemm_fraction:.2f} of the fp32 GEMM rate"
    )
    result = {
        "qps": {str(b): round(v, 1) for b, v in qps.items()},
        "faiss_qps": {str(b): round(v, 1) for b, v in faiss_qps.items()},
        "ratio_vs_faiss": {str(b): round(v, 3) for b, v in ratio.items()},
        "min_ratio_vs_faiss": round(min(ratio.values()), 3),
        "gemm_fraction": round(gemm_fraction, 3),
        "gemm_gflops": round(gemm_rate, 1),
        "ids_identical": mismatches == 0,
        "id_mismatches": mismatches,
        "max_score_diff": max_score_diff,
        "db_dtype": args.db_dtype,
        "device": "cpu",
        "threads": threads,
    }
    if qps32:
        result["fp32_path"] = {
            "qps": {str(b): round(v, 1) for b, v in qps32.items()},
            "min_ratio_vs_faiss": round(min(qps32[b] / faiss_qps[b] for b in batches), 3),
            "gemm_fraction": round(qps32[ref_bs] * flops_per_query / 1e9 / gemm_rate, 3),
        }
    print(f"id mismatches vs faiss: {mismatches}; max |score diff|: {max_score_diff:.2e}")

    if torch.cuda.is_available():
        result["gpu"] = _gpu_section(args, xb, queries, batches)
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return result


def _gpu_section(args, xb, queries, batches) -> dict:
    import faiss

    from ragdist.kernels import TorchFlatIP, scan_kernel, select_backend

    out: dict = {"backend": select_backend("cuda"), "qps": {}, "faiss_gpu_qps": {}, "db_dtype": args.db_dtype}
    ours = TorchFlatIP(args.d, db_dtype=args.db_dtype, device="cuda")
    ours.add(xb)
    # The Triton kernel's reference: the same search as blocked torch GEMM + topk on the GPU; and the
    # Triton scan on every batch, whatever the automatic choice (`ours`) runs.
    torch_ref = triton_all = None
    if out["backend"] == "triton":
        torch_ref = TorchFlatIP(args.d, db_dtype=args.db_dtype, device="torch-cuda")
        torch_ref.add(xb)
        triton_all = TorchFlatIP(args.d, db_dtype=args.db_dtype, device="triton")
        triton_all.add(xb)
        out.update(kernel={}, torch_cuda_qps={}, triton_qps={}, triton_speedup_vs_torch={}, auto_speedup_vs_torch={},
                   id_mismatches_vs_torch_cuda=0)  # fmt: skip
    gpu_ref = None
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        gpu_ref = faiss.GpuIndexFlatIP(res, args.d)
        gpu_ref.add(xb)
    mism = 0
    for bs in batches:
        q = queries[bs]
        fns = {"ours": lambda q=q: ours.search(q, args.k)}
        if gpu_ref is not None:
            fns["faiss_gpu"] = lambda q=q: gpu_ref.search(q, args.k)
            mism += int((ours.search(q, args.k)[1] != gpu_ref.search(q, args.k)[1]).sum())
        if torch_ref is not None and triton_all is not None:
            fns["torch_cuda"] = lambda q=q: torch_ref.search(q, args.k)
            fns["triton"] = lambda q=q: triton_all.search(q, args.k)
            ref_ids = torch_ref.search(q, args.k)[1]
            for idx in (ours, triton_all):
                out["id_mismatches_vs_torch_cuda"] += int((idx.search(q, args.k)[1] != ref_ids).sum())
        t = _interleaved(fns, args.repeats)
        out["qps"][str(bs)] = round(bs / t["ours"], 1)
        if torch_ref is not None:
            out["kernel"][str(bs)] = scan_kernel(out["backend"], bs, args.k, args.db_dtype)
            out["torch_cuda_qps"][str(bs)] = round(bs / t["torch_cuda"], 1)
            out["triton_qps"][str(bs)] = round(bs / t["triton"], 1)
            out["triton_speedup_vs_torch"][str(bs)] = round(t["torch_cuda"] / t["triton"], 3)
            out["auto_speedup_vs_torch"][str(bs)] = round(t["torch_cuda"] / t["ours"], 3)
        if gpu_ref is not None:
            out["faiss_gpu_qps"][str(bs)] = round(bs / t["faiss_gpu"], 1)
        print(
            f"[gpu] batch {bs:5d}: ours[{out.get('kernel', {}).get(str(bs), out['backend'])}] {bs / t['ours']:10.1f} qps"
            + (f" | triton {bs / t['triton']:10.1f} | torch-cuda {bs / t['torch_cuda']:10.1f} qps"
               if torch_ref is not None else "")  # fmt: skip
            + (f" | faiss-gpu {bs / t['faiss_gpu']:10.1f} qps" if gpu_ref is not None else "")
        )
    out["id_mismatches_vs_faiss_gpu"] = mism if gpu_ref is not None else None
    out["gemm_gflops"] = round(max(gemm_gflops(args.nb, args.d, 256, device="cuda").values()), 1)
    return out


if __name__ == "__main__":
    main()
