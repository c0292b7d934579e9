"""Running the service: start/stop it, load and promote versions, canary, rollback, streaming updates.

    start_service(snapshot, cfg)                 # once (the recipe does it): the controller + shard actors
    admin = ServiceAdmin(cfg)                    # or RetrievalClient(cfg), which has these verbs too
    admin.load_version(path); admin.set_canary(vid, 0.1); admin.promote(); admin.rollback()
    admin.update(upsert=chunks, vectors=v, delete_ids=["d#0"])   # one atomic epoch on every shard
    stop_service(cfg)

Every verb is one call to the controller, which pushes the change to the shard replicas before it
returns, so any search that starts afterwards, from any client, sees it.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import RetrievalError, cause
from ragdist.index.snapshot import resolve
from ragdist.retrieval.cluster import init_ray
from ragdist.retrieval.config import RetrievalConfig, controller_name, validate_config
from ragdist.retrieval.view import ServiceView, connect

log = logging.getLogger(__name__)

_OWNED: dict[str, Any] = {}


def state_dir_of(snapshot: str | Path, cfg: RetrievalConfig) -> Path:
    """Where the controller keeps its durable state: `retrieval.state_dir`, else beside the snapshots
    (<snapshot root>/_service/<namespace>/<service>), which a multi-node cluster has on shared storage."""
    if cfg.state_dir:
        return Path(cfg.state_dir)
    return resolve(snapshot).parent / "_service" / cfg.namespace / cfg.service_name


def start_service(snapshot: str, cfg: RetrievalConfig) -> Any:
    """Start (or replace) the named service serving `snapshot`; wait until every replica is loaded.

    The controller runs on this process's node while that node lives (soft affinity), and Ray
    restarts it up to `controller_max_restarts` times; calls in flight are retried on the new one.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ragdist.retrieval.server.controller import ServiceController

    validate_config(cfg)
    init_ray(cfg.address or None, num_cpus=cfg.ray_num_cpus, namespace=cfg.namespace,
             connect_timeout_s=cfg.connect_timeout_s)  # fmt: skip
    try:
        state_dir = state_dir_of(snapshot, cfg)
    except Exception as e:
        raise RetrievalError(f"retrieval service failed to load {snapshot}: {cause(e)}") from None
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=state_dir):
            pass
    except OSError as e:
        raise RetrievalError(
            f"the retrieval controller keeps its state in {state_dir}, which is not writable ({e.strerror}): "
            "set retrieval.state_dir to a writable directory every Ray node can reach"
        ) from None
    name = controller_name(cfg.service_name)
    try:
        old = ray.get_actor(name, namespace=cfg.namespace)
        ray.get(old.shutdown.remote(), timeout=cfg.timeout_s)
        ray.kill(old, no_restart=True)
    except ValueError:
        pass  # no previous service of that name
    lifetime = "detached" if cfg.detached else None
    restarts = int(cfg.controller_max_restarts)
    controller = (
        ray.remote(ServiceController)
        .options(
            name=name, namespace=cfg.namespace, num_cpus=0, lifetime=lifetime, max_concurrency=16,
            max_restarts=restarts, max_task_retries=-1 if restarts else 0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        )
        .remote(cfg, str(state_dir), uuid.uuid4().hex)
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        vid = ray.get(controller.load.remote(str(snapshot)))
    except Exception as e:
        ray.kill(controller, no_restart=True)
        raise RetrievalError(f"retrieval service failed to load {snapshot}: {cause(e)}") from None
    # A non-detached actor dies with its last handle: keep one for as long as this process runs.
    _OWNED[cfg.service_name] = controller
    log.info(
        "retrieval service %r: %s up in %.1fs (%d replica(s) per shard)",
        cfg.service_name,
        vid,
        time.perf_counter() - t0,
        cfg.replicas,
    )
    return controller


def stop_service(cfg: RetrievalConfig) -> None:
    import ray

    try:
        ctl = ray.get_actor(controller_name(cfg.service_name), namespace=cfg.namespace)
    except ValueError:
        return
    try:
        ray.get(ctl.shutdown.remote(), timeout=cfg.timeout_s)
    finally:
        ray.kill(ctl, no_restart=True)
        _OWNED.pop(cfg.service_name, None)


class ServiceAdmin:
    """The service's control verbs, on a routing table shared with a retriever (or its own)."""

    def __init__(self, cfg: RetrievalConfig, view: ServiceView | None = None):
        self.cfg = cfg
        self.view = view or ServiceView(connect(cfg), cfg)

    def _call(self, ref: Any, *, refresh: bool = True) -> Any:
        import ray

        try:
            out = ray.get(ref, timeout=max(self.cfg.timeout_s, 120))
        except ray.exceptions.RayError as e:
            raise RetrievalError(cause(e)) from None
        if refresh:  # this client routes by the new topology at once
            self.view.refresh()
        return out

    @property
    def _ctl(self) -> Any:
        return self.view.controller

    def load_version(self, snapshot: str, *, primary: bool = False) -> str:
        """Load another snapshot version beside the current one; returns its version id."""
        return self._call(self._ctl.load.remote(str(snapshot), primary, _rid()))

    def set_canary(self, version: str, fraction: float) -> None:
        self._call(self._ctl.set_canary.remote(version, float(fraction), _rid()))

    def promote(self, version: str | None = None) -> str:
        return self._call(self._ctl.promote.remote(version, _rid()))

    def rollback(self) -> str:
        return self._call(self._ctl.rollback.remote(_rid()))

    def unload(self, version: str) -> None:
        self._call(self._ctl.unload.remote(version, _rid()))

    def compact(self, version: str | None = None, *, promote: bool = True) -> dict[str, Any]:
        """Write the streaming updates into a new snapshot version and (default) serve it instead."""
        return self._call(self._ctl.compact.remote(version, promote, _rid()))

    def versions(self) -> dict[str, Any]:
        self.view.refresh()
        keys = ("snapshot", "dim", "embedder", "num_shards", "count", "epoch")
        return {
            "primary": self.view.primary,
            "canary": self.view.canary,
            "versions": {vid: {k: v.info[k] for k in keys} for vid, v in self.view.versions.items()},
        }

    def upsert(
        self,
        chunks: Sequence[Any],
        vectors: np.ndarray,
        *,
        ts: float | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Add or replace chunks (by chunk id) with their vectors, as one atomic update epoch."""
        return self.update(upsert=chunks, vectors=vectors, ts=ts, version=version)

    def delete(
        self,
        ids: Sequence[str] = (),
        *,
        doc_ids: Sequence[str] = (),
        ts: float | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Delete chunks by id and/or whole documents; honoured by every query that starts afterwards."""
        return self.update(delete_ids=ids, delete_doc_ids=doc_ids, ts=ts, version=version)

    def update(
        self,
        *,
        upsert: Sequence[Any] = (),
        vectors: np.ndarray | None = None,
        delete_ids: Sequence[str] = (),
        delete_doc_ids: Sequence[str] = (),
        ts: float | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Upserts and deletes applied as one epoch: a reader sees all of them or none, on every shard.

        `ts` (default: now) orders writers: a write older than the last write of the same chunk id
        is skipped and reported in the result's `skipped`.
        """
        v = self.view.route(version or self.view.primary)
        rows = [_row(c, i) for i, c in enumerate(upsert)]
        vecs = None
        if rows:
            if vectors is None:
                raise RetrievalError(f"upsert: {len(rows)} chunks but no vectors")
            vecs = np.ascontiguousarray(vectors, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape != (len(rows), v.dim):
                raise RetrievalError(
                    f"upsert: vectors have shape {tuple(vecs.shape)}; expected ({len(rows)}, {v.dim})"
                )
            if not np.isfinite(vecs).all():
                raise RetrievalError("upsert: vectors contain NaN or inf")
        ids = [str(i) for i in delete_ids]
        docs = [str(d) for d in delete_doc_ids]
        # Unpinned: the controller's primary when the update runs (a compaction may have just replaced it).
        ref = self._ctl.update.remote(version, rows, vecs, ids, docs, ts, _rid())
        out = self._call(ref, refresh=False)
        self.view.note(out["version"], self.view.generation, int(out["epoch"]))  # read-your-writes from here on
        return out


def _rid() -> str:
    """A request id: Ray retries a call the controller was serving when it died; the restarted
    controller answers a retried id with the first result instead of acting twice."""
    return uuid.uuid4().hex


def _row(c: Any, i: int) -> dict[str, Any]:
    get = c.get if isinstance(c, dict) else (lambda name, default=None: getattr(c, name, default))
    row = {
        "id": get("id"),
        "doc_id": get("doc_id"),
        "text": get("text", ""),
        "title": get("title", "") or "",
        "source": get("source", "") or "",
        "timestamp": get("timestamp"),
        "meta": get("meta") or {},
    }
    for name in ("id", "doc_id"):
        if not isinstance(row[name], str) or not row[name]:
            raise RetrievalError(f"upsert: chunk {i} has no string {name!r} (got {row[name]!r})")
    if not isinstance(row["text"], str):
        raise RetrievalError(f"upsert: chunk {i} ({row['id']}): text must be a string")
    if not isinstance(row["meta"], dict):
        raise RetrievalError(f"upsert: chunk {i} ({row['id']}): meta must be a dict")
    if row["timestamp"] is not None and not isinstance(row["timestamp"], (int, float)):
        raise RetrievalError(f"upsert: chunk {i} ({row['id']}): timestamp must be a number or None")
    return row
