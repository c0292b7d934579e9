"""Choose and build the training engine named by `trainer.engine`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ragdist.train.engine import TrainEngine, TrainerConfig


def build_engine(cfg: TrainerConfig, build_module: Callable[[], nn.Module], run_dir: str | Path) -> TrainEngine:
    """`build_module` is called once, inside the engine, after whatever must precede model construction."""
    if cfg.engine == "deepspeed":
        from ragdist.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, build_module, run_dir)
    from ragdist.train.fsdp_engine import FSDPEngine

    return FSDPEngine(cfg, build_module, run_dir)
