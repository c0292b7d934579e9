"""FSDP2 (`fully_shard` per transformer block, then the root) behind the `TrainEngine` protocol.

Runs on CPU over gloo and on GPUs over NCCL with the same code: the device mesh is built on
whichever device type the ranks have.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ragdist import distributed as rdist
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


def _non_persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers left out of the state dict (so out of any checkpoint), by name, in a fixed order."""
    saved = set(module.state_dict())
    return [(name, buf) for name, buf in module.named_buffers() if name not in saved]


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks HF marks as not to be split (`_no_split_modules`), e.g. LlamaDecoderLayer."""
    names: set[str] = set()
    for m in module.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names]


class FSDPEngine:
    def __init__(self, cfg: TrainerConfig, build_module: Callable[[], nn.Module], run_dir: str | Path):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        cfg = resolve_precision(cfg, build_module)
        if cfg.precision == "fp16":
            raise ConfigError(
                "trainer.engine=fsdp supports precision fp32 or bf16 (fp16 needs loss scaling; use bf16, "
                "or set trainer.precision=bf16 for a model.dtype=fp16 model)"
            )
        if cfg.ds_config:
            raise ConfigError("trainer.ds_config is a DeepSpeed JSON; it has no meaning with trainer.engine=fsdp")
        self.cfg = cfg
        self.rank, self.world_size = rdist.init_process_group()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        if cfg.precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        offloaded = cfg.offload_params or cfg.offload_optimizer
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offloaded else OffloadPolicy()

        def shard(module: nn.Module) -> nn.Module:
            for block in transformer_blocks(module):
                fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
            # The root group holds embeddings, final norm and the (tied) head: whole during forward.
            fully_shard(module, mesh=mesh, mp_policy=mp, offload_policy=offload)
            return module

        # FSDP2 shards whatever each rank built and does not broadcast it: every rank must build
        # identical initial weights (a pretrained model's come from rank 0 instead).
        torch.manual_seed(cfg.seed)
        if getattr(build_module, "pretrained", False):
            module = self._load_sharded(build_module, shard, torch.device("cpu") if offloaded else self.device)
        else:
            # fp32 master weights (a model built in bf16/fp16 is upcast, while still whole)
            module = upcast_to_fp32(build_module())
            if self.device.type == "cuda" and not offloaded:
                module.to(self.device)
            shard(module)
        self.module = module
        self.params = trainable_parameters(module)
        self.optimizer = adamw(self.params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.micro = 0

    def _load_sharded(self, builder: Any, shard: Callable[[nn.Module], nn.Module], device: torch.device) -> nn.Module:
        """A pretrained model that no rank but 0 ever holds whole: every rank builds it on the meta
        device in fp32 (the master weights) and shards it; rank 0 alone loads the checkpoint (in
        model.dtype), and each rank receives its shards of it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        module = shard(builder.on_meta(torch.float32))
        module.to_empty(device=device)
        source = builder() if self.rank == 0 else None
        full = source.state_dict() if source is not None else {}
        set_model_state_dict(
            module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        )
        del full
        # Buffers a checkpoint does not hold (rotary frequencies, ...) were computed by rank 0's build.
        ref = dict(_non_persistent_buffers(source)) if source is not None else {}
        del source
        for name, buf in _non_persistent_buffers(module):
            value = ref[name].to(device=buf.device, dtype=buf.dtype) if self.rank == 0 else torch.empty_like(buf)
            dist.broadcast(value, src=0)
            with torch.no_grad():
                buf.copy_(value)
        gc.collect()
        return module

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        boundary = (self.micro + 1) % self.cfg.grad_accum == 0
        # Between boundaries gradients accumulate unsharded on each rank; reduce-scatter once per step.
        self.module.set_requires_gradient_sync(boundary)
        loss = self.module(**batch)
        (loss / self.cfg.grad_accum).backward()
        self.micro += 1
        if boundary:
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
        dist.barrier()

    def load_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (path / "dcp").is_dir() or not (path / "scheduler.pt").is_file():
            raise ConfigError(f"{path}: not an FSDP checkpoint (was it written by trainer.engine=deepspeed?)")
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        with torch.no_grad():
            for m in units:
                m.unshard()
            try:
                yield
            finally:
                for m in units:
                    m.reshard()

    def close(self) -> None:
        self.optimizer = self.scheduler = self.module = None  # type: ignore[assignment]
        self.params = []
        gc.collect()
