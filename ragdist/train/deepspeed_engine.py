"""DeepSpeed ZeRO 0/1/2/3 (+ CPU offload) behind the `TrainEngine` protocol; CPU ranks talk over gloo."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ragdist.errors import ConfigError
from ragdist.train.engine import (
    TrainerConfig,
    adamw,
    lr_lambda,
    resolve_precision,
    trainable_parameters,
    upcast_to_fp32,
)

log = logging.getLogger(__name__)

_TAG = "ds"


def zero3_sizes(hidden_size: int) -> dict[str, int]:
    """ZeRO-3's buffer sizes scaled to the model, as HF's "auto" values scale them (reduce and prefetch
    buckets of ~hidden²), plus a bound on the gathered parameters: about two decoder layers
    (2 × 12·hidden²), never more than DeepSpeed's own 1e9. DeepSpeed's fixed defaults (1e9 parameters
    live, reused within 1e9) keep a model under ~0.5-1B parameters gathered whole from forward to
    backward, and its 5e8-element gradient bucket alone can outweigh the partition of such a model,
    so ZeRO-3 then holds more per rank than a full copy. Models of hidden ≥ 6,456 (70B class) keep
    DeepSpeed's defaults for the gathered bound.

    Used on CPU ranks only. On a GPU these small buckets cost speed for little memory: a 1.2B random
    Llama (hidden 2,048, seq 1,024, micro-batch 8, bf16, one H100) stepped at 16.8k tokens/s with them
    and 25.3k with DeepSpeed's defaults, side by side (14.0k vs 19.4k on another H100), at 34.2 vs
    35.1 GB peak (README, "Measured on H100 GPUs")."""
    h2 = hidden_size * hidden_size
    live = min(10**9, 24 * h2)
    return {
        "reduce_bucket_size": h2,
        "stage3_prefetch_bucket_size": int(0.9 * h2),
        "stage3_max_live_parameters": live,
        "stage3_max_reuse_distance": live,
        # the optimizer steps (and DeepSpeed sizes a gradient buffer for) one sub-group at a time
        "sub_group_size": live,
    }


def deepspeed_config(cfg: TrainerConfig, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """Derived from the trainer config: the global batch is computed here, never written twice.
    `hidden_size` (the model's) sizes ZeRO-3's buckets on CPU ranks (`zero3_sizes`); GPU ranks keep
    DeepSpeed's defaults (faster there; `trainer.ds_config` for anything else)."""
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
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cuda = torch.cuda.is_available()
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if hidden_size and not cuda:
            zero.update(zero3_sizes(hidden_size))
    elif cfg.zero_stage in (1, 2) and not cuda:
        # The contiguous gradient buffer saves GPU memory from fragmenting; on CPU it is only an
        # extra copy of every gradient (~9% of a tiny model's step).
        zero["contiguous_gradients"] = False
    if cfg.offload_optimizer:
        if cfg.zero_stage == 0:
            raise ConfigError("trainer.offload_optimizer needs trainer.zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if cuda:
            # On GPUs DeepSpeed's own CPU Adam (a config optimizer) makes offload fast.
            ds["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay},
            }
        else:
            # On CPU the offloaded step runs the client torch AdamW; DeepSpeed would otherwise insist
            # on compiling its CPU Adam op for no gain.
            ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.offload_params:
        if cfg.zero_stage != 3:
            raise ConfigError("trainer.offload_params needs trainer.zero_stage=3 (DeepSpeed offloads parameters only in ZeRO-3)")
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        if not cuda:
            raise ConfigError("trainer.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    elif cfg.precision not in ("fp32", "auto"):
        raise ConfigError(f"trainer.precision={cfg.precision!r}: expected auto, fp32, bf16 or fp16")
    return ds


def init_distributed() -> None:
    """The process group (one path for every engine) and DeepSpeed's communication backend over it."""
    import deepspeed

    from ragdist.distributed import init_process_group

    init_process_group()
    # The group exists: DeepSpeed only wraps it.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def zero3_loading(ds_cfg: dict[str, Any]) -> Any:
    """Makes every HF model built from now on (until `unset_hf_deepspeed_config`) partition its
    parameters over the ranks as it is constructed and as `from_pretrained` fills it: rank 0 reads
    the (memory-mapped) checkpoint module by module, each rank keeps its partitions, and no rank
    builds the whole model.

    The returned object must stay referenced while models are built (HF holds only a weak
    reference); without it the weights of a ZeRO-3 model end up uninitialised.
    """
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_cfg)


class DeepSpeedEngine:
    def __init__(self, cfg: TrainerConfig, build_module: Callable[[], nn.Module], run_dir: str | Path):
        import deepspeed

        init_distributed()
        self._unroute: Callable[[], None] | None = None
        if not torch.cuda.is_available() and cfg.cpu_collectives == "shm":
            # Opt-in, CPU only: see deepspeed_shm.py for what it replaces and how it is guarded.
            from ragdist.train.deepspeed_shm import route_cpu_collectives

            self._unroute = route_cpu_collectives()
        cfg = resolve_precision(cfg, build_module)
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ds_cfg = deepspeed_config(cfg, self.world_size, getattr(build_module, "hidden_size", None))
        self.zero3 = ds_cfg.get("zero_optimization", {}).get("stage") == 3
        self._hf_ds = zero3_loading(ds_cfg) if self.zero3 else None
        module = build_module()
        mixed = any(ds_cfg.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
        if not self.zero3 and not mixed:
            # fp32 training of a model loaded in bf16/fp16: DeepSpeed would step the low-precision
            # weights themselves. (Mixed precision keeps its own fp32 master copy; ZeRO-3 builds
            # the partitions in the config's dtype.)
            upcast_to_fp32(module)
        params = trainable_parameters(module)
        if "optimizer" in ds_cfg:
            optimizer: Any = None
        else:
            optimizer = adamw(params, cfg)
        if "scheduler" in ds_cfg:
            scheduler: Any = None
        elif optimizer is None:

            def scheduler(opt: torch.optim.Optimizer) -> Any:
                return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
        )
        self.module = self.engine.module
        self.device = self.engine.device

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss = self.engine(**batch)
        self.engine.backward(loss)
        # DeepSpeed counts micro-batches itself and only steps (and clips) at accumulation boundaries.
        self.engine.step()
        return loss.detach().float()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=_TAG, save_latest=False)

    def load_checkpoint(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise ConfigError(f"{path}: DeepSpeed could not load this checkpoint")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return sd if self.rank == 0 else None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.rank == 0 else None

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[None]:
        if not self.zero3:
            with torch.no_grad():
                yield
            return
        import deepspeed

        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield

    def close(self) -> None:
        if self.engine is None:
            return
        self.engine.destroy()
        if self._unroute is not None:
            self._unroute()
            self._unroute = None
        self.engine = self.optimizer = self.scheduler = self.module = None  # type: ignore[assignment]
        if self._hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            # Otherwise every model built later in this process (an export, the next variant)
            # would be partitioned as it is constructed.
            unset_hf_deepspeed_config()
            self._hf_ds = None
        gc.collect()
