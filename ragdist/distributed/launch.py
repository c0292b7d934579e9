"""Launcher detection and the local launch: N ranks on this node through PyTorch's elastic agent.

    rc = launch_local([sys.executable, "-m", "ragdist.launch.rank", "hydra.run.dir=runs/x"], nproc=2)
    rc = launch_local(rank_fn, nproc=2, args=(config_dict,))     # a picklable function per rank

The ranks get torch's environment contract (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
MASTER_PORT) exactly as under `torchrun`, so they enter the same code a cluster launcher reaches.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

#: Signals the local launcher passes on to its ranks (a batch system's preemption notice). The
#: elastic agent would otherwise turn SIGTERM into an immediate SIGTERM+SIGKILL of every rank.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def launched_by_launcher() -> bool:
    """True in a rank started by torchrun, deepspeed, srun (once adopted), Ray Train or `launch_local`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _children(exclude: Collection[int] = ()) -> list[int]:
    """PIDs of this process's ranks: its direct children that the elastic agent started, i.e. those
    not in `exclude` (the children it had before the launch: a Ray cluster this process started,
    say, whose GCS server a forwarded SIGTERM would stop under the service the driver still uses)."""
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    ranks = []
    for pid in pids:
        if pid in exclude:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:  # multiprocessing's helper, not a rank
            ranks.append(pid)
    return ranks


@contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_local(
    entry: Sequence[str] | Callable[..., Any],
    nproc: int,
    *,
    args: Sequence[Any] = (),
    env: dict[str, str] | None = None,
    master_port: int = 0,
    grace_s: float = 60.0,
) -> int:
    """Run `entry` as `nproc` ranks on this node over loopback with `torch.distributed.launcher`.

    `entry`: a command (list of strings) or a picklable function called with `args` in each rank (a
    function rank that returns REQUEUE_EXIT_CODE reports a preemption). Returns 0 when every rank succeeded, 75 (requeue) when the ranks stopped for preemption, else
    the status of the rank that failed first; the agent then stops the others (SIGTERM, and SIGKILL
    after `grace_s`). SIGTERM / SIGUSR1 received here are forwarded to every rank, which checkpoint
    and exit with 75, and to no other child of this process.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from ragdist.distributed.process_group import free_port
    from ragdist.train.preempt import REQUEUE_EXIT_CODE

    port = master_port or free_port()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ragdist-{uuid.uuid4().hex[:8]}",
        rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0},
        max_restarts=0, monitor_interval=0.1, local_addr="127.0.0.1", shutdown_timeout=int(grace_s),
        # The agent handles these itself; SIGTERM and SIGUSR1 stay ours (forwarded, so ranks checkpoint).
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",
    )  # fmt: skip
    if callable(entry):
        target: Any = entry
        call_args = tuple(args)
    else:
        target, call_args = entry[0], tuple(entry[1:])
    received: list[int] = []
    before = set(_children())

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        ranks = _children(exclude=before)
        log.warning("launcher: got %s, forwarding to %d ranks", signal.Signals(signum).name, len(ranks))
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    updates = dict(env or {})
    # the agent sets this from `signals_to_handle`; restored afterwards like the rest
    updates.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", config.signals_to_handle)
    updates.setdefault("MASTER_ADDR", "127.0.0.1")
    # Every rank is on this node: gloo's pairs on loopback too, not on whatever the hostname resolves to
    updates.setdefault("GLOO_SOCKET_IFNAME", "lo")
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        with _environ(updates):
            results = elastic_launch(config, target)(*call_args) or {}
        # A function rank reports a preemption by returning the requeue status (an exit status would
        # read as a failure to the agent, which then logs it as one).
        return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in results.values() else 0
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        codes = {f.exitcode for f in e.failures.values()}
        if first.exitcode == REQUEUE_EXIT_CODE or codes == {REQUEUE_EXIT_CODE}:
            return REQUEUE_EXIT_CODE
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
