"""Linear + cross-entropy: naive (materialised logits + F.cross_entropy) vs chunked fused.

Forward + backward of ``loss(hidden @ weight.T, labels)`` with hidden and weight requiring grad,
vocab 32000 / hidden 512 / 1024 tokens by default (plus 8192 tokens on CUDA).

Peak memory
    CPU: torch has no CPU allocator statistics, so each variant runs in a fresh subprocess that
    builds the inputs, does one warm-up step (lazy initialisation, oneDNN caches), drops the
    gradients, returns freed heap pages to the OS (``malloc_trim``), records ``VmRSS``, resets the
    kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), runs one
    forward + backward and reads ``VmHWM``.  ``peak = VmHWM - VmRSS_before`` is the resident
    memory the step really touched (inputs excluded; the weight/hidden gradients included, which
    both variants allocate).  Where ``clear_refs`` is unavailable the child skips the warm-up and
    uses ``ru_maxrss`` before/after instead.
    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the step.
Time
    Median over ``--repeats`` of the forward + backward wall time, the two variants interleaved
    in one process.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (
        (torch.randn(tokens, hidden, generator=g) / hidden**0.5)
        .to(device=device, dtype=dtype)
        .requires_grad_()
    )
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    y[::10] = -100  # some ignored positions, as in answer-only training
    return h, w, y


def _step(variant: str, h, w, y, chunk_size: int | None) -> float:
    from ragdist.kernels import linear_cross_entropy, linear_cross_entropy_reference

    h.grad = None
    w.grad = None
    if variant == "naive":
        loss = linear_cross_entropy_reference(h, w, y)
    else:
        loss = linear_cross_entropy(h, w, y, chunk_size=chunk_size)
    loss.backward()
    return float(loss.detach())


# ------------------------------------------------------------------------------ memory (child)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _measure_child(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    h, w, y = _inputs(args.tokens, args.hidden, args.vocab, _DTYPES[args.dtype], "cpu")
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = lambda: libc.malloc_trim(0)  # noqa: E731
    except OSError:
        trim = lambda: None  # noqa: E731
    method = "clear_refs"
    try:
        _step(args.measure, h, w, y, args.chunk_size)  # warm-up
        h.grad = w.grad = None
        gc.collect()
        trim()
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if _status_kb("VmHWM") > before + 1024:  # reset did not take effect
            raise OSError("VmHWM reset unsupported")
        _step(args.measure, h, w, y, args.chunk_size)
        peak_kb = _status_kb("VmHWM") - before
    except (OSError, KeyError):
        method = "ru_maxrss"
        h.grad = w.grad = None
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _step(args.measure, h, w, y, args.chunk_size)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"peak_mb": peak_kb / 1024.0, "method": method}))


def _cpu_peak_mb(variant: str, args, tokens: int) -> tuple[float, str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        variant,
        "--tokens",
        str(tokens),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ)
    # A fixed glibc mmap threshold turns every large tensor into its own mmap that is unmapped on
    # free, so resident memory follows the live tensors instead of what the allocator caches
    # (with the default dynamic threshold, freed 10-30 MB blocks stay in the heap and inflate or
    # hide peaks depending on fragmentation).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return res["peak_mb"], res["method"]


def _cuda_peak_mb(variant: str, h, w, y, chunk_size) -> float:
    _step(variant, h, w, y, chunk_size)  # warm-up
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(variant, h, w, y, chunk_size)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------ driver

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time(variant_fns: dict, repeats: int, sync) -> dict:
    for fn in variant_fns.values():
        fn()
    times: dict = {k: [] for k in variant_fns}
    for _ in range(repeats):
        for name, fn in variant_fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args, device: str, tokens: int) -> dict:
    dtype = _DTYPES[args.dtype]
    h, w, y = _inputs(tokens, args.hidden, args.vocab, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ref = _step("naive", h, w, y, None)
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    got = _step("fused", h, w, y, args.chunk_size)
    err = max(
        abs(got - ref),
        (h.grad - ref_gh).abs().max().item(),
        (w.grad - ref_gw).abs().max().item(),
    )
    del ref_gh, ref_gw
    t = _time(
        {
            "naive": lambda: _step("naive", h, w, y, None),
            "fused": lambda: _step("fused", h, w, y, args.chunk_size),
        },
        args.repeats,
        sync,
    )
    if device == "cuda":
        mem = {v: _cuda_peak_mb(v, h, w, y, args.chunk_size) for v in ("naive", "fused")}
        method = "torch.cuda.max_memory_allocated"
    else:
        del h, w, y
        gc.collect()
        mem, methods = {}, set()
        for v in ("naive", "fused"):
            mem[v], m = _cpu_peak_mb(v, args, tokens)
            methods.add(m)
        method = "/proc VmHWM (subprocess)" if methods == {"clear_refs"} else "ru_maxrss (subprocess)"
    return {
        "peak_mem_ratio": round(mem["fused"] / mem["naive"], 4),
        "time_ratio": round(t["fused"] / t["naive"], 4),
        "naive_peak_mb": round(mem["naive"], 1),
        "fused_peak_mb": round(mem["fused"], 1),
        "naive_s": round(t["naive"], 4),
        "fused_s": round(t["fused"], 4),
        "tokens": tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": args.dtype,
        "device": device,
        "max_abs_err": err,
        "mem_method": method,
    }


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=0, help="0 = tuned default")
    ap.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="0 = torch default")
    ap.add_argument("--measure", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.chunk_size = args.chunk_size or None
    if args.measure:
        _measure_child(args)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    cpu = run(args, "cpu", args.tokens)
    results.append(cpu)
    if torch.cuda.is_available():
        for tokens in sorted({args.tokens, 8192}):
            results.append(run(args, "cuda", tokens))
    for r in results:
        print(
            f"[{r['device']}] tokens={r['tokens']} V={r['vocab']} H={r['hidden']} {r['dtype']}: "
            f"naive {r['naive_s'] * 1e3:.1f} ms / {r['naive_peak_mb']:.1f} MB | "
            f"fused {r['fused_s'] * 1e3:.1f} ms / {r['fused_peak_mb']:.1f} MB | "
            f"time x{r['time_ratio']:.2f}, memory x{r['peak_mem_ratio']:.3f} "
            f"(max |err| {r['max_abs_err']:.1e}; memory via {r['mem_method']})"
        )
    final = dict(cpu)
    if len(results) > 1:
        final["cuda"] = results[1:]
    print(json.dumps(final))
    return final


if __name__ == "__main__":
    main()
