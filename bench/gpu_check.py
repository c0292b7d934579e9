"""`make gpu-check`: what only a CUDA GPU can show, in one bounded run (about 8 minutes at most).

Steps, each in a process of its own under a time limit (a step that fails or runs out of time is
recorded and the next one runs):

  faiss     faiss-gpu in place of faiss-cpu when it is missing (the two share the `faiss/` folder:
            faiss-cpu is uninstalled first), from the `[gpu]` extra in pyproject.toml;
  tests     every GPU-marked test (`pytest -m gpu`);
  train     DeepSpeed ZeRO-3 bf16 steps of the largest random Llama that fits quickly, through
            ragdist's own engine (ragdist.train.engine.build_engine): tokens/s, peak GPU memory;
  fsdp      the same steps through the FSDP2 engine (bf16 mixed precision);
  eval      a sharded evaluation: the built-in airports indexed in 2 shards served from the GPU by
            the retrieval service, a random generator on the GPU, ragdist.eval.runner.evaluate_model;
  search    faiss-gpu shard actors vs one in-process faiss-gpu index (bench/retrieval.py --device gpu);
  kernels   the Triton kernels vs their references: linear + cross-entropy (bench/linear_ce.py) and
            exact top-k vs the torch-on-CUDA scan and faiss-gpu (bench/search.py --gpu-only).

The last line printed is one JSON object (also written to --out): the headline figures, then every
step's own. Without a GPU nothing runs: one JSON line {"skipped": "<why>"} and exit status 0.

    python bench/gpu_check.py [--out runs/gpu-check/result.json] [--budget-s 450] [--size auto] [--only train,eval]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Per-step ceilings (seconds); each step is also cut at what is left of --budget-s.
LIMITS = {"faiss": 240, "tests": 180, "train": 150, "fsdp": 120, "eval": 150, "search": 120, "kernels": 120}

# Random Llama sizes for the training step, by GPU memory: (min GiB, hidden, layers, heads, ffn, seq, batch).
# ZeRO-3 with AdamW on one GPU holds ~20 bytes per parameter plus activations; each of these starts
# in seconds and steps in well under a second on a recent GPU.
SIZES = {
    "large": (60, 2048, 22, 16, 5632, 1024, 8),  # ~1.0B parameters
    "medium": (20, 1024, 16, 16, 2816, 512, 8),  # ~0.2B
    "small": (0, 512, 8, 8, 1408, 512, 4),  # ~0.04B
    "tiny": (0, 64, 2, 2, 128, 64, 2),  # never chosen by `auto`: the CPU smoke run of the steps' code
}


def _clean(x: Any) -> Any:
    """Strict JSON: NaN and infinities (a metric with nothing to average) become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(_clean(obj), default=str, allow_nan=False)


def write_result(result: dict[str, Any], out: Path) -> None:
    """Print the result as the last line and write it to `out` atomically."""
    line = _json_line(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(line + "\n")
    os.replace(tmp, out)
    print(line, flush=True)


def skip_reason() -> str | None:
    """Why this machine cannot run the check, or None when it has a CUDA GPU torch can use."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA GPU: nvidia-smi is not on the PATH"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no usable NVIDIA GPU: nvidia-smi -L failed ({e})"
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode != 0 or not gpus:
        return f"no usable NVIDIA GPU: nvidia-smi -L lists none (exit {listed.returncode})"
    try:
        import torch
    except ImportError as e:
        return f"torch does not import in {sys.executable} ({e})"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} in {sys.executable} cannot use the GPU that nvidia-smi lists "
            f"({gpus[0]}): a CPU build, or a driver too old for CUDA {torch.version.cuda}"
        )
    return None


# ------------------------------------------------------------------------------ running steps


def _pythonpath() -> str:
    """The repo first, then whatever PYTHONPATH the caller set (packages installed with --target, say)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def run_bounded(cmd: list[str], limit_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` in a session of its own; past `limit_s` the whole process group is ended
    (SIGTERM, then SIGKILL), as `timeout` would, so no Ray or rank process outlives its step."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def pump() -> None:  # shown as it comes (a step can take minutes), kept for the figures
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write("    " + line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return {"rc": proc.returncode, "timed_out": timed_out, "s": round(time.perf_counter() - t0, 1), "output": "".join(lines)}


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _failure(r: dict[str, Any], limit_s: float) -> str:
    if r["timed_out"]:
        return f"timed out after {limit_s:.0f}s"
    tail = [ln for ln in r["output"].strip().splitlines() if ln.strip()][-3:]
    return f"exit {r['rc']}: " + " | ".join(tail)[-600:]


def python_step(step: str, limit_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """One of this file's own steps (--step), in a fresh interpreter; its figures come back as JSON."""
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{step}-") as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--step-out", str(out), "--size", args.size,
               "--step-device", args.step_device]  # fmt: skip
        r = run_bounded(cmd, limit_s, dict(os.environ, PYTHONPATH=_pythonpath()))
        figures = json.loads(out.read_text()) if out.is_file() else None
    if r["rc"] != 0 or figures is None:
        return {"ok": False, "error": _failure(r, limit_s), "s": r["s"]}
    return {"ok": True, "s": r["s"], **figures}


def bench_step(script: str, argv: list[str], limit_s: float, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=_pythonpath(), **(env_extra or {}))
    r = run_bounded([sys.executable, str(ROOT / "bench" / script), *argv], limit_s, env)
    figures = last_json(r["output"]) if r["rc"] == 0 else None
    if figures is None:
        return {"ok": False, "error": _failure(r, limit_s), "s": r["s"]}
    return {"ok": True, "s": r["s"], "figures": figures}


# ------------------------------------------------------------------------------ faiss / tests


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _gpu_requirement() -> str:
    """The faiss requirement of pyproject.toml's `[gpu]` extra (one place says which faiss-gpu)."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        extras = tomllib.loads(text)["project"]["optional-dependencies"]["gpu"]
    except ImportError:  # Python 3.10: the extra is one line of quoted requirements
        line = re.search(r"^gpu\s*=\s*\[(.*)\]", text, re.M)
        extras = re.findall(r'"([^"]+)"', line.group(1)) if line else []
    (req,) = [r for r in extras if r.lower().startswith("faiss")]
    return req


def _faiss_gpus(limit_s: float) -> tuple[int, str]:
    r = run_bounded([sys.executable, "-c", "import faiss; print(faiss.__version__, faiss.get_num_gpus())"], limit_s)
    words = r["output"].split()
    if r["rc"] != 0 or len(words) < 2 or not words[-1].isdigit():
        return 0, _failure(r, limit_s)
    return int(words[-1]), words[-2]


def step_faiss(limit_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    req = _gpu_requirement()
    name = re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]
    had_gpu, had_cpu = _installed(name), _installed("faiss-cpu")
    actions: list[str] = []
    if not had_gpu or had_cpu:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if had_cpu:
            r = run_bounded([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "faiss-cpu"], 60)
            actions.append(f"uninstalled faiss-cpu {had_cpu}")
            if r["rc"] != 0:
                return {"ok": False, "error": "pip uninstall faiss-cpu: " + _failure(r, 60), "actions": actions}
            if had_gpu:  # the uninstall removed the faiss/ files both packages own: put faiss-gpu's back
                pip += ["--force-reinstall", "--no-deps"]
        left = max(30.0, limit_s - (time.perf_counter() - t0) - 30)
        r = run_bounded([*pip, req], left)
        actions.append(f"pip install {req}")
        if r["rc"] != 0:
            return {"ok": False, "error": f"pip install {req}: " + _failure(r, left), "actions": actions}
    n, version = _faiss_gpus(60)
    out = {"package": f"{name} {_installed(name)}", "faiss": version, "faiss_gpus": n, "actions": actions,
           "s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if n < 1:
        return {"ok": False, "error": f"faiss sees no GPU after the install ({version})", **out}
    return {"ok": True, **out}


def step_tests(limit_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "tests"]
    r = run_bounded(cmd, limit_s, dict(os.environ, PYTHONPATH=_pythonpath()))
    pattern = r"(\d+) (passed|failed|skipped|errors?|deselected)"
    final = next((ln for ln in reversed(r["output"].splitlines()) if re.search(pattern, ln)), "")
    counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in re.findall(pattern, final)}
    summary = {k: counts.get(k.rstrip("s") if k == "errors" else k, 0) for k in ("passed", "failed", "skipped", "errors")}
    out: dict[str, Any] = {"ok": False, "s": r["s"], **summary}
    if r["timed_out"]:
        out["error"] = f"timed out after {limit_s:.0f}s"
    elif summary["failed"] or summary["errors"]:
        out["error"] = f"{summary['failed']} failed, {summary['errors']} errors"
    elif not summary["passed"]:
        out["error"] = "no GPU test passed (all skipped, or none collected)"
    elif r["rc"] != 0:
        out["error"] = _failure(r, limit_s)
    else:
        out["ok"] = True
    out["not_passed"] = [ln for ln in r["output"].splitlines() if ln.startswith(("FAILED", "ERROR", "SKIPPED"))][:20]
    return out


# ------------------------------------------------------------------------------ steps in a child


def _size(choice: str) -> tuple[str, tuple[int, ...]]:
    import torch

    if choice != "auto":
        return choice, SIZES[choice]
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    for name, spec in SIZES.items():
        if gib >= spec[0]:
            return name, spec
    return "small", SIZES["small"]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def child_train(size: str, device: str = "cuda", engine_name: str = "deepspeed") -> dict[str, Any]:
    """ZeRO-3 bf16 steps of a random Llama on this GPU through ragdist's DeepSpeed engine (1 rank), or
    the same steps through the FSDP2 engine (`engine_name="fsdp"`).

    `device="cpu"` runs the same code on a CPU rank (gloo), only to test it where there is no GPU.
    """
    import torch

    from ragdist import distributed as rdist
    from ragdist.train.engine import TrainerConfig
    from ragdist.train.engines import build_engine
    from ragdist.train.loop import build_module_fn
    from ragdist.train.model import IGNORE, ModelConfig, load_tokenizer
    from ragdist.train.peft import PeftConfig

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(rdist.free_port()))
    if device == "cuda":
        torch.cuda.set_device(0)
    name, (_, hidden, layers, heads, ffn, seq, batch) = _size(size)
    mcfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn, max_position=seq)
    tok = load_tokenizer(mcfg)
    trainer = TrainerConfig(engine=engine_name, zero_stage=3, precision="bf16", micro_batch_size=batch,
                            max_seq_len=seq, warmup_steps=0, max_steps=100, lr=1e-4)  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as run_dir:
        engine = build_engine(trainer, build_module_fn(mcfg, tok, PeftConfig()), run_dir)
        setup_s = time.perf_counter() - t0
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, len(tok), (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq - seq // 8] = IGNORE  # the answer is the last eighth, as in answer-only training
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        times, losses = [], []
        for _ in range(1 + 5):  # the first step (allocations, kernel choice) is not timed
            _sync(device)
            t = time.perf_counter()
            losses.append(float(engine.train_step(data)))
            _sync(device)
            times.append(time.perf_counter() - t)
        peak = _peak_gb(device)
        engine_device = engine.device
        engine.close()
        del engine
    rdist.shutdown()
    step_s = statistics.median(times[1:])
    return {
        "size": name, "params_m": round(params / 1e6, 1), "hidden": hidden, "layers": layers, "seq": seq,
        "micro_batch": batch, "engine": engine_name, "zero_stage": trainer.zero_stage if engine_name == "deepspeed" else None,
        "precision": "bf16", "setup_s": round(setup_s, 1),
        "first_step_s": round(times[0], 3), "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s, 1),
        "losses": [round(x, 4) for x in losses], "loss_finite": all(math.isfinite(x) for x in losses),
        "peak_gpu_mem_gb": peak, "device": str(engine_device),
    }  # fmt: skip


def child_eval(size: str, device: str = "cuda") -> dict[str, Any]:
    """The built-in airports in 2 GPU shards behind the retrieval service; a random generator on the GPU
    answers the held-out questions through ragdist's evaluation runner (`device="cpu"`: the same on CPU)."""
    import torch

    from ragdist.data.builtin import materialize
    from ragdist.data.corpus import chunk_documents, load_documents
    from ragdist.data.qa import DataConfig, check_gold_ids, load_qa
    from ragdist.embed import EmbedderConfig, build_embedder
    from ragdist.eval.compare import ServiceRetriever, rank_all, retrieval_report
    from ragdist.eval.runner import EvalConfig, evaluate_strategy, retrieval_depth
    from ragdist.index.builder import IndexConfig, build_snapshot
    from ragdist.index.reader import iter_passage_ids
    from ragdist.retrieval.client import RetrievalClient, RetrievalConfig, start_service, stop_service
    from ragdist.retrieval.cluster import init_ray
    from ragdist.train.model import ModelConfig, build_generator, load_tokenizer

    name, (_, hidden, layers, heads, ffn, _seq, _batch) = _size(size)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-eval-") as tmp:
        paths = materialize(DataConfig(builtin_dir=tmp, num_entities=2000 if device == "cuda" else 200))
        embedder = build_embedder(EmbedderConfig(device=device, progress=False))
        chunks = chunk_documents(load_documents(paths["corpus"]), embedder.tokenizer, 128, 32)
        vectors = embedder.encode([c.text for c in chunks])
        snapshot = build_snapshot(chunks, vectors, IndexConfig(num_shards=2, root=f"{tmp}/index"), embedder_name=embedder.name)
        evals = load_qa(paths["eval"], 128 if device == "cuda" else 24)
        check_gold_ids(evals, iter_passage_ids(snapshot), paths["eval"])
        init_ray(num_cpus=min(8, os.cpu_count() or 2))
        rcfg = RetrievalConfig(service_name="gpu-check", device="gpu" if device == "cuda" else "cpu", shards_per_gpu=2)
        start_service(str(snapshot), rcfg)
        try:
            devices = [r.get("device") for r in RetrievalClient(rcfg).metrics(replicas=True)["replicas"]]
            mcfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn)
            tok = load_tokenizer(mcfg)
            with torch.device(device):  # built where it runs: no whole-model copy through host memory
                model = build_generator(mcfg, tok)
            model = model.to(torch.bfloat16).eval()
            setup_s = time.perf_counter() - t0
            cfg = EvalConfig(max_new_tokens=8, batch_size=64, topk_sweep=[0, 1, 3], distractors=[1],
                             latency_samples=8, plots=False)  # fmt: skip
            t1 = time.perf_counter()
            # As ragdist-eval does it: one ranking per question to the depth every check needs, then the row.
            retrieve = ServiceRetriever(rcfg, embedder)
            ranked, batched_s = rank_all(retrieve, evals, retrieval_depth(cfg, 3), cfg.batch_size)
            recall = retrieval_report(evals, ranked, [1, 3, 10])["metrics"]
            out = evaluate_strategy(model, tok, evals, ranked=ranked, top_k=3, cfg=cfg, retrieve=retrieve)
            eval_s = time.perf_counter() - t1
            free, total = torch.cuda.mem_get_info() if device == "cuda" else (0, 0)
        finally:
            stop_service(rcfg)
            import ray

            ray.shutdown()
    m = out["metrics"]
    return {
        "size": name, "passages": len(chunks), "shards": 2, "shard_devices": devices, "questions": len(evals),
        "setup_s": round(setup_s, 1), "eval_s": round(eval_s, 1), "questions_per_s": round(len(evals) / eval_s, 2),
        "recall@1": recall.get("recall@1"), "recall@3": recall.get("recall@3"), "recall@10": recall.get("recall@10"),
        "em": m.get("em"), "batched_retrieval_ms_per_q": round(1e3 * batched_s, 3),
        "retrieval_latency_p50_ms": round(1e3 * (m.get("retrieval_latency_s") or {}).get("p50", float("nan")), 2),
        "peak_gpu_mem_gb": _peak_gb(device),
        "device_used_gb": round((total - free) / 2**30, 2) if device == "cuda" else None,
    }  # fmt: skip


# ------------------------------------------------------------------------------ the run


def headline(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures the JSON line leads with, from whatever steps produced them."""
    out: dict[str, Any] = {}
    train, ev, search = steps.get("train", {}), steps.get("eval", {}), steps.get("search", {})
    kern = steps.get("kernels", {})
    out["tokens_per_s"] = train.get("tokens_per_s")
    out["fsdp_tokens_per_s"] = steps.get("fsdp", {}).get("tokens_per_s")
    ratio = (search.get("figures") or {}).get("service_ratio") or {}
    out["search_qps_ratio"] = ratio or None  # shards / in-process, per batch size
    out["search_qps_ratio_min"] = min(ratio.values()) if ratio else None
    lce = [r for r in ((kern.get("linear_ce") or {}).get("cuda") or [])]
    out["linear_ce_speedup"] = {str(r["tokens"]): round(r["naive_s"] / r["fused_s"], 3) for r in lce} or None
    out["linear_ce_peak_mem_ratio"] = {str(r["tokens"]): r["peak_mem_ratio"] for r in lce} or None
    topk = ((kern.get("topk") or {}).get("gpu")) or {}
    out["topk_backend"] = topk.get("backend")
    out["topk_triton_speedup_vs_torch"] = topk.get("triton_speedup_vs_torch")
    out["topk_auto_speedup_vs_torch"] = topk.get("auto_speedup_vs_torch")  # Triton where faster, else torch
    qps, fq = topk.get("qps") or {}, topk.get("faiss_gpu_qps") or {}
    out["topk_vs_faiss_gpu"] = {b: round(qps[b] / fq[b], 3) for b in qps if fq.get(b)} or None
    # torch.cuda.max_memory_allocated of the training and the evaluation process
    peaks = [s.get("peak_gpu_mem_gb") for s in (train, steps.get("fsdp", {}), ev) if s.get("peak_gpu_mem_gb") is not None]
    out["peak_gpu_mem_gb"] = max(peaks) if peaks else None
    out["eval_recall@3"] = ev.get("recall@3")
    tests = steps.get("tests", {})
    out["gpu_tests"] = {k: tests.get(k) for k in ("passed", "failed", "skipped", "errors")} if tests else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", str(ROOT / "runs" / "gpu-check" / "result.json")))
    ap.add_argument("--budget-s", type=float, default=450.0, help="steps end by then (each is cut at what is left)")
    ap.add_argument("--size", default="auto", choices=["auto", *SIZES], help="random model for train/eval")
    ap.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    ap.add_argument("--step", choices=["train", "fsdp", "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--step-out", help=argparse.SUPPRESS)
    ap.add_argument("--step-device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.step:
        if args.step == "eval":
            figures = child_eval(args.size, args.step_device)
        else:
            figures = child_train(args.size, args.step_device, "fsdp" if args.step == "fsdp" else "deepspeed")
        Path(args.step_out).write_text(json.dumps(figures))
        return 0

    out = Path(args.out)
    reason = skip_reason()
    if reason is not None:
        print(f"gpu-check: skipped: {reason}", flush=True)
        write_result({"skipped": reason}, out)
        return 0

    import torch

    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "gpu_count": torch.cuda.device_count(), "gpu_mem_gb": round(props.total_memory / 2**30, 1),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.executable}  # fmt: skip
    wanted = [s for s in args.only.split(",") if s] or list(LIMITS)
    plan = {
        "faiss": lambda lim: step_faiss(lim),
        "tests": lambda lim: step_tests(lim),
        "train": lambda lim: python_step("train", lim, args),
        "fsdp": lambda lim: python_step("fsdp", lim, args),
        "eval": lambda lim: python_step("eval", lim, args),
        "search": lambda lim: bench_step(
            "retrieval.py",
            ["--device", "gpu", "--nb", "500000", "--batches", "16,256,1024", "--repeats", "5", "--shards", "2",
             "--flat-backend", "faiss", "--flat-dtype", "fp32", "--no-ivf"],  # fmt: skip
            lim,
        ),
        "kernels": lambda lim: kernels_step(lim),
    }
    steps: dict[str, dict[str, Any]] = {}
    for name in wanted:
        spent = time.perf_counter() - t_start
        left = args.budget_s - spent
        if left < 20:
            steps[name] = {"ok": False, "error": f"not started: the {args.budget_s:.0f}s budget was spent"}
            continue
        print(f"gpu-check: {name} (limit {min(LIMITS[name], left):.0f}s)", flush=True)
        try:
            steps[name] = plan[name](min(LIMITS[name], left))
        except Exception as e:  # a step's own bug must not cost the other steps
            steps[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"gpu-check: {name}: {'ok' if steps[name].get('ok') else 'FAILED ' + str(steps[name].get('error'))}",
              flush=True)  # fmt: skip
    failed = [n for n, s in steps.items() if not s.get("ok")]
    try:
        figures = headline(steps)
    except Exception as e:  # the steps' own figures below still say everything
        figures = {"headline_error": f"{type(e).__name__}: {e}"}
    result = {**figures, "failed_steps": failed, **env, "elapsed_s": round(time.perf_counter() - t_start, 1),
              "steps": steps}  # fmt: skip
    write_result(result, out)
    return 1 if failed else 0


def kernels_step(limit_s: float) -> dict[str, Any]:
    """Triton kernels vs their references, each by its own benchmark, in half the limit each."""
    half = limit_s / 2
    lce = bench_step("linear_ce.py", ["--dtype", "bf16", "--repeats", "5"], half, {"RAGDIST_LINEAR_CE_BACKEND": "triton"})
    topk = bench_step("search.py", ["--gpu-only", "--nb", "1000000", "--db-dtype", "fp32", "--batches", "16,256,1024",
                                    "--repeats", "5"], half)  # fmt: skip
    out: dict[str, Any] = {"ok": lce["ok"] and topk["ok"], "s": round(lce["s"] + topk["s"], 1)}
    out["linear_ce"] = lce.get("figures") if lce["ok"] else {"error": lce["error"]}
    out["topk"] = topk.get("figures") if topk["ok"] else {"error": topk["error"]}
    if lce["ok"] and not (lce["figures"].get("cuda")):
        out["ok"], out["error"] = False, "bench/linear_ce.py ran no CUDA case"
    if topk["ok"] and (topk["figures"].get("gpu") or {}).get("backend") != "triton":
        out["ok"], out["error"] = False, f"top-k ran {topk['figures'].get('gpu', {}).get('backend')}, not Triton"
    if not out["ok"] and "error" not in out:
        out["error"] = "; ".join(str(x["error"]) for x in (lce, topk) if not x["ok"])
    return out


if __name__ == "__main__":
    sys.exit(main())
