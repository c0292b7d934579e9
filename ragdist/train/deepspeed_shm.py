"""Opt-in (`trainer.cpu_collectives=shm`): DeepSpeed's CPU gradient all-reduce and parameter all-gather
through shared memory instead of gloo's loopback sockets, for CPU ranks that share one node.

This replaces two methods of DeepSpeed's communication backend object (`deepspeed.comm.comm.cdb`),
which is not a public API: off by default, used only on CPU, guarded (every call it does not take goes
to DeepSpeed's own method), restored when the engine closes, and `calls` counts what it took so that a
test fails loudly when a DeepSpeed version stops calling these two functions (e.g. ZeRO moving to
reduce-scatter). GPU ranks never use it: NCCL is what they run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ragdist.train.shm_collectives import SHM_DIR, ShmCollectives

log = logging.getLogger(__name__)

#: Collectives taken through shared memory in this process: {"all_reduce": n, "all_gather": n}.
calls = {"all_reduce": 0, "all_gather": 0}


def route_cpu_collectives() -> Callable[[], None] | None:
    """Route DeepSpeed's whole-world blocking sum all-reduces and all-gathers through shared memory;
    returns the function that restores DeepSpeed's own methods (None: nothing was routed)."""
    _unlink_deepspeed_shm_names()
    shm = _shared_memory_collectives()
    return _route_through(shm) if shm is not None else None


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
            calls["all_reduce"] += 1
            return None
        return own_reduce(tensor, op, group, async_op)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):  # noqa: ANN001, ANN202
        if not async_op and whole_world(group) and shm.all_gather_into_tensor(output_tensor, input_tensor):
            calls["all_gather"] += 1
            return None
        return own_gather(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)

    # instance attributes shadow the class's methods; removing them restores DeepSpeed's own
    cdb.all_reduce, cdb.all_gather_into_tensor = all_reduce, all_gather_into_tensor

    def restore() -> None:
        for name in ("all_reduce", "all_gather_into_tensor"):
            cdb.__dict__.pop(name, None)

    return restore
