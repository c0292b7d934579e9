"""The training loop of one variant: prefetched retrieval → examples → engine steps → checkpoints → export.

    summary = train_variant("rag", examples, trainer=..., model_cfg=..., tokenizer=tok, top_k=3,
                            retrieve=client.retrieve, run_dir=run_dir, logger=logger)

Each rank walks its own seeded share of the examples; the batch for a position is the same
whether it is built ahead in the prefetch thread or inline, and whether or not the run was
resumed there. The per-step all-reduce that averages the loss also carries the preemption flag, so
all ranks agree on the step at which to checkpoint without an extra collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ragdist.data.qa import QAExample
from ragdist.errors import ConfigError, DataError
from ragdist.index.snapshot import atomic_write_text
from ragdist.train import checkpoint as ckpt
from ragdist.train.engine import TrainerConfig, build_engine
from ragdist.train.examples import ExampleBuilder, PassageStore, Summarizer, check_examples_config
from ragdist.train.model import (
    AnswerLossLM,
    GeneratorBuilder,
    ModelConfig,
    build_generator,
    load_generator,
    save_pretrained_atomic,
)
from ragdist.train.peft import (
    PeftConfig,
    apply_peft,
    check_peft_config,
    is_peft_model,
    load_quantized_generator,
    save_adapter_and_merged,
)
from ragdist.train.preempt import Preempted
from ragdist.train.prefetch import Lookahead, Prefetcher
from ragdist.utils.logger import RunLogger

log = logging.getLogger(__name__)


def rank_batches(n: int, rank: int, world: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's micro-batches for one epoch: a seeded shuffle, split evenly so ranks step together."""
    order = np.random.default_rng(seed + epoch).permutation(n)
    per_rank = (n // world) // batch * batch
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + batch] for i in range(0, per_rank, batch)]


@dataclass(frozen=True)
class Position:
    """A micro-batch's place in the data stream: epoch, index within this rank's epoch, example ids."""

    epoch: int
    index: int
    ids: tuple[int, ...]


def positions(n: int, rank: int, world: int, batch: int, seed: int, epoch: int, index: int) -> Iterator[Position]:
    """This rank's micro-batches from (epoch, index) on, across epochs, forever."""
    while True:
        for j, ids in enumerate(rank_batches(n, rank, world, batch, seed, epoch)):
            if j >= index:
                yield Position(epoch, j, tuple(int(i) for i in ids))
        epoch, index = epoch + 1, 0


def take(it: Iterator[Position], n: int) -> Iterator[Position]:
    for _ in range(n):
        yield next(it)


def build_module_fn(model_cfg: ModelConfig, tokenizer: Any, peft_cfg: PeftConfig) -> Callable[[], torch.nn.Module]:
    def wrap(base: torch.nn.Module) -> torch.nn.Module:
        return AnswerLossLM(apply_peft(base, peft_cfg), fused_loss=model_cfg.fused_loss)

    if peft_cfg.method == "qlora":
        return lambda: wrap(load_quantized_generator(model_cfg))
    return GeneratorBuilder(model_cfg, tokenizer, wrap)


def make_summarizer(trainer: TrainerConfig, model_cfg: ModelConfig, tokenizer: Any) -> Summarizer | None:
    fmt = trainer.examples
    if fmt.aggregation != "summarize":
        return None
    if fmt.summary_model:
        model, tok = load_generator(fmt.summary_model)
        return Summarizer(model, tok, fmt)
    # A frozen copy of the generator as training starts: rank-local, so summaries can be made in the
    # prefetch thread without touching the sharded, changing weights.
    return Summarizer(build_generator(model_cfg, tokenizer), tokenizer, fmt)


def train_variant(
    variant: str,
    examples: list[QAExample],
    *,
    trainer: TrainerConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    top_k: int,
    retrieve: Callable[[list[str], int], list[list[dict[str, Any]]]] | None,
    run_dir: str | Path,
    logger: RunLogger,
    peft_cfg: PeftConfig | None = None,
    store: PassageStore | None = None,
    index_version: Callable[[], str | None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    export: bool = True,
) -> dict[str, Any]:
    """Train one generator; `retrieve(questions, k)` gives each question its passages (top_k=0: closed book).

    Raises `Preempted` (after checkpointing) when `stop_requested()` turned true on any rank.
    """
    run_dir = Path(run_dir)
    peft_cfg = peft_cfg or PeftConfig()
    check_peft_config(peft_cfg)
    if peft_cfg.method == "qlora" and (trainer.engine == "fsdp" or trainer.zero_stage == 3):
        raise ConfigError("peft.method=qlora: 4-bit base weights cannot be sharded; use trainer=deepspeed with zero_stage 0-2")
    check_examples_config(trainer.examples)
    done = _finished(run_dir, variant, trainer)
    if done is not None:
        log.info("[%s] already trained to step %d in %s; skipping", variant, done["steps"], run_dir)
        return done
    stop_requested = stop_requested or (lambda: False)
    index_version = index_version or (lambda: None)
    summarizer = make_summarizer(trainer, model_cfg, tokenizer) if top_k > 0 else None
    builder = ExampleBuilder(
        tokenizer, trainer.examples, top_k=top_k, max_len=trainer.max_seq_len, retrieve=retrieve,
        store=store, summarizer=summarizer, seed=trainer.seed,
    )  # fmt: skip
    engine = build_engine(trainer, build_module_fn(model_cfg, tokenizer, peft_cfg), run_dir)
    rank, world = engine.rank, engine.world_size
    if len(examples) // world < trainer.micro_batch_size:
        engine.close()
        raise DataError(
            f"{len(examples)} training examples cannot fill micro-batches of {trainer.micro_batch_size} on {world} ranks"
        )
    state_root = run_dir / "train_state" / variant
    identity = {"variant": variant, "world_size": world, "engine": trainer.engine, "num_examples": len(examples)}
    resumed_from = ckpt.find_checkpoint(_resume_spec(trainer.resume, variant), state_root)
    st: dict[str, Any] = {"step": 0, "epoch": 0, "index": 0, "history": [], "elapsed_s": 0.0, "tokens": 0}
    if resumed_from is not None:
        st = ckpt.load_checkpoint(engine, resumed_from, identity)
        if rank == 0:
            log.info("[%s] resumed from %s at step %d", variant, resumed_from, st["step"])
        _check_index_version(st.get("index_version"), index_version(), resumed_from)
    step, history = int(st["step"]), list(st["history"])
    remaining = max(0, trainer.max_steps - step) * trainer.grad_accum
    stream = take(
        positions(len(examples), rank, world, trainer.micro_batch_size, trainer.seed, st["epoch"], st["index"]),
        remaining,
    )
    if retrieve is not None and top_k > 0 and trainer.retrieval_lookahead > 1:
        # the questions of several upcoming batches retrieved per call (same passages, see Lookahead)
        lookahead = Lookahead(retrieve, stream, lambda p: [examples[i].question for i in p.ids], trainer.retrieval_lookahead)
        builder.retrieve, stream = lookahead, lookahead.positions()
    # A run resumed from its final checkpoint only needs the export.
    last_saved: Path | None = resumed_from if remaining == 0 else None

    def state(pos: Position | None) -> dict[str, Any]:
        epoch, index = (pos.epoch, pos.index + 1) if pos else (st["epoch"], st["index"])
        return {
            **identity,
            "step": step,
            "epoch": epoch,
            "index": index,
            "history": history,
            "index_version": index_version(),
            "elapsed_s": st["elapsed_s"] + time.perf_counter() - t_start,
            "tokens": tokens_total,
        }

    def save(pos: Position | None) -> Path:
        return ckpt.save_checkpoint(engine, state_root, state(pos), keep=trainer.keep_checkpoints)

    t_start = time.perf_counter()
    tokens_total = float(st["tokens"])
    pos: Position | None = None
    micro = 0
    acc = torch.zeros(4)  # loss sum, stop flag, tokens, wait seconds: one all-reduce per step
    t_step, cpu_step = time.perf_counter(), time.process_time()
    preempted = False
    try:
        with Prefetcher(lambda p: (p, builder.build(examples, p.ids, p.epoch)), stream, trainer.prefetch_depth) as pf:
            for (pos, batch), wait in pf:
                loss = engine.train_step(batch.tensors)
                micro += 1
                acc += torch.tensor([float(loss), 0.0, float(batch.tokens), wait])
                if micro % trainer.grad_accum:
                    continue
                acc[1] = 1.0 if stop_requested() else 0.0
                dist.all_reduce(acc)
                step += 1
                now, cpu_now = time.perf_counter(), time.process_time()
                rec = _record(step, acc, trainer.grad_accum, world, engine.lr(), now - t_step, cpu_now - cpu_step)
                history.append(rec)
                tokens_total += rec["tokens"]
                preempted = bool(acc[1] > 0)
                acc.zero_()
                t_step, cpu_step = now, cpu_now
                _log_step(logger, variant, rec, trainer, rank)
                if preempted or (trainer.save_every and step % trainer.save_every == 0 and step < trainer.max_steps):
                    last_saved = save(pos)
                if preempted:
                    break
        if preempted:
            raise Preempted(last_saved, step)
        if last_saved is None or last_saved.name != f"step_{step:08d}":
            last_saved = save(pos)
    except BaseException:
        engine.close()
        raise
    summary = _summary(variant, history, step, state(pos), world, run_dir, resumed_from)
    state_dict = engine.full_state_dict()
    engine.close()  # before building the export copy: ZeRO-3 would partition it
    if rank == 0 and export:
        _export(state_dict, model_cfg, tokenizer, peft_cfg, Path(summary["checkpoint"]))
        atomic_write_text(run_dir / f"train_{variant}.json", json.dumps(summary, indent=1))
    dist.barrier()
    return summary


def _resume_spec(spec: str, variant: str) -> str:
    """A resume path may name a checkpoint, a variant's checkpoint root, or a whole run directory."""
    if spec and spec != "auto" and (Path(spec) / "train_state" / variant).is_dir():
        return str(Path(spec) / "train_state" / variant)
    return spec


def _finished(run_dir: Path, variant: str, trainer: TrainerConfig) -> dict[str, Any] | None:
    """On resume, a variant whose export and summary already exist for max_steps needs nothing more."""
    if not trainer.resume:
        return None
    f = run_dir / f"train_{variant}.json"
    if not f.is_file() or not (run_dir / "checkpoints" / variant / "config.json").is_file():
        return None
    try:
        summary = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return summary if summary.get("steps", 0) >= trainer.max_steps else None


def _record(
    step: int, acc: torch.Tensor, grad_accum: int, world: int, lr: float, dt: float, cpu: float
) -> dict[str, float]:
    loss_sum, _, tokens, wait = acc.tolist()
    return {
        "step": step,
        "loss": loss_sum / (grad_accum * world),
        "lr": lr,
        "tokens": tokens,
        "tokens_per_s": tokens / max(dt, 1e-9),
        "retrieval_wait_s": wait / world,
        "step_s": dt,
        # this rank's CPU time (all its threads, prefetch included): on a shared machine it shows
        # the work a step costs where wall time also shows everyone else's
        "cpu_s": cpu,
    }


def _log_step(logger: RunLogger, variant: str, rec: dict[str, float], trainer: TrainerConfig, rank: int) -> None:
    step = int(rec["step"])
    if not (step % trainer.log_every == 0 or step == 1 or step == trainer.max_steps):
        return
    logger.log({f"train/{variant}/{k}": v for k, v in rec.items() if k != "step"}, step=step)
    if rank == 0:
        log.info(
            "[%s] step %d/%d loss %.4f lr %.2e %.0f tok/s retrieval wait %.1f ms",
            variant, step, trainer.max_steps, rec["loss"], rec["lr"], rec["tokens_per_s"], 1e3 * rec["retrieval_wait_s"],
        )  # fmt: skip


def _check_index_version(saved: str | None, current: str | None, path: Path) -> None:
    if saved and current and saved != current:
        log.warning(
            "%s was trained against index version %s but the service now serves %s; retrieval from here on "
            "differs from the interrupted run's (start the service on that snapshot to reproduce it)",
            path, saved, current,
        )  # fmt: skip


def _summary(
    variant: str,
    history: list[dict[str, float]],
    step: int,
    st: dict[str, Any],
    world: int,
    run_dir: Path,
    resumed_from: Path | None,
) -> dict[str, Any]:
    n = max(1, len(history) // 10)
    waits = [h.get("retrieval_wait_s", 0.0) for h in history]
    return {
        "variant": variant,
        "steps": step,
        "epochs": st["epoch"] + (1 if st["index"] else 0),
        "elapsed_s": st["elapsed_s"],
        "world_size": world,
        "tokens": st["tokens"],
        "retrieval_wait_s_per_step": float(np.mean(waits)) if waits else 0.0,
        "first_loss": float(np.mean([h["loss"] for h in history[:n]])) if history else float("nan"),
        "last_loss": float(np.mean([h["loss"] for h in history[-n:]])) if history else float("nan"),
        "index_version": st.get("index_version"),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "history": history,
        "checkpoint": str(run_dir / "checkpoints" / variant),
    }


def _export(
    state_dict: dict[str, torch.Tensor] | None,
    model_cfg: ModelConfig,
    tokenizer: Any,
    peft_cfg: PeftConfig,
    out: Path,
) -> None:
    """Rank 0: an HF model directory evaluation can load (adapters merged), plus the adapter alone."""
    assert state_dict is not None
    lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items()}
    if peft_cfg.method == "none":
        lm = build_generator(model_cfg, tokenizer)
        save_pretrained_atomic(lm, tokenizer, out, state_dict=_match_dtypes(lm, lm_state))
        return
    # A fresh full-precision copy carrying the trained weights: the engine's own module may hold only
    # shards, or (QLoRA) 4-bit base weights; those adapters merge into the full-precision base.
    qlora = peft_cfg.method == "qlora"
    lm = apply_peft(build_generator(model_cfg, tokenizer), dataclasses.replace(peft_cfg, method="lora") if qlora else peft_cfg)
    if qlora:
        lm_state = {k: v for k, v in lm_state.items() if "lora_" in k}
    missing, unexpected = lm.load_state_dict(_match_dtypes(lm, lm_state), strict=False)
    if unexpected or (not qlora and [m for m in missing if "lm_head" not in m]):
        raise RuntimeError(f"export: state dict does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    assert is_peft_model(lm)
    save_adapter_and_merged(lm, tokenizer, out, save_adapter=peft_cfg.save_adapter)


def _match_dtypes(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16 training leaves bf16 weights; the saved model keeps the dtype it was built with."""
    ref = model.state_dict()
    return {k: v.to(ref[k].dtype) if k in ref else v for k, v in sd.items()}
