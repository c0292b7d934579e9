"""Process-group setup from the launcher's environment (torchrun, deepspeed, srun, or our own spawn),
and the local launcher ragdist-train uses to start its ranks."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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
    """Tear down cleanly: skipping this aborts some runs at exit ('terminate called ...').

    Callers drop their engine/optimizer/model references first; the collection here then frees
    them while the process group still exists, and the barrier keeps a fast rank from destroying
    the group under a slow one.
    """
    import gc

    gc.collect()
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


#: Signals the local launcher passes on to its ranks (a batch system's preemption notice).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def launch_local(
    cmd: Sequence[str],
    nproc: int,
    *,
    env: dict[str, str] | None = None,
    master_port: int = 0,
    grace_s: float = 60.0,
) -> int:
    """Run `cmd` as `nproc` ranks on this node over loopback (torchrun's environment contract).

    Returns 0 when every rank succeeded, 75 (requeue) when the ranks stopped for preemption, else
    the first failing rank's status. SIGTERM / SIGUSR1 received here are forwarded to every rank,
    which checkpoint and exit; when one rank fails, the others get SIGTERM and, after `grace_s`,
    SIGKILL — only the processes started here are signalled.
    """
    from ragdist.train.preempt import REQUEUE_EXIT_CODE

    port = master_port or free_port()
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        log.warning("launcher: got %s, forwarding to %d ranks", signal.Signals(signum).name, len(procs))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        for r in range(nproc):
            procs.append(subprocess.Popen(list(cmd), env=dict(base, RANK=str(r), LOCAL_RANK=str(r))))
        failed_at: float | None = None
        first_bad: int | None = None
        while [p.poll() for p in procs].count(None):  # poll every rank, each round
            bad = [p.returncode for p in procs if p.returncode not in (None, 0, REQUEUE_EXIT_CODE)]
            if bad and failed_at is None:
                first_bad, failed_at = bad[0], time.monotonic()
                log.error("launcher: a rank exited with status %s; stopping the others", first_bad)
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        codes = [p.returncode for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if first_bad is not None:
        return first_bad
    bad = [c for c in codes if c not in (0, REQUEUE_EXIT_CODE)]
    if bad:
        return bad[0]
    if REQUEUE_EXIT_CODE in codes:
        return REQUEUE_EXIT_CODE
    return 0
