"""Starting or attaching to Ray. A cluster we start binds to loopback only."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# Ray reads this once, at import: unset, it resolves "127.0.0.1" to the machine's routable address
# and binds the GCS and the workers there. Forcing it off keeps a local cluster on loopback.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _force_loopback() -> None:
    os.environ[_LOOPBACK_ENV] = "0"
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is not None and getattr(consts, "ENABLE_RAY_CLUSTER", False):
        # Ray was imported before us with the variable unset; the constant is read at call time.
        consts.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, *, num_cpus: int | None = None, namespace: str = "ragdist") -> str:
    """Attach to `address` (or $RAY_ADDRESS) or start a local loopback cluster; return the GCS address.

    The address of a cluster started here is exported as RAY_ADDRESS so that processes we spawn
    (training ranks) attach to it instead of each starting a cluster of its own.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        _force_loopback()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:
        # A local cluster on loopback: nothing outside the machine can reach it, so the token
        # handshake only gets in the way of the processes we spawn.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            # "local": a new cluster even when another one (`ray start`, another user's) runs on this
            # machine; without it Ray attaches to the newest one it finds under /tmp/ray.
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
