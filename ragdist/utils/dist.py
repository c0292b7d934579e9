"""Process-group setup from the launcher's environment (torchrun, deepspeed, srun, or our own spawn)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def launched_by_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def from_slurm_env() -> None:
    """Under `srun` without a launcher, derive torch's variables from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_process_group() -> tuple[int, int]:
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shutdown() -> None:
    """Tear down cleanly: skipping this aborts some runs at exit ('terminate called ...')."""
    import gc

    gc.collect()
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
