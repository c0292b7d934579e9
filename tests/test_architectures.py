"""Pretrained models of five decoder architectures (Llama, Qwen2, Mistral, GPT-2, Phi-3), loaded by
path, trained through DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, with and without LoRA, then evaluated
over both ranks: 2 real ranks over gloo, one launch for the whole matrix.

Each model is a tiny random one saved with save_pretrained, with its own offline tokenizer and
(all but GPT-2) a chat template, so training and evaluation build chat prompts for four of them
and plain prompts for GPT-2. `python tests/test_architectures.py --worker OUT.json` is the rank
program; the tests below read what it wrote.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.ranks import run_worker_ranks, worker_main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

ENGINES = {"zero2": dict(zero_stage=2), "zero3": dict(zero_stage=3), "fsdp": dict(engine="fsdp")}
STEPS = 3
FP32_RTOL = 1e-4
BF16_RTOL = 2e-2
# What LoRA adapts when peft.target_modules is left empty: the attention's linear layers, per architecture.
ATTENTION = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "phi3": {"qkv_proj", "o_proj"},
    "gpt2": {"c_attn", "c_proj"},
}


def _passages():
    from ragdist.data.corpus import read_jsonl
    from ragdist.data.qa import load_qa

    docs = {obj["id"]: obj for _, obj in read_jsonl(DATA / "corpus.jsonl")}
    ids = sorted(docs)

    def passage(doc_id):
        d = docs[doc_id]
        return {"id": doc_id + "#0", "doc_id": doc_id, "title": d["title"], "text": d["text"]}

    fixed = {}
    for name in ("train.jsonl", "eval.jsonl"):
        for n, ex in enumerate(load_qa(DATA / name)):
            fixed[ex.question] = [passage(ex.gold_ids[0].split("#")[0]), passage(ids[n % len(ids)])]
    return fixed


def _trainer(**kw):
    from ragdist.train.engine import TrainerConfig

    base = dict(
        micro_batch_size=2, max_steps=STEPS, warmup_steps=1, lr=3e-3, max_seq_len=96, log_every=1000,
        prefetch_depth=1, omp_threads=1,
    )  # fmt: skip
    base.update(kw)
    return TrainerConfig(**base)


def worker(out_path: str) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from ragdist import distributed as rdist
    from ragdist.data.qa import load_qa
    from ragdist.eval.runner import EvalConfig, evaluate_strategy
    from ragdist.prompts import prompt_ids
    from ragdist.train.loop import train_variant
    from ragdist.train.model import ModelConfig, load_generator, load_tokenizer
    from ragdist.train.peft import PeftConfig
    from ragdist.utils.logger import LoggerConfig, RunLogger
    from tests.tiny_hf import ARCHS, save_tiny

    torch.set_num_threads(1)
    rank, _ = rdist.init_process_group()
    work = Path(out_path).parent
    if rank == 0:
        for arch in ARCHS:
            save_tiny(arch, work / "models" / arch)
    dist.barrier()
    fixed = _passages()
    train = load_qa(DATA / "train.jsonl")[:16]
    evals = load_qa(DATA / "eval.jsonl")[:5]

    def retrieve(questions, k):
        return [fixed[q][:k] for q in questions]

    ecfg = EvalConfig(max_new_tokens=4, batch_size=2, max_prompt_len=96, latency_samples=1, latency_warmup=0)
    results: dict = {}

    def run(arch, name, trainer, model_cfg, peft=None, evaluate=True):
        tok = load_tokenizer(model_cfg)
        logger = RunLogger(LoggerConfig(), work / name, enabled=False)
        t0 = time.perf_counter()
        out = train_variant(
            "rag", train, trainer=trainer, model_cfg=model_cfg, tokenizer=tok, top_k=2, retrieve=retrieve,
            run_dir=work / name, logger=logger, peft_cfg=peft, export=True,
        )  # fmt: skip
        rec = {"losses": [h["loss"] for h in out["history"]]}
        if evaluate:
            model, etok = load_generator(Path(out["checkpoint"]))
            res = evaluate_strategy(
                model, etok, evals, ranked=[fixed[ex.question] for ex in evals], top_k=2, cfg=ecfg,
                checks=False, fmt=trainer.examples,
            )  # fmt: skip
            rec["eval"] = {
                "n": res["metrics"]["n"],
                "predictions": [r["prediction"] for r in res["rows"]],
                "prompt_tokens": [r["prompt_tokens"] for r in res["rows"]],
            }
            if rank == 0:
                before = load_file(work / "models" / arch / "model.safetensors")
                after = load_file(Path(out["checkpoint"]) / "model.safetensors")
                rec["moved"] = sorted(k for k in before if k in after and not torch.equal(before[k], after[k]))
                rec["params"] = sorted(before)
                rec["chat"] = bool(etok.chat_template)
                rec["first_prompt_token"] = prompt_ids(etok, evals[0].question, [], 96)[0]
        if rank == 0:
            print(f"[archs] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        results[name] = rec

    for arch in ARCHS:
        model_cfg = ModelConfig(name_or_path=str(work / "models" / arch))
        for eng, kw in ENGINES.items():
            run(arch, f"{arch}_{eng}", _trainer(**kw), model_cfg)
            lora = PeftConfig(method="lora", r=4, alpha=8)  # target modules: the architecture's default
            run(arch, f"{arch}_{eng}_lora", _trainer(**kw), model_cfg, peft=lora, evaluate=eng != "zero3")
    # model.dtype=bf16 (trainer.precision=auto follows it) and gradient checkpointing, on Llama
    llama = ModelConfig(name_or_path=str(work / "models" / "llama"))
    for eng, kw in ENGINES.items():
        run("llama", f"llama_{eng}_bf16", _trainer(**kw), dataclasses.replace(llama, dtype="bf16"), evaluate=False)
    run("llama", "llama_fsdp_ckpt", _trainer(engine="fsdp"), dataclasses.replace(llama, gradient_checkpointing=True),
        evaluate=False)  # fmt: skip
    run("llama", "llama_zero3_ckpt", _trainer(zero_stage=3), dataclasses.replace(llama, gradient_checkpointing=True),
        evaluate=False)  # fmt: skip

    # How much of the model each rank holds once the engine is built from the saved directory, and
    # (ZeRO-3) whether the parameters were already partitioned when from_pretrained returned.
    from ragdist.train.engines import build_engine
    from ragdist.train.loop import build_module_fn

    class Probe:
        def __init__(self, builder):
            self.builder, self.dtype, self.pretrained = builder, builder.dtype, builder.pretrained
            self.partitioned_as_built = None

        def __call__(self):
            module = self.builder()
            self.partitioned_as_built = all(hasattr(p, "ds_id") and p.numel() == 0 for p in module.parameters())
            return module

        def on_meta(self, *args):
            return self.builder.on_meta(*args)

    tok = load_tokenizer(llama)
    # ZeRO-3 keeps parameters under 1e5 elements (here: all) whole on every rank unless told not to
    ds_json = work / "zero3_no_persistent.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    for eng, kw in (("zero3", dict(zero_stage=3, ds_config=str(ds_json))), ("fsdp", dict(engine="fsdp"))):
        probe = Probe(build_module_fn(llama, tok, PeftConfig()))
        engine = build_engine(_trainer(**kw), probe, work)
        params = list(engine.module.parameters())
        if eng == "zero3":
            local = sum(p.ds_tensor.numel() + p.numel() for p in params)  # partition + whole if kept whole
            total = sum(p.ds_numel for p in params)
        else:
            local = sum(p.to_local().numel() for p in params)
            total = sum(p.numel() for p in params)
        results[f"held_{eng}_rank{rank}"] = {"local": local, "total": total, "partitioned_as_built": probe.partitioned_as_built}
        engine.close()
    gathered = [None, None]
    dist.all_gather_object(gathered, {k: v for k, v in results.items() if k.startswith("held_")})
    for part in gathered:
        results.update(part)

    dist.barrier()
    if rank == 0:
        results["tokens"] = {
            arch: load_tokenizer(ModelConfig(name_or_path=str(work / "models" / arch))).convert_tokens_to_ids(
                ["<s>", "<|start_header_id|>", "<|im_start|>", "<|user|>"]
            )
            for arch in ARCHS
        }
        Path(out_path).write_text(json.dumps(results))
    rdist.shutdown()


@pytest.fixture(scope="module")
def archs_run(tmp_path_factory):
    return run_worker_ranks(__file__, tmp_path_factory.mktemp("archs") / "results.json")


def _close(a, b, rtol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=0)


ARCH_NAMES = list(ATTENTION)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_engine_trains_the_pretrained_weights_alike(archs_run, arch):
    r = archs_run
    ref = r[f"{arch}_zero2"]["losses"]
    assert len(ref) == STEPS and all(np.isfinite(ref))
    # ZeRO-3 partitions the weights as they load, FSDP2 fills meta-device shards from rank 0: both
    # start from the same saved weights as ZeRO-2, so they follow the same trajectory
    for eng in ("zero3", "fsdp"):
        _close(r[f"{arch}_{eng}"]["losses"], ref, FP32_RTOL)
    for eng in ("zero3", "fsdp"):
        _close(r[f"{arch}_{eng}_lora"]["losses"], r[f"{arch}_zero2_lora"]["losses"], FP32_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_lora_adapts_the_architectures_attention_by_default(archs_run, arch):
    r = archs_run
    for eng in ("zero2", "fsdp"):
        rec = r[f"{arch}_{eng}_lora"]
        # the merged export differs from the base exactly in the adapted weights, in every block
        moved = {k for k in rec["moved"]}
        assert moved and all(k.rsplit(".", 2)[-2] in ATTENTION[arch] and k.endswith(".weight") for k in moved), moved
        assert {k.rsplit(".", 2)[-2] for k in moved} == ATTENTION[arch]
        assert {k.split(".")[2] for k in moved} == {"0", "1"}  # model.layers.N... / transformer.h.N...
        # full fine-tuning moves (almost) everything
        assert len(r[f"{arch}_{eng}"]["moved"]) >= len(r[f"{arch}_{eng}"]["params"]) - 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_evaluation_runs_on_both_ranks_with_the_models_prompt_format(archs_run, arch):
    r = archs_run
    tokens = dict(zip(["<s>", "<|start_header_id|>", "<|im_start|>", "<|user|>"], r["tokens"][arch]))
    first = {"llama": tokens["<s>"], "qwen2": tokens["<|im_start|>"], "mistral": tokens["<s>"], "phi3": tokens["<|user|>"]}
    for name in (f"{arch}_zero2", f"{arch}_zero3", f"{arch}_fsdp", f"{arch}_zero2_lora", f"{arch}_fsdp_lora"):
        rec = r[name]
        assert rec["eval"]["n"] == 5 and len(rec["eval"]["predictions"]) == 5
        assert all(isinstance(p, str) for p in rec["eval"]["predictions"])
        assert rec["chat"] == (arch != "gpt2")
        if arch in first:  # the chat template's own opening token starts every prompt
            assert rec["first_prompt_token"] == first[arch]


@pytest.mark.slow
def test_each_rank_holds_only_its_part_of_the_loaded_model(archs_run):
    r = archs_run
    for eng in ("zero3", "fsdp"):
        held = [r[f"held_{eng}_rank{k}"] for k in range(2)]
        assert held[0]["total"] == held[1]["total"] > 0
        # 2 ranks: about half each (ZeRO-3 pads partitions; both keep tiny norm weights whole)
        for h in held:
            assert h["local"] <= 0.6 * h["total"], (eng, h)
        assert sum(h["local"] for h in held) >= h["total"]
    # ZeRO-3: from_pretrained itself built the parameters partitioned; no rank held the whole model first
    assert r["held_zero3_rank0"]["partitioned_as_built"] and r["held_zero3_rank1"]["partitioned_as_built"]


@pytest.mark.slow
def test_model_dtype_and_gradient_checkpointing(archs_run):
    r = archs_run
    for eng in ENGINES:
        # bf16 weights, trained in bf16 mixed precision: close to the fp32 run
        _close(r[f"llama_{eng}_bf16"]["losses"], r["llama_zero2"]["losses"], BF16_RTOL)
    # recomputing activations changes no result
    _close(r["llama_fsdp_ckpt"]["losses"], r["llama_fsdp"]["losses"], 1e-5)
    _close(r["llama_zero3_ckpt"]["losses"], r["llama_zero3"]["losses"], 1e-5)


if __name__ == "__main__":
    worker_main(worker)
