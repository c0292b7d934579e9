"""SLURM's variables → the ones torch.distributed reads, for ranks started by `srun`.

srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID per task but nothing torch's env:// rendezvous
needs; this fills RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from
them, keeping any the batch script exported. A step with one task is a driver, not a rank: it runs
ragdist-train's own rank spawning (that is how a Hydra/submitit sweep job runs).
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from ragdist.errors import ConfigError

# Without an exported MASTER_PORT every task derives the same one from the job id; the range keeps
# clear of Ray's defaults (6379, 8265, 10001-19999) and torch's 29500.
PORT_BASE, PORT_SPAN = 20000, 9000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[003-005,9],cpu1' → 'gpu003'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise ConfigError(f"SLURM node list {nodelist!r}: cannot read its first host")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM_TASKS_PER_NODE's compressed form: '2(x3),1' → [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ConfigError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r}: unexpected format")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ConfigError(f"SLURM_NODEID={node_id} but SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def adopt_slurm_ranks(env: MutableMapping[str, str] | None = None) -> bool:
    """Under `srun` with several tasks, make this task a torch rank; True if it did.

    Leaves the environment alone when a launcher already set RANK, or outside SLURM, or in a
    one-task step.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return False
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
    if ntasks <= 1:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        env["LOCAL_WORLD_SIZE"] = str(tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))))
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise ConfigError("srun task without SLURM_JOB_NODELIST: export MASTER_ADDR")
        env["MASTER_ADDR"] = first_host(nodes)
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env["MASTER_PORT"] = str(PORT_BASE + job % PORT_SPAN)
    return True
