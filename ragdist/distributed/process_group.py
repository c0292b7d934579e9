"""The process group, set up once per rank from the launcher's environment (torch's contract)."""

from __future__ import annotations

import gc
import os
import socket

import torch
import torch.distributed as dist


def init_process_group() -> tuple[int, int]:
    """NCCL for CUDA tensors on GPU ranks (each on its LOCAL_RANK device) and gloo for CPU tensors
    (object broadcasts, the loop's metrics) in the same group; gloo alone on CPU ranks. A no-op when
    a group exists (Ray Train and the engines' own libraries may have made it)."""
    from ragdist.launch.slurm import adopt_slurm_ranks

    adopt_slurm_ranks()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shutdown() -> None:
    """Tear down cleanly: skipping this aborts some runs at exit ('terminate called ...').

    Callers drop their engine/optimizer/model references first; the collection here then frees
    them while the process group still exists, and the barrier keeps a fast rank from destroying
    the group under a slow one.
    """
    gc.collect()
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
