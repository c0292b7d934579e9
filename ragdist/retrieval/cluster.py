"""Starting or attaching to Ray. A cluster we start binds to loopback only.

Ray has one supported switch for that: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in the environment when
`ray` is first imported. Without it, Ray 2.60 resolves "127.0.0.1" (from `_node_ip_address`, or
`ray start --node-ip-address`) to the host's routable address and its GCS, raylet and workers listen
on every interface; neither `ray.init` nor `ray start` has an option that changes that. So the
variable is set here before importing ray (`ragdist/__init__.py` sets it too), and a loopback
cluster is refused, not started, when ray was imported earlier without it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from ragdist.errors import ConfigError, RetrievalError

log = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
_hung: list[str] = []  # addresses whose ray.init is still blocked in a background thread


def _loopback_possible() -> bool:
    """Set the variable if ray is not imported yet; else whether ray read it as we need (read only)."""
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is None:
        os.environ[LOOPBACK_ENV] = "0"
        return True
    return not getattr(consts, "ENABLE_RAY_CLUSTER", True)


def _probe(address: str, source: str, timeout_s: float) -> None:
    """A TCP connect to a host:port address: refused or unroutable fails here, in seconds, by name."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # ray://, auto, …: left to ray.init (still under the deadline)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        if isinstance(e, TimeoutError):
            reason = f"no answer within {timeout_s:g}s (retrieval.connect_timeout_s)"
        else:
            reason = str(e.strerror or e).lower()
        raise RetrievalError(
            f"cannot reach the Ray cluster at {address} ({source}): {reason}; is the cluster up and the address right?"
        ) from None


class _NoThreadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _attach(address: str, source: str, namespace: str, timeout_s: float) -> None:
    """`ray.init(address=...)` bounded by `timeout_s`: Ray itself retries an unanswering GCS for minutes.

    The call runs in a daemon thread so that a hang can be abandoned; the driver SIGTERM handler Ray
    installs only from the main thread (exit, so that shutdown hooks run) is installed here instead.
    """
    import ray

    if address in _hung:
        raise RetrievalError(f"an earlier attach to the Ray cluster at {address} ({source}) is still hanging")
    t0 = time.monotonic()
    _probe(address, source, timeout_s)
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    quiet = _NoThreadWarning()
    ray_log = logging.getLogger("ray._private.worker")
    ray_log.addFilter(quiet)
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        th = threading.Thread(target=run, name="ray-attach", daemon=True)
        th.start()
        th.join(max(0.1, timeout_s - (time.monotonic() - t0)))
    finally:
        ray_log.removeFilter(quiet)
    if th.is_alive():
        _hung.append(address)
        raise RetrievalError(
            f"cannot attach to the Ray cluster at {address} ({source}): no answer within {timeout_s:g}s "
            "(retrieval.connect_timeout_s); is it a Ray GCS address (head:6379)?"
        )
    if "error" in box:
        e = box["error"]
        raise RetrievalError(f"cannot attach to the Ray cluster at {address} ({source}): {e}") from None


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    namespace: str = "ragdist",
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> str:
    """Attach to `address` (or $RAY_ADDRESS) or start a local loopback cluster; return the GCS address.

    Attaching fails within `connect_timeout_s` with a `RetrievalError` naming the address. The
    address of a cluster started here is exported as RAY_ADDRESS so that processes we spawn
    (training ranks) attach to it instead of each starting a cluster of its own.
    """
    source = "retrieval.address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address and not _loopback_possible():
        import ray

        if not ray.is_initialized():
            raise ConfigError(
                f"ray was imported before ragdist with {LOOPBACK_ENV} unset, so a local cluster would listen "
                f"on every interface: export {LOOPBACK_ENV}=0 (or import ragdist first), or set "
                "retrieval.address / $RAY_ADDRESS to a running cluster"
            )
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    if address:
        _attach(address, source, namespace, connect_timeout_s)
    else:
        # A local cluster on loopback: nothing outside the machine can reach it, so the token
        # handshake only gets in the way of the processes we spawn.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            # "local": always a new cluster of our own, never one that another `ray start` on this
            # machine registered as the current one (a bare init would silently join it)
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            namespace=namespace,
            log_to_driver=False,
            configure_logging=False,
        )
    gcs = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = gcs
    log.info("ray: %s (%s)", gcs, "attached" if address else "started on loopback")
    return gcs
