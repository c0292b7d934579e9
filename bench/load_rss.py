"""Peak memory per rank while a pretrained model loads into the training engine: ZeRO-3 (weights
partitioned as they load) vs a full copy of the model on every rank.

A random LlamaConfig model (~110M parameters at the defaults, fp32 unless --dtype) is written with save_pretrained;
2 ranks on this node build the training module from that directory through ragdist's engine build
path (`build_engine` with a `GeneratorBuilder`, model.name_or_path=<dir>), in these modes:

- zero3:  trainer.zero_stage=3: under transformers' HfDeepSpeedConfig, `from_pretrained` builds
          each parameter partitioned and rank 0 alone reads the checkpoint;
- full:   trainer.zero_stage=0: every rank loads the whole model (plain data parallel);
- fsdp:   trainer.engine=fsdp: meta-device build, rank 0 loads, each rank receives its shards.

Per rank, from the moment before the model is built until the engine is ready to train: peak RSS
(VmHWM, reset first; also its value once the model is built, before the engine's own setup), and
the peak of its private part (RssAnon, sampled every 2 ms; file pages of
the memory-mapped checkpoint are shared between ranks and reclaimable, anonymous pages are not);
then the peak RSS once one training step has made gradients and optimizer state exist.
Each figure is the increase over the rank's RSS just before loading (interpreter, torch, DeepSpeed:
the same in every mode). Modes are interleaved round by round; medians over rounds. The last line is
one JSON object. `--dtype bf16` saves the checkpoint in bf16 and loads it in bf16 (with
`trainer.precision=auto`, bf16 mixed precision), as a pretrained model is usually shipped and trained:

    python bench/load_rss.py --rounds 3
    python bench/load_rss.py --rounds 3 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODES = ("zero3", "full", "fsdp")


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Probe:
    """The engine's model builder, noting the peak RSS when the model has been built."""

    def __init__(self, builder):
        self.builder, self.peak = builder, 0
        self.dtype, self.pretrained, self.hidden_size = builder.dtype, builder.pretrained, builder.hidden_size

    def __call__(self):
        module = self.builder()
        self.peak = _status()["VmHWM"]
        return module

    def on_meta(self, *args):
        return self.builder.on_meta(*args)


def rank_main(mode: str, model_dir: str, out: str, dtype: str = "fp32") -> None:
    import torch
    import torch.distributed as dist

    from ragdist import distributed as rdist
    from ragdist.train.engine import TrainerConfig
    from ragdist.train.engines import build_engine
    from ragdist.train.model import AnswerLossLM, GeneratorBuilder, ModelConfig

    torch.set_num_threads(1)
    rank, _ = rdist.init_process_group()
    if mode != "fsdp":
        from ragdist.train.deepspeed_engine import init_distributed

        init_distributed()  # DeepSpeed's own setup (and its buffers) before the baseline
    trainer = TrainerConfig(
        engine="fsdp" if mode == "fsdp" else "deepspeed", zero_stage=3 if mode == "zero3" else 0,
        micro_batch_size=1, omp_threads=1, cpu_collectives="gloo",
    )  # fmt: skip
    builder = _Probe(GeneratorBuilder(ModelConfig(name_or_path=model_dir, dtype=dtype), None, lambda lm: AnswerLossLM(lm)))
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    base = _status()
    peak_anon = [base["RssAnon"]]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    engine = build_engine(trainer, builder, tempfile.gettempdir())
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    end = _status()
    params = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in engine.module.parameters())
    # One training step: gradients and optimizer state exist from here on (ZeRO-3 and FSDP2 hold
    # their share of them, a full copy holds all of them).
    ids = torch.randint(10, 1000, (1, 32))
    engine.train_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    stepped = _status()
    rec = {
        "rank": rank,
        "mode": mode,
        "base_rss_mib": base["VmRSS"] / 2**20,
        "peak_rss_mib": (end["VmHWM"] - base["VmRSS"]) / 2**20,
        "peak_anon_mib": (max(peak_anon[0], end["RssAnon"]) - base["RssAnon"]) / 2**20,
        "end_rss_mib": (end["VmRSS"] - base["VmRSS"]) / 2**20,
        "step_peak_rss_mib": (stepped["VmHWM"] - base["VmRSS"]) / 2**20,
        # the model built (whole, or this rank's partitions) before the engine's own setup; FSDP
        # ranks other than 0 never build it whole
        "load_peak_rss_mib": (builder.peak - base["VmRSS"]) / 2**20 if builder.peak else None,
        "load_s": seconds,
        "params": params,
    }
    engine.close()
    del engine
    with open(f"{out}.rank{rank}", "w") as fh:
        json.dump(rec, fh)
    rdist.shutdown()


def save_model(path: Path, hidden: int, layers: int, vocab: int, dtype: str = "fp32") -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ragdist.train.model import torch_dtype

    conf = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(conf, dtype=torch_dtype(dtype))
    lm.save_pretrained(path)
    return sum(p.numel() for p in lm.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="model.dtype: the checkpoint is saved in it and loaded in it (trainer.precision=auto)")
    ap.add_argument("--model-dir", default="", help="an existing saved model instead of a new random one")
    ap.add_argument("--rank-main", nargs=4, metavar=("MODE", "MODEL_DIR", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        rank_main(*args.rank_main)
        return

    from ragdist.distributed import launch_local

    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="ragdist-load-rss-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        n_params = None if args.model_dir else save_model(model_dir, args.hidden, args.layers, args.vocab, args.dtype)
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
        runs: dict[str, list[list[dict]]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in modes:
                out = Path(tmp) / f"{mode}-{r}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--rank-main", mode, str(model_dir), str(out), args.dtype]
                rc = launch_local(cmd, 2, env=env)
                if rc != 0:
                    raise SystemExit(f"{mode}: ranks failed with status {rc}")
                ranks = [json.loads(Path(f"{out}.rank{k}").read_text()) for k in range(2)]
                runs[mode].append(ranks)
                print(json.dumps({"round": r, "mode": mode, "ranks": ranks}), flush=True)

    def med(mode: str, key: str, rank: int) -> float:
        return statistics.median(run[rank][key] for run in runs[mode])

    summary: dict = {
        "bench": "load_rss",
        "model_params": n_params,
        "checkpoint_mib": size / 2**20,
        "ranks": 2,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "unit": "MiB over the rank's RSS before loading (median over rounds)",
    }
    for mode in modes:
        summary[mode] = {
            key: [round(med(mode, key, k), 1) for k in range(2)]
            for key in ("peak_rss_mib", "peak_anon_mib", "end_rss_mib", "step_peak_rss_mib", "load_s")
        }
        loads = [[run[k]["load_peak_rss_mib"] for run in runs[mode]] for k in range(2)]
        summary[mode]["load_peak_rss_mib"] = [round(statistics.median(v), 1) if None not in v else None for v in loads]
    if "zero3" in modes and "full" in modes:
        for key in ("peak_rss_mib", "peak_anon_mib", "load_peak_rss_mib", "step_peak_rss_mib"):
            z, f = summary["zero3"][key], summary["full"][key]
            summary[f"zero3_vs_full_{key}_per_rank"] = [round(a / b, 3) for a, b in zip(z, f)]
            summary[f"zero3_vs_full_{key}_worst_rank"] = round(max(z) / max(f), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
