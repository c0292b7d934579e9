"""Start, join and stop one Ray node with its own temp dir and ports, and stop it by PID.

`ray stop` ends every Ray process on the machine, other people's clusters included, so it has no
place on a shared node. Every daemon Ray starts for a node carries the node's temp dir on its
command line; that, plus the daemons' descendants (workers, actors, job drivers), is exactly the
node, and `stop` ends those processes and nothing else.

    python -m ragdist.launch.ray_head start --temp-dir /tmp/rh-1 --num-cpus 2   # prints `export ...` lines
    python -m ragdist.launch.ray_head start --temp-dir /tmp/rh-1 --host 10.0.0.5 --no-dashboard
    python -m ragdist.launch.ray_head worker --address 10.0.0.5:6379 --temp-dir /tmp/rh-1 --host 10.0.0.6
    python -m ragdist.launch.ray_head wait --address 10.0.0.5:6379 --nodes 4
    python -m ragdist.launch.ray_head stop --temp-dir /tmp/rh-1
    python -m ragdist.launch.ray_head free-port --host 10.0.0.5
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ragdist.errors import ConfigError, RagdistError

# Ray puts unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store; AF_UNIX paths stop at
# 107 bytes, which leaves this much for the temp dir itself.
MAX_TEMP_DIR_LEN = 45


@dataclass
class RayNode:
    address: str  # GCS host:port, what RAY_ADDRESS and `ray start --address` take
    dashboard: str  # http://host:port for `ray job submit --address`; "" without a dashboard
    temp_dir: str

    def exports(self) -> str:
        lines = [f"export RAY_ADDRESS={shlex.quote(self.address)}"]
        if self.dashboard:
            lines.append(f"export RAY_DASHBOARD_ADDRESS={shlex.quote(self.dashboard)}")
        lines.append(f"export RAGDIST_RAY_TEMP_DIR={shlex.quote(self.temp_dir)}")
        if self.address.startswith("127."):
            # the head runs without token auth on loopback (see node_env); its clients must agree
            lines.append("export RAY_AUTH_MODE=disabled")
        return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    # Kept here rather than imported from ragdist.distributed, which pulls in torch: this module
    # runs in batch scripts where every second of start-up shows.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def route_ip(toward: str) -> str:
    """This machine's address on the route to `toward` (no packet is sent: UDP connect only picks a route)."""
    host = toward.rsplit(":", 1)[0] if ":" in toward else toward
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        return str(s.getsockname()[0])


def check_temp_dir(temp_dir: str | Path) -> Path:
    path = Path(temp_dir)
    if not path.is_absolute():
        raise ConfigError(f"Ray temp dir {str(temp_dir)!r}: must be an absolute path")
    if len(str(path)) > MAX_TEMP_DIR_LEN:
        raise ConfigError(
            f"Ray temp dir {str(path)!r} is {len(str(path))} characters; Ray's unix socket paths under it "
            f"overflow past {MAX_TEMP_DIR_LEN} (use a short one such as /tmp/rh-$SLURM_JOB_ID)"
        )
    return path


def node_env(host: str) -> dict[str, str]:
    env = dict(os.environ)
    # `ray start` would otherwise read a RAY_ADDRESS meant for some other cluster.
    env.pop("RAY_ADDRESS", None)
    # Job entry points run `python ...` from the node's PATH: make that the interpreter (and venv)
    # this node was started from, which is the one that has ragdist and its pinned stack.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Without it Ray may bind the first interface's address even when told 127.0.0.1.
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if host.startswith("127."):
        # Nothing outside the machine can reach a loopback head, and the token handshake would
        # otherwise demand ~/.ray/auth_token from every client we start.
        env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def _resources(num_cpus: float | None, num_gpus: int | None) -> list[str]:
    out = []
    if num_cpus is not None:
        out.append(f"--num-cpus={int(num_cpus)}")
    if num_gpus is not None:
        out.append(f"--num-gpus={int(num_gpus)}")
    return out


def _own_ports(host: str) -> list[str]:
    # Ray's fixed defaults (client server 10001, dashboard agent 52365, ...) clash when two clusters
    # share a machine, so every listening port is picked free here.
    names = ["ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port"]  # fmt: skip
    return [f"--{n}={free_port(host)}" for n in names]


def start_head(
    temp_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    dashboard: bool = True,
    port: int = 0,
    dashboard_port: int = 0,
    timeout_s: float = 180.0,
) -> RayNode:
    """`ray start --head` on `host` with its own temp dir and ports; returns once it answers."""
    temp = check_temp_dir(temp_dir)
    port = port or free_port(host)
    cmd = [
        ray_executable(), "start", "--head",
        f"--node-ip-address={host}", f"--port={port}", f"--temp-dir={temp}",
        "--disable-usage-stats", f"--include-dashboard={'true' if dashboard else 'false'}",
        *_own_ports(host), *_resources(num_cpus, num_gpus),
    ]  # fmt: skip
    url = ""
    if dashboard:
        dashboard_port = dashboard_port or free_port(host)
        cmd += [f"--dashboard-host={host}", f"--dashboard-port={dashboard_port}"]
        url = f"http://{host}:{dashboard_port}"
    _run_or_stop(cmd, temp, host, timeout_s)
    node = RayNode(address=f"{host}:{port}", dashboard=url, temp_dir=str(temp))
    if dashboard:
        _wait_http(f"{url}/api/version", timeout_s, temp)
    return node


def start_worker(
    address: str,
    temp_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    block: bool = False,
    timeout_s: float = 180.0,
) -> int:
    """Join the cluster at `address`; with block=True, stay in the foreground (for `srun ... &`)."""
    temp = check_temp_dir(temp_dir)
    cmd = [
        ray_executable(), "start", f"--address={address}", f"--node-ip-address={host}",
        f"--temp-dir={temp}", "--disable-usage-stats",
        *_own_ports(host), *_resources(num_cpus, num_gpus),
    ]  # fmt: skip
    if not block:
        _run_or_stop(cmd, temp, host, timeout_s)
        return 0
    cmd.append("--block")
    # A batch system's preemption warning (SIGUSR1) is meant for the training ranks; by default
    # it would end this node and take its retrieval shards down while the ranks checkpoint.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return subprocess.call(cmd, env=node_env(host))


def _run_or_stop(cmd: list[str], temp: Path, host: str, timeout_s: float, attempts: int = 2) -> None:
    """Run `ray start`; on failure stop whatever it left behind, and try again (bounded).

    Ray gives its raylet a fixed 30 s to register with the GCS; on an overloaded machine that
    fails now and then while a second try a moment later goes through.
    """
    what = " ".join(Path(cmd[0]).name.split() + cmd[1:3])
    for attempt in range(1, attempts + 1):
        try:
            proc = subprocess.run(cmd, env=node_env(host), capture_output=True, text=True, timeout=timeout_s)
            error = (
                ""
                if proc.returncode == 0
                else (
                    f"exit status {proc.returncode}:\n"
                    + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                )
            )
        except subprocess.TimeoutExpired:
            error = f"no answer in {timeout_s:.0f}s"
        if not error:
            return
        stop(temp)
        if attempt < attempts:
            print(
                f"ragdist: `{what}` failed ({error.splitlines()[-1]}); trying again",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(2.0)
    raise RagdistError(f"`{what}` failed after {attempts} attempts (temp dir {temp}); {error}")


def _wait_http(url: str, timeout_s: float, temp: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(temp)
            raise RagdistError(f"Ray dashboard {url} did not answer within {timeout_s:.0f}s")
        time.sleep(0.5)


def wait_for_nodes(address: str, nodes: int, timeout_s: float = 300.0) -> int:
    """Block until the cluster at `address` has `nodes` live nodes; returns how many it has."""
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes:
                return alive
            if time.monotonic() > deadline:
                raise RagdistError(
                    f"Ray cluster {address}: {alive} of {nodes} nodes up after {timeout_s:.0f}s"
                )
            time.sleep(1.0)
    finally:
        ray.shutdown()


def _mentions(arg: str, temp: str) -> bool:
    return arg == temp or arg.endswith("=" + temp) or (temp + "/") in arg


def node_processes(temp_dir: str | Path) -> list[int]:
    """PIDs of the node that uses `temp_dir`: its daemons and all their descendants."""
    import psutil

    temp = str(Path(temp_dir))
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid not in me and any(_mentions(a, temp) for a in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found: dict[int, psutil.Process] = {}
    for p in roots:
        found[p.pid] = p
        try:
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            continue
    return sorted(pid for pid in found if pid not in me)


def stop(temp_dir: str | Path, grace_s: float = 5.0) -> list[int]:
    """SIGTERM the node's processes, SIGKILL what is left after `grace_s`; returns the PIDs."""
    import psutil

    pids = node_processes(temp_dir)
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)
    # Daemons started in the meantime by the dying raylet (rare) are caught by a second pass.
    late = [pid for pid in node_processes(temp_dir) if pid not in pids]
    for pid in late:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids + late


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ragdist.launch.ray_head", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a head node; prints shell export lines")
    w = sub.add_parser("worker", help="join a cluster")
    for p in (s, w):
        p.add_argument("--temp-dir", required=True)
        p.add_argument(
            "--host",
            default="127.0.0.1",
            help="this node's IP address (default: loopback; worker: auto = the one that reaches the head)",
        )
        p.add_argument("--num-cpus", type=float, default=None)
        p.add_argument("--num-gpus", type=int, default=None)
        p.add_argument("--timeout", type=float, default=180.0)
    s.add_argument("--port", type=int, default=0, help="GCS port (default: a free one)")
    s.add_argument("--dashboard-port", type=int, default=0)
    s.add_argument("--no-dashboard", action="store_true", help="no dashboard (no `ray job submit` either)")
    w.add_argument("--address", required=True)
    w.add_argument("--block", action="store_true")
    wt = sub.add_parser("wait", help="wait until the cluster has N nodes")
    wt.add_argument("--address", required=True)
    wt.add_argument("--nodes", type=int, required=True)
    wt.add_argument("--timeout", type=float, default=300.0)
    st = sub.add_parser("stop", help="stop the node that uses this temp dir, by PID")
    st.add_argument("--temp-dir", required=True)
    st.add_argument("--grace", type=float, default=5.0)
    fp = sub.add_parser("free-port", help="print a free TCP port")
    fp.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            node = start_head(
                args.temp_dir, host=args.host, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                dashboard=not args.no_dashboard, port=args.port, dashboard_port=args.dashboard_port,
                timeout_s=args.timeout,
            )  # fmt: skip
            print(node.exports(), flush=True)
        elif args.cmd == "worker":
            host = route_ip(args.address) if args.host == "auto" else args.host
            return start_worker(
                args.address, args.temp_dir, host=host, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                block=args.block, timeout_s=args.timeout,
            )  # fmt: skip
        elif args.cmd == "wait":
            n = wait_for_nodes(args.address, args.nodes, args.timeout)
            print(f"ray: {n} nodes up at {args.address}", file=sys.stderr, flush=True)
        elif args.cmd == "stop":
            pids = stop(args.temp_dir, args.grace)
            print(f"ray: stopped {len(pids)} processes of {args.temp_dir}", file=sys.stderr, flush=True)
        elif args.cmd == "free-port":
            print(free_port(args.host), flush=True)
    except RagdistError as e:
        print(f"ragdist: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
