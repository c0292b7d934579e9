"""The client's routing table: loaded index versions, primary and canary, and the update epochs read.

One controller round trip builds it; after that it is refreshed (one more) only when it is out of
date, which the service tells it for free: every shard answer carries the service's topology
generation and the epoch it answered at, so a search that meets a newer generation, or a version
that is gone (its shards no longer answer), refreshes once. Nothing changed: no controller call.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragdist.errors import RetrievalError, cause
from ragdist.retrieval.cluster import init_ray
from ragdist.retrieval.config import RetrievalConfig, controller_name
from ragdist.retrieval.transport import Replica


def connect(cfg: RetrievalConfig) -> Any:
    """The service's controller handle (attaching to Ray, or starting a loopback cluster, first).

    Fails within `cfg.connect_timeout_s` with an error naming the cluster address."""
    import ray

    address = init_ray(
        cfg.address or None, num_cpus=cfg.ray_num_cpus, namespace=cfg.namespace,
        connect_timeout_s=cfg.connect_timeout_s,
    )  # fmt: skip
    try:
        return ray.get_actor(controller_name(cfg.service_name), namespace=cfg.namespace)
    except ValueError:
        raise RetrievalError(
            f"no retrieval service named {cfg.service_name!r} in Ray namespace {cfg.namespace!r} "
            f"of the cluster at {address}"
        ) from None


@dataclass
class VersionRoute:
    """One loaded index version as the client routes to it."""

    vid: str
    dim: int
    count: int
    metric: str
    embedder: str
    num_shards: int
    replicas: list[list[Replica]]  # [shard][replica]
    info: dict[str, Any] = field(default_factory=dict, repr=False)  # the controller's own view of it


class ServiceView:
    def __init__(self, controller: Any, cfg: RetrievalConfig):
        self.controller = controller
        self.cfg = cfg
        self.generation = -1
        self.primary = ""
        self.canary: tuple[str, float] | None = None
        self.versions: dict[str, VersionRoute] = {}
        self.controller_calls = 0  # round trips this view made to the controller
        self.confirmed = 0.0  # when a shard answer or a refresh last showed this view current
        self._epochs: dict[str, int] = {}
        self._replicas: dict[str, Replica] = {}
        self._lock = threading.Lock()
        self._rng = np.random.default_rng()
        self.refresh()

    # ------------------------------------------------------------------ the controller round trip
    def refresh(self) -> None:
        import ray

        try:
            topo = ray.get(self.controller.topology.remote(), timeout=self.cfg.timeout_s)
        except ray.exceptions.RayError as e:
            where = ray.get_runtime_context().gcs_address if ray.is_initialized() else "?"
            raise RetrievalError(
                f"retrieval service {self.cfg.service_name!r} (Ray cluster at {where}): controller "
                f"unreachable within {self.cfg.timeout_s:g}s ({cause(e)})"
            ) from None
        self._apply(topo)

    def _apply(self, topo: dict[str, Any]) -> None:
        with self._lock:
            self.controller_calls += 1
            if not topo["primary"]:
                raise RetrievalError(f"retrieval service {self.cfg.service_name!r} serves no index version")
            replicas: dict[str, Replica] = {}
            versions = {}
            for vid, v in topo["versions"].items():
                reps = []
                for s, handles in enumerate(v["replicas"]):
                    row = []
                    for h in handles:
                        key = h._actor_id.hex()
                        rep = replicas[key] = self._replicas.get(key) or Replica(h, key, s)
                        row.append(rep)
                    reps.append(row)
                versions[vid] = VersionRoute(
                    vid,
                    int(v["dim"]),
                    int(v["count"]),
                    v.get("metric", "ip"),
                    str(v.get("embedder", "")),
                    int(v["num_shards"]),
                    reps,
                    v,
                )
                self._epochs[vid] = max(self._epochs.get(vid, 0), int(v["epoch"]))
            self._replicas = replicas
            self.versions = versions
            self.primary = topo["primary"]
            self.canary = tuple(topo["canary"]) if topo["canary"] else None
            self.generation = int(topo["generation"])
            self.confirmed = time.perf_counter()

    # ------------------------------------------------------------------ what shards tell us
    def epoch(self, vid: str) -> int:
        """The newest update epoch of `vid` this client has read (it never reads older)."""
        return self._epochs.get(vid, 0)

    def note(self, vid: str, generation: int, epoch: int | None = None) -> bool:
        """Record a shard's answer; True when it shows the routing table is out of date."""
        with self._lock:
            if epoch is not None:
                self._epochs[vid] = max(self._epochs.get(vid, 0), int(epoch))
            stale = int(generation) > self.generation
            if not stale:
                self.confirmed = time.perf_counter()
            return stale

    def routable(self, vid: str) -> bool:
        """Would an unpinned call still go to `vid`?"""
        return vid == self.primary or (self.canary is not None and self.canary[0] == vid)

    # ------------------------------------------------------------------ routing
    def route(self, version: str | None = None, text: str | None = None) -> VersionRoute:
        """The version a call goes to: `version` if pinned, else the primary or (by share) the canary.

        With `text`, the canary choice is sticky per query text, so that a question always meets
        the same version while a canary runs; without it, each call draws."""
        if version is None:
            vid = self.primary
            if self.canary is not None:
                draw = zlib.crc32(text.encode()) / 2**32 if text is not None else self._rng.random()
                if draw < self.canary[1]:
                    vid = self.canary[0]
        else:
            vid = version
            if vid not in self.versions:
                self.refresh()  # loaded since this view was built?
        v = self.versions.get(vid)
        if v is None:
            raise RetrievalError(f"unknown index version {vid!r}; loaded: {sorted(self.versions)}")
        return v
