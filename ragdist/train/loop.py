"""The training loop of one variant: each rank retrieves for its own micro-batch, then steps."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragdist.data.qa import QAExample
from ragdist.train.engine import TrainerConfig, build_engine
from ragdist.train.examples import collate_train, encode_train
from ragdist.train.model import AnswerLossLM, ModelConfig, build_generator, save_pretrained_atomic
from ragdist.utils.logger import RunLogger

log = logging.getLogger(__name__)


def rank_batches(n: int, rank: int, world: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's micro-batches for one epoch: a seeded shuffle, split evenly so ranks step together."""
    order = np.random.default_rng(seed + epoch).permutation(n)
    per_rank = (n // world) // batch * batch
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + batch] for i in range(0, per_rank, batch)]


def train_variant(
    variant: str,
    examples: list[QAExample],
    *,
    trainer: TrainerConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    top_k: int,
    retrieve: Any,
    run_dir: str | Path,
    logger: RunLogger,
) -> dict[str, Any]:
    """Train one generator; `retrieve(questions, k)` gives each question its passages (k=0: closed book)."""
    run_dir = Path(run_dir)

    def build() -> torch.nn.Module:
        return AnswerLossLM(build_generator(model_cfg, tokenizer), fused_loss=model_cfg.fused_loss)

    engine = build_engine(trainer, build, run_dir)
    rank, world = engine.rank, engine.world_size
    if len(examples) // world < trainer.micro_batch_size:
        raise ValueError(
            f"{len(examples)} training examples cannot fill micro-batches of {trainer.micro_batch_size} on {world} ranks"
        )
    history: list[dict[str, float]] = []
    micro, step, epoch = 0, 0, 0
    t_start = time.perf_counter()
    wait_s = tok_count = 0.0
    while step < trainer.max_steps:
        for idx in rank_batches(len(examples), rank, world, trainer.micro_batch_size, trainer.seed, epoch):
            batch = [examples[i] for i in idx]
            t0 = time.perf_counter()
            passages = retrieve([ex.question for ex in batch], top_k) if top_k > 0 else [[] for _ in batch]
            wait_s += time.perf_counter() - t0
            rows = [
                encode_train(tokenizer, ex.question, ps, ex.answers[0], trainer.max_seq_len)
                for ex, ps in zip(batch, passages)
            ]
            tensors = collate_train(rows, tokenizer.pad_token_id)
            tok_count += float(tensors["attention_mask"].sum())
            loss = engine.train_step(tensors)
            micro += 1
            if micro % trainer.grad_accum:
                continue
            step += 1
            history.append({"step": step, "loss": loss})
            if step % trainer.log_every == 0 or step == 1 or step == trainer.max_steps:
                el = time.perf_counter() - t_start
                metrics = {
                    f"train/{variant}/loss": loss,
                    f"train/{variant}/lr": engine.lr(),
                    f"train/{variant}/tokens_per_s": tok_count * world / max(el, 1e-9),
                    f"train/{variant}/retrieval_wait_s": wait_s / micro,
                }
                logger.log(metrics, step=step)
                if rank == 0:
                    log.info("[%s] step %d/%d loss %.4f lr %.2e", variant, step, trainer.max_steps, loss, engine.lr())
            if step >= trainer.max_steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - t_start
    state = engine.full_state_dict()
    out = run_dir / "checkpoints" / variant
    summary = {
        "variant": variant,
        "steps": step,
        "epochs": epoch,
        "elapsed_s": elapsed,
        "world_size": world,
        "retrieval_wait_s_per_step": wait_s / max(micro, 1),
        "first_loss": float(np.mean([h["loss"] for h in history[: max(1, len(history) // 10)]])),
        "last_loss": float(np.mean([h["loss"] for h in history[-max(1, len(history) // 10) :]])),
        "history": history,
        "checkpoint": str(out),
    }
    if rank == 0:
        lm_state = {k.removeprefix("lm."): v for k, v in state.items()} if state is not None else None
        save_pretrained_atomic(engine.module.lm, tokenizer, out, state_dict=lm_state)
        (run_dir / f"train_{variant}.json").write_text(json.dumps(summary, indent=1))
    engine.close()
    return summary
