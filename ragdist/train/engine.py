"""The `TrainEngine` protocol and the trainer config. Only the engine modules import deepspeed/FSDP.

    ragdist-train trainer=deepspeed trainer.zero_stage=3 trainer.offload_optimizer=true
    ragdist-train trainer=fsdp trainer.precision=bf16
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ragdist.errors import ConfigError
from ragdist.train.config import TrainerConfig


@runtime_checkable
class TrainEngine(Protocol):
    """What the training loop needs from a distributed engine; DeepSpeed and FSDP2 implement it."""

    rank: int
    world_size: int
    module: nn.Module

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one micro-batch; the optimizer steps at each accumulation boundary.

        Returns this rank's detached loss; the loop reduces it over ranks once per optimizer step.
        """
        ...

    def lr(self) -> float: ...

    def save_checkpoint(self, path: Path) -> None:
        """Collective: every rank writes its part of model, optimizer and scheduler state under `path`."""
        ...

    def load_checkpoint(self, path: Path) -> None:
        """Collective: restore what `save_checkpoint` wrote."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the whole model's weights on rank 0 (None elsewhere), gathered from shards if needed."""
        ...

    def gathered_params(self) -> AbstractContextManager[None]:
        """Collective: inside, every rank's `module` holds whole parameters (no grad), e.g. to inspect them."""
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(cfg: TrainerConfig, build_module: Callable[[], nn.Module]) -> TrainerConfig:
    """`trainer.precision=auto`: the precision of the dtype the model loads in (`model.dtype`, which
    a `GeneratorBuilder` carries; fp32 for any other builder)."""
    if cfg.precision != "auto":
        return cfg
    dtype = getattr(build_module, "dtype", "fp32")
    return dataclasses.replace(cfg, precision=dtype if dtype in PRECISIONS else "fp32")


def upcast_to_fp32(module: nn.Module) -> nn.Module:
    """Floating-point parameters and buffers in fp32 (the master weights); a no-op when they are."""
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in [*module.parameters(), *module.buffers()]):
        module.float()
    return module


def adamw(params: list[nn.Parameter], cfg: TrainerConfig) -> torch.optim.Optimizer:
    """The engines' AdamW; with `trainer.fused_optimizer`, PyTorch's fused kernel where every
    parameter allows it (CPU or CUDA, floating point)."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.fused_optimizer and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # a dtype or build without the fused kernel
            pass
    return torch.optim.AdamW(params, **kw)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: the peft/freeze settings froze the whole model")
    return params
