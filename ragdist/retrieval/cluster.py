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
import sys

from ragdist.errors import ConfigError

log = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_possible() -> bool:
    """Set the variable if ray is not imported yet; else whether ray read it as we need (read only)."""
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is None:
        os.environ[LOOPBACK_ENV] = "0"
        return True
    return not getattr(consts, "ENABLE_RAY_CLUSTER", True)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, namespace: str = "ragdist") -> str:
    """Attach to `address` (or $RAY_ADDRESS) or start a local loopback cluster; return the GCS address.

    The address of a cluster started here is exported as RAY_ADDRESS so that processes we spawn
    (training ranks) attach to it instead of each starting a cluster of its own.
    """
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
        ray.init(address=address, namespace=namespace, log_to_driver=False)
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
