"""DeepSpeed ZeRO-1/2/3 and FSDP2 over gloo with 2 real ranks: one launch runs every case in turn.

The ranks use fixed passages (the engines are under test here, not retrieval; the pipeline and
prefetch tests keep live retrieval). `python tests/test_engines.py --worker OUT.json` is the rank
program; the tests below read what it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.ranks import run_worker_ranks, worker_main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

# Tolerances. Every engine runs the same fp32 AdamW on the same global batch; they differ only in
# the order of floating-point reductions (bucketed all-reduce vs reduce-scatter, sharded norms).
FP32_RTOL = 1e-4
BF16_RTOL = 2e-2
STEPS = 4


def _tiny_setup():
    from ragdist.data.corpus import read_jsonl
    from ragdist.data.qa import load_qa
    from ragdist.train.model import ModelConfig, load_tokenizer

    model_cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=128)
    tok = load_tokenizer(model_cfg)
    docs = [obj for _, obj in read_jsonl(DATA / "corpus.jsonl")]
    by_id = {d["id"]: {"id": d["id"] + "#0", "doc_id": d["id"], "title": d["title"], "text": d["text"]} for d in docs}
    train = load_qa(DATA / "train.jsonl")
    ids = sorted(by_id)
    fixed = {}
    for n, ex in enumerate(train):
        gold = ex.gold_ids[0].split("#")[0]
        fixed[ex.question] = [by_id[gold], by_id[ids[n % len(ids)]], by_id[ids[(3 * n + 1) % len(ids)]]]

    def retrieve(questions, k):
        return [fixed[q][:k] for q in questions]

    return model_cfg, tok, train, retrieve


def _trainer(**kw):
    from ragdist.train.engine import TrainerConfig

    base = dict(
        micro_batch_size=4, max_steps=STEPS, warmup_steps=2, lr=3e-3, max_seq_len=96, log_every=1000,
        prefetch_depth=1, omp_threads=1, save_every=0,
    )  # fmt: skip
    base.update(kw)
    t = TrainerConfig(**base)
    t.examples.shuffle_passages = True
    return t


def worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from ragdist import distributed as rdist
    from ragdist.train.loop import train_variant
    from ragdist.train.model import ModelConfig, build_generator, save_pretrained_atomic
    from ragdist.train.peft import PeftConfig
    from ragdist.train.preempt import Preempted, PreemptionHandler
    from ragdist.utils.logger import LoggerConfig, RunLogger

    torch.set_num_threads(1)
    rank, world = rdist.init_process_group()
    model_cfg, tok, train, retrieve = _tiny_setup()
    work = Path(out_path).parent
    # Every engine starts from the same saved weights: ZeRO-3 builds a config-initialised model
    # partition by partition, which draws different random numbers than a whole-model build.
    init_dir = work / "init_model"
    if rank == 0:
        save_pretrained_atomic(build_generator(model_cfg, tok), tok, init_dir)
    dist.barrier()
    model_cfg = ModelConfig(name_or_path=str(init_dir))
    results: dict = {}

    def run(name, trainer, peft=None, stop=None, export=False):
        run_dir = work / name
        logger = RunLogger(LoggerConfig(), run_dir, enabled=False)
        kw = dict(trainer=trainer, model_cfg=model_cfg, tokenizer=tok, top_k=2, retrieve=retrieve,
                  run_dir=run_dir, logger=logger, peft_cfg=peft, export=export)  # fmt: skip
        if stop is not None:
            kw["stop_requested"] = stop
        t0 = time.perf_counter()
        shm_before = _shm_calls()
        out = train_variant("rag", train, **kw)
        if rank == 0:
            print(f"[engines] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        results[name] = {"losses": [h["loss"] for h in out["history"]], "lr": [h["lr"] for h in out["history"]]}
        results[name]["shm_calls"] = {k: v - shm_before.get(k, 0) for k, v in _shm_calls().items()}
        return out

    def changed_params(name, trainer, peft):
        """Which parameters training moved: the initial weights (built the same way, no engine) vs
        the weights in the run's final checkpoint, loaded back into a fresh engine."""
        from ragdist.train import checkpoint as ckpt
        from ragdist.train.engines import build_engine
        from ragdist.train.loop import build_module_fn

        initial = build_module_fn(model_cfg, tok, peft)()
        before = {k: v.detach().clone() for k, v in initial.state_dict().items()}
        trainable = sorted(n for n, p in initial.named_parameters() if p.requires_grad)
        del initial
        run(name, trainer, peft=peft)
        eng = build_engine(trainer, build_module_fn(model_cfg, tok, peft), work)
        ckpt.load_checkpoint(eng, ckpt.latest(work / name / "train_state" / "rag"), {})
        after = eng.full_state_dict()
        with eng.gathered_params():
            whole = all(p.numel() > 0 and type(p).__name__ != "DTensor" for p in eng.module.parameters())
        eng.close()
        del eng
        if rank == 0:
            common = [k for k in before if k in after]
            assert len(common) >= len(after) - 1, (sorted(before)[:5], sorted(after)[:5])
            results[name]["moved"] = sorted(k for k in common if not torch.equal(before[k], after[k].to(before[k].dtype)))
            results[name]["trainable"] = trainable
            results[name]["gathered_whole"] = whole

    # 1. the same trajectory from every engine (fp32), with and without offload
    for name, kw in [
        ("zero1", dict(zero_stage=1)),
        ("zero2", dict(zero_stage=2)),
        ("zero2_shm", dict(zero_stage=2, cpu_collectives="shm")),
        ("zero2_fused", dict(zero_stage=2, fused_optimizer=True)),
        ("fsdp_fused", dict(engine="fsdp", fused_optimizer=True)),
        ("zero3", dict(zero_stage=3)),
        ("fsdp", dict(engine="fsdp")),
        ("zero3_offload", dict(zero_stage=3, offload_optimizer=True, offload_params=True)),
        ("fsdp_offload", dict(engine="fsdp", offload_params=True)),
        ("zero2_accum", dict(zero_stage=2, micro_batch_size=2, grad_accum=2)),
        ("fsdp_accum", dict(engine="fsdp", micro_batch_size=2, grad_accum=2)),
        ("zero2_bf16", dict(zero_stage=2, precision="bf16")),
        ("fsdp_bf16", dict(engine="fsdp", precision="bf16")),
    ]:
        run(name, _trainer(**kw))

    # 2. LoRA trains only adapters (ZeRO-3 and FSDP2); freezing freezes what it names
    lora = PeftConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    changed_params("lora_zero3", _trainer(zero_stage=3), lora)
    changed_params("lora_fsdp", _trainer(engine="fsdp"), lora)
    freeze = PeftConfig(freeze=["embed_tokens"], train_last_n_blocks=1, unfreeze=[r"layers\.0\.input_layernorm"])
    changed_params("freeze_zero2", _trainer(zero_stage=2), freeze)

    # 3. resume from step 3 of 6 reproduces the uninterrupted run (LoRA dropout exercises the RNG)
    drop = PeftConfig(method="lora", r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj"])
    for eng_name, kw, peft in [("ds", dict(zero_stage=2), drop), ("fsdp", dict(engine="fsdp"), None)]:
        full = _trainer(max_steps=6, save_every=3, **kw)
        run(f"resume_{eng_name}_full", full, peft=peft)
        ck = work / f"resume_{eng_name}_full" / "train_state" / "rag" / "step_00000003"
        part = _trainer(max_steps=6, resume=str(ck), **kw)
        run(f"resume_{eng_name}_part", part, peft=peft)

    # 4. a real SIGUSR1 on one rank → both checkpoint at the same step and stop; resuming finishes
    #    the run exactly as the uninterrupted one
    def stop_factory(handler):
        state = {"calls": 0}

        def stop():
            state["calls"] += 1
            if rank == 1 and state["calls"] == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
            return handler.requested

        return stop

    t = _trainer(max_steps=6, zero_stage=2, sync_every_s=0)  # the ranks agree every step: stop at step 2
    with PreemptionHandler() as handler:
        try:
            run("preempt", t, peft=drop, stop=stop_factory(handler))
            results["preempt_raised"] = None
        except Preempted as e:
            results["preempt_raised"] = {"step": e.step, "checkpoint": str(e.checkpoint)}
    run("preempt", _trainer(max_steps=6, zero_stage=2, resume="auto"), peft=drop, export=True)

    dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    rdist.shutdown()


def _shm_calls() -> dict[str, int]:
    """How many collectives DeepSpeed has sent through shared memory in this process so far."""
    from ragdist.train import deepspeed_shm

    return dict(deepspeed_shm.calls)


@pytest.fixture(scope="module")
def engines_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "results.json"
    return run_worker_ranks(__file__, out), out.parent


def _close(a, b, rtol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=0)


@pytest.mark.slow
def test_engines_agree_on_the_loss_trajectory(engines_run):
    r, _ = engines_run
    ref = r["zero2"]["losses"]
    assert len(ref) == STEPS and ref[-1] < ref[0]
    for name in ("zero1", "zero3", "fsdp", "zero3_offload", "fsdp_offload", "zero2_fused", "fsdp_fused"):
        _close(r[name]["losses"], ref, FP32_RTOL)
        _close(r[name]["lr"], r["zero2"]["lr"], 1e-12)
    # 2 micro-batches × 2 accumulation steps: the same examples per step, but each micro-batch's loss
    # is its own token mean, so the trajectory is close to, not equal to, one batch of 4
    _close(r["fsdp_accum"]["losses"], r["zero2_accum"]["losses"], FP32_RTOL)
    _close(r["zero2_accum"]["losses"], ref, 1e-2)
    for name in ("zero2_bf16", "fsdp_bf16"):
        _close(r[name]["losses"], ref, BF16_RTOL)


@pytest.mark.slow
def test_shared_memory_collectives_change_no_bit_of_the_run(engines_run):
    r, _ = engines_run
    # Opt-in: ZeRO-2's gradient all-reduce and parameter all-gather went through shared memory, once
    # per step. This fails loudly if a DeepSpeed version stops calling the two routed functions.
    assert r["zero2_shm"]["shm_calls"]["all_reduce"] >= STEPS and r["zero2_shm"]["shm_calls"]["all_gather"] >= STEPS
    # By default DeepSpeed's own collectives run untouched
    assert r["zero2"]["shm_calls"] == {"all_reduce": 0, "all_gather": 0}
    assert r["zero1"]["shm_calls"] == {"all_reduce": 0, "all_gather": 0}
    assert r["zero2"]["losses"] == r["zero2_shm"]["losses"]  # bitwise: 2 ranks sum a + b either way


@pytest.mark.slow
def test_lora_trains_only_adapters(engines_run):
    r, _ = engines_run
    for name in ("lora_zero3", "lora_fsdp"):
        moved, trainable = r[name]["moved"], r[name]["trainable"]
        assert moved and all("lora_" in k for k in moved), moved
        assert all("lora_" in k for k in trainable)
        assert r[name]["gathered_whole"]  # gathered_params() shows whole weights on every rank
        # both adapted projections of both blocks moved (lora_B starts at zero and must have learned)
        assert {k.split(".lora_")[0].split("layers.")[1] for k in moved if "lora_B" in k} == {
            "0.self_attn.q_proj", "0.self_attn.v_proj", "1.self_attn.q_proj", "1.self_attn.v_proj",
        }  # fmt: skip


@pytest.mark.slow
def test_freeze_patterns_freeze_what_they_say(engines_run):
    r, _ = engines_run
    moved, trainable = set(r["freeze_zero2"]["moved"]), r["freeze_zero2"]["trainable"]
    expect = {n for n in trainable}
    assert all(".layers.1." in n or "layers.0.input_layernorm" in n for n in expect), expect
    assert not any("embed_tokens" in n or "lm_head" in n or n.endswith("model.norm.weight") for n in expect)
    assert moved == expect


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(engines_run):
    r, _ = engines_run
    for eng in ("ds", "fsdp"):
        full, part = r[f"resume_{eng}_full"]["losses"], r[f"resume_{eng}_part"]["losses"]
        assert len(full) == len(part) == 6
        assert part == full, (eng, full, part)  # bitwise: fp32 on CPU, same reduction order


@pytest.mark.slow
def test_preemption_checkpoints_and_resumes_exactly(engines_run):
    r, work = engines_run
    raised = r["preempt_raised"]
    assert raised is not None and raised["step"] == 2
    assert Path(raised["checkpoint"]).name == "step_00000002"
    assert r["preempt"]["losses"] == r["resume_ds_full"]["losses"]
    out = work / "preempt" / "checkpoints" / "rag"
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((work / "preempt" / "train_rag.json").read_text())
    assert summary["resumed_from"].endswith("step_00000002") and summary["steps"] == 6


if __name__ == "__main__":
    worker_main(worker)
