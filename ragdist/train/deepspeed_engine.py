"""DeepSpeed ZeRO 0/1/2/3 (+ CPU offload) behind the `TrainEngine` protocol; CPU ranks talk over gloo."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
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
from ragdist.train.shm_collectives import SHM_DIR, ShmCollectives

log = logging.getLogger(__name__)

_TAG = "ds"


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
    """The process group (unless a caller made it) and DeepSpeed's communication backend over it."""
    import deepspeed

    # Also when the group exists: DeepSpeed then only wraps it, and its backend object is there
    # before the engine (the shared-memory routing below patches that object).
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    _unlink_deepspeed_shm_names()


def _unlink_deepspeed_shm_names() -> None:
    """DeepSpeed maps a shared-memory buffer per CPU rank when LOCAL_SIZE equals the world size (its
    launcher sets it) and never removes the files: every such job left 2 × 66 MiB in /dev/shm. Its
    setup returns only once a rank has mapped every peer's buffer, so after a barrier the names can go
    (the mappings stay)."""
    if torch.cuda.is_available() or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    mine = SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    dist.barrier()
    mine.unlink(missing_ok=True)


_SHM: dict[str, Any] = {"world": None, "shm": None}


def _shared_memory_collectives() -> ShmCollectives | None:
    """One region per default process group and process, kept across the engines a process builds
    (the rag and closed-book variants, an export): creating one is a collective."""
    if _SHM["world"] is not dist.group.WORLD:  # first engine, or a new process group since
        if _SHM["shm"] is not None:
            _SHM["shm"].close()
        _SHM["world"], _SHM["shm"] = dist.group.WORLD, ShmCollectives.create()
    return _SHM["shm"]


def _route_through(shm: ShmCollectives) -> Callable[[], None] | None:
    """DeepSpeed's blocking sum all-reduces and all-gathers over the whole world go through `shm`;
    every other call (asynchronous, a sub-group, small, another op) takes DeepSpeed's own path.

    ZeRO-1/2 all-reduce the gradients and all-gather the updated partitions once per step; on CPU
    ranks these two collectives are most of what the engine adds to a plain data-parallel step.
    Returns the function that restores DeepSpeed's own methods (None: nothing was routed).
    """
    import deepspeed.comm.comm as ds_comm

    cdb = ds_comm.cdb
    if cdb is None or not all(callable(getattr(cdb, m, None)) for m in ("all_reduce", "all_gather_into_tensor")):
        log.warning("DeepSpeed's communication backend has no all_reduce/all_gather_into_tensor; collectives stay on gloo")
        return None
    own_reduce, own_gather = cdb.all_reduce, cdb.all_gather_into_tensor
    world = list(range(dist.get_world_size()))

    def whole_world(group: Any) -> bool:
        if group is None or group is dist.group.WORLD:
            return True
        try:
            return dist.get_process_group_ranks(group) == world
        except (RuntimeError, ValueError):
            return False

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):  # noqa: ANN001, ANN202
        is_sum = op == dist.ReduceOp.SUM or getattr(op, "name", None) == "SUM"
        if not async_op and is_sum and whole_world(group) and shm.all_reduce_(tensor):
            return None
        return own_reduce(tensor, op, group, async_op)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):  # noqa: ANN001, ANN202
        if not async_op and whole_world(group) and shm.all_gather_into_tensor(output_tensor, input_tensor):
            return None
        return own_gather(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)

    # instance attributes shadow the class's methods; removing them restores DeepSpeed's own
    cdb.all_reduce, cdb.all_gather_into_tensor = all_reduce, all_gather_into_tensor

    def restore() -> None:
        for name in ("all_reduce", "all_gather_into_tensor"):
            cdb.__dict__.pop(name, None)

    return restore


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
            shm = _shared_memory_collectives()
            self._unroute = _route_through(shm) if shm is not None else None
        cfg = resolve_precision(cfg, build_module)
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ds_cfg = deepspeed_config(cfg, self.world_size)
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
