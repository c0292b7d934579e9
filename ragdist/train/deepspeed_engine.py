"""DeepSpeed ZeRO 1/2/3 behind the `TrainEngine` protocol; CPU ranks talk over gloo."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ragdist.errors import ConfigError
from ragdist.train.engine import TrainerConfig, lr_lambda

log = logging.getLogger(__name__)


def deepspeed_config(cfg: TrainerConfig, world_size: int) -> dict[str, Any]:
    """Derived from the trainer config: the global batch is computed here, never written twice."""
    if cfg.ds_config:
        p = Path(cfg.ds_config)
        if not p.is_file():
            raise ConfigError(f"trainer.ds_config={cfg.ds_config!r}: file not found")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        raw.setdefault("train_micro_batch_size_per_gpu", cfg.micro_batch_size)
        raw.setdefault("gradient_accumulation_steps", cfg.grad_accum)
        raw.pop("train_batch_size", None)
        return raw
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"trainer.zero_stage={cfg.zero_stage}: expected 0, 1, 2 or 3")
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    elif cfg.precision != "fp32":
        raise ConfigError(f"trainer.precision={cfg.precision!r}: expected fp32, bf16 or fp16")
    return ds


def init_distributed() -> None:
    import deepspeed

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)


class DeepSpeedEngine:
    def __init__(self, cfg: TrainerConfig, build_module: Callable[[], nn.Module], run_dir: str | Path):
        import deepspeed

        init_distributed()
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ds_cfg = deepspeed_config(cfg, self.world_size)
        self._hf_ds = None
        if ds_cfg.get("zero_optimization", {}).get("stage") == 3:
            # ZeRO-3 partitions parameters as the model is built; the HF integration must see the
            # config first (and stay referenced) or the weights end up uninitialised.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(ds_cfg)
        module = build_module()
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
        )
        self.module = self.engine.module
        self.device = self.engine.device

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.engine(**batch)
        self.engine.backward(loss)
        self.engine.step()
        t = loss.detach().float().reshape(1).clone()
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.engine.zero_optimization_partition_weights():
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return sd if self.rank == 0 else None
        return self.module.state_dict() if self.rank == 0 else None

    def close(self) -> None:
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        self.engine = None  # type: ignore[assignment]
        self.optimizer = None
