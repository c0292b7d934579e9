"""The `TrainEngine` protocol and the trainer config. Only the engine modules import deepspeed/FSDP."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ragdist.errors import ConfigError


@dataclass
class TrainerConfig:
    engine: str = "deepspeed"  # deepspeed | fsdp
    nproc: int = 2  # ranks ragdist-train spawns on this node when not started by a launcher
    zero_stage: int = 2
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    max_steps: int = 1000
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    max_seq_len: int = 256
    log_every: int = 25
    seed: int = 0
    omp_threads: int = 1  # per rank; more threads per rank than cores/ranks only oversubscribes
    master_port: int = 0  # 0 = pick a free port
    variants: list[str] = field(default_factory=lambda: ["rag", "closed_book"])
    ds_config: str = ""  # a raw DeepSpeed JSON file; overrides what is derived from this config


@runtime_checkable
class TrainEngine(Protocol):
    rank: int
    world_size: int
    module: nn.Module

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward, backward and (at accumulation boundaries) optimizer step; returns the mean loss over ranks."""
        ...

    def lr(self) -> float: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere), gathered from shards if needed."""
        ...

    def close(self) -> None: ...


def lr_lambda(cfg: TrainerConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            shape = 1.0 - t
        elif cfg.schedule == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * t))
        else:
            raise ConfigError(f"trainer.schedule={cfg.schedule!r}: expected cosine, linear or constant")
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def build_engine(cfg: TrainerConfig, build_module: Callable[[], nn.Module], run_dir: str | Path) -> TrainEngine:
    if cfg.engine == "deepspeed":
        from ragdist.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, build_module, run_dir)
    raise ConfigError(f"trainer.engine={cfg.engine!r}: expected 'deepspeed' or 'fsdp'")
