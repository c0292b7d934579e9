"""Process groups, rank-0 helpers and launchers: the one way ragdist ranks come up.

Every launcher — ragdist's own local launch (PyTorch's elastic agent), `torchrun`, `deepspeed`,
`srun` and Ray Train — ends in `init_process_group()` with torch's environment contract (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the recipes then run the same per-rank function.
"""

from ragdist.distributed.launch import launch_local, launched_by_launcher
from ragdist.distributed.process_group import free_port, init_process_group, rank, shutdown, world_size
from ragdist.distributed.rank0 import broadcast_object, on_rank0

__all__ = [
    "broadcast_object",
    "free_port",
    "init_process_group",
    "launch_local",
    "launched_by_launcher",
    "on_rank0",
    "rank",
    "shutdown",
    "world_size",
]
