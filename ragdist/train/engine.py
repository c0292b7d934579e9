"""The `TrainEngine` protocol and the trainer config. Only the engine modules import deepspeed/FSDP.

    ragdist-train trainer=deepspeed trainer.zero_stage=3 trainer.offload_optimizer=true
    ragdist-train trainer=fsdp trainer.precision=bf16
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ragdist.errors import ConfigError
from ragdist.train.examples import ExamplesConfig


@dataclass
class TrainerConfig:
    engine: str = "deepspeed"  # deepspeed | fsdp
    nproc: int = 2  # ranks ragdist-train spawns on this node when not started by a launcher
    zero_stage: int = 2  # DeepSpeed only: 0 (plain data parallel), 1, 2 or 3
    # CPU offload. DeepSpeed: optimizer state (ZeRO 1-3) and parameters (ZeRO-3 only);
    # FSDP2: either one turns on CPUOffloadPolicy, which offloads parameters, gradients and the step.
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    max_steps: int = 1000
    grad_clip: float = 1.0  # 0 = no clipping
    # auto (model.dtype's) | fp32 | bf16 | fp16 (fp16: DeepSpeed only). bf16 / fp16 compute in that
    # dtype and keep fp32 master weights and optimizer state, whatever dtype the model loaded in.
    precision: str = "auto"
    max_seq_len: int = 256
    log_every: int = 25
    seed: int = 0
    omp_threads: int = 1  # per rank; more threads per rank than cores/ranks only oversubscribes
    master_port: int = 0  # 0 = pick a free port
    variants: list[str] = field(default_factory=lambda: ["rag", "closed_book"])
    ds_config: str = ""  # a raw DeepSpeed JSON file; overrides what is derived from this config
    # DeepSpeed on CPU ranks that share one node: "shm" sends the gradient all-reduce and the
    # parameter all-gather through shared memory (same results, a fraction of gloo's time over
    # loopback sockets); "gloo" leaves every collective on the process group.
    cpu_collectives: str = "shm"
    # PyTorch's fused AdamW kernel (CPU or CUDA). On CPU it updated a 2.2M-parameter ZeRO partition
    # in 1.3 ms instead of 8.7 ms; its results differ from the default AdamW in the last bit of some
    # elements, so a run's loss trajectory changes with it: off unless asked for.
    fused_optimizer: bool = False
    # Checkpoints of the training state (model, optimizer, scheduler, RNG, data position) under
    # <run_dir>/train_state/<variant>/step_N; 0 = only at the end.
    save_every: int = 0
    keep_checkpoints: int = 2  # newest checkpoints kept per variant
    resume: str = ""  # "" = start fresh | auto = newest checkpoint of this run_dir if any | a path
    # Batches each rank builds ahead (retrieval included) in a background thread; 0 = inline. Deeper
    # than retrieval_lookahead, so that one lookahead call's embedding spreads over several steps.
    prefetch_depth: int = 16
    retrieval_lookahead: int = 8  # questions of this many upcoming batches retrieved in one call; 1 = per batch
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)


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


def check_trainer_config(cfg: TrainerConfig) -> None:
    """Values the schema's types cannot rule out, refused before any process group exists."""
    if cfg.engine not in ("deepspeed", "fsdp"):
        raise ConfigError(f"trainer.engine={cfg.engine!r}: expected 'deepspeed' or 'fsdp'")
    if cfg.cpu_collectives not in ("shm", "gloo"):
        raise ConfigError(f"trainer.cpu_collectives={cfg.cpu_collectives!r}: expected 'shm' or 'gloo'")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.precision!r}: expected auto, fp32, bf16 or fp16")
    for key in ("micro_batch_size", "grad_accum", "max_steps", "retrieval_lookahead"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(cfg, key)}: must be at least 1")
    for key in ("save_every", "prefetch_depth", "warmup_steps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(cfg, key)}: must not be negative")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"trainer.keep_checkpoints={cfg.keep_checkpoints}: keep at least 1")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"trainer.schedule={cfg.schedule!r}: expected cosine, linear or constant")
    if len(cfg.betas) != 2:
        raise ConfigError(f"trainer.betas={list(cfg.betas)}: expected two numbers")


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


def build_engine(cfg: TrainerConfig, build_module: Callable[[], nn.Module], run_dir: str | Path) -> TrainEngine:
    """`build_module` is called once, inside the engine, after whatever must precede model construction.

    A `ragdist.train.model.GeneratorBuilder` also tells the engine the model's dtype
    (`trainer.precision=auto`) and, for a pretrained model, lets FSDP2 build it on the meta device
    and fill its shards from rank 0.
    """
    check_trainer_config(cfg)
    if cfg.engine == "deepspeed":
        from ragdist.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, build_module, run_dir)
    from ragdist.train.fsdp_engine import FSDPEngine

    return FSDPEngine(cfg, build_module, run_dir)


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
