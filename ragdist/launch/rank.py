"""One training rank under a launcher — `deepspeed`, `torchrun` or `srun` start one of these per rank.

    deepspeed --num_gpus 2 --master_port 29600 --module ragdist.launch.rank hydra.run.dir=runs/x ...
    torchrun --nproc_per_node 2 -m ragdist.launch.rank hydra.run.dir=runs/x ...
    srun --ntasks 8 python -m ragdist.launch.rank hydra.run.dir=runs/x ...
    python -m ragdist.launch.rank --check <overrides>     # compose only: exit 2 naming a bad key

It runs ragdist-train's launcher mode (rank 0 prepares data, index and service; every rank trains;
every rank generates its share of the evaluation, rank 0 writes the report) and adds what a
launcher does not give:
- srun's SLURM_* variables become torch's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
- hydra.run.dir must be on the command line, since each rank would otherwise name its own ${now:} dir;
- the console is rank 0's: every other rank writes to <run_dir>/logs/rank-<N>.log, and only a
  failing rank says so on the console, with the path of its log;
- a preemption warning (SIGUSR1) before training has begun exits with REQUEUE_EXIT_CODE at once:
  there is nothing to checkpoint yet, and by default the signal would kill the rank outright.
  During training the trainer's own handler takes over (checkpoint, then the same exit status).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

from ragdist.launch.slurm import adopt_slurm_ranks

RUN_DIR_KEYS = ("hydra.run.dir=", "+hydra.run.dir=", "++hydra.run.dir=")


def run_dir_from_argv(argv: list[str]) -> str | None:
    for a in argv:
        for key in RUN_DIR_KEYS:
            if a.startswith(key):
                return a[len(key) :]
    return None


def console_to_rank0(run_dir: str | Path, rank: int) -> Path | None:
    """Send this process's stdout/stderr (C-level included) to a per-rank log unless it is rank 0."""
    if rank == 0:
        return None
    path = Path(run_dir) / "logs" / f"rank-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


PREEMPTED_MARKER = "logs/preempted"


def _requeue_code() -> int:
    from ragdist.train.preempt import REQUEUE_EXIT_CODE

    return REQUEUE_EXIT_CODE


def mark_preempted(run_dir: str | Path, rank: int) -> Path:
    """Leave <run_dir>/logs/preempted for the batch script.

    srun reports one exit status for all ranks, and with --kill-on-bad-exit the first rank to exit
    with the requeue status gets the others SIGTERMed, which then report 143. The file says what
    the status cannot: a rank stopped for preemption after checkpointing.
    """
    from ragdist.index.snapshot import atomic_write_text

    path = Path(run_dir) / PREEMPTED_MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"rank {rank} exited {_requeue_code()} for a requeue (pid {os.getpid()})\n")
    return path


def _early_preemption(signum: int, frame: FrameType | None) -> None:
    code = _requeue_code()
    print(f"ragdist: {signal.Signals(signum).name} before training: exiting {code} for a requeue",
          file=sys.stderr, flush=True)  # fmt: skip
    raise SystemExit(code)


def check_overrides(argv: list[str]) -> int:
    """Compose the config from `argv` and report the first error; for batch scripts, before they
    start a Ray cluster and N ranks only to have every rank reject a mistyped key."""
    from hydra.errors import HydraException

    from ragdist.config import compose
    from ragdist.errors import RagdistError

    overrides = [a for a in argv if not a.lstrip("+").startswith("hydra.")]
    try:
        compose(overrides)
    except (HydraException, RagdistError) as e:
        print(f"ragdist: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def main() -> None:
    if sys.argv[1:2] == ["--check"]:
        sys.exit(check_overrides(sys.argv[2:]))
    # Not SIGTERM: a launcher also sends it to the healthy ranks when one rank fails, and a
    # requeue status then would hide the failure.
    signal.signal(signal.SIGUSR1, _early_preemption)
    adopt_slurm_ranks()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = run_dir_from_argv(sys.argv[1:])
    if run_dir is None and world > 1:
        print(
            "ragdist: error: under a launcher, pass hydra.run.dir=<dir> so that all "
            f"{world} ranks write to the same run directory",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    console = os.dup(2)
    log = console_to_rank0(run_dir, rank) if run_dir else None
    from ragdist.recipes import finetune

    try:
        finetune.main()
    except SystemExit as e:
        if e.code == _requeue_code() and run_dir:
            mark_preempted(run_dir, rank)
        if log is not None and e.code not in (0, None, _requeue_code()):
            os.write(console, f"ragdist: rank {rank} exited with status {e.code}; its log: {log}\n".encode())
        raise
    except BaseException as e:
        if log is not None:
            os.write(
                console, f"ragdist: rank {rank} failed ({type(e).__name__}: {e}); its log: {log}\n".encode()
            )
        raise


if __name__ == "__main__":
    main()
