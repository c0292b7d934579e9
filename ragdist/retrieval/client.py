"""Start the retrieval service on Ray, attach to it, and query it with an exact global top-k merge."""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragdist.errors import RetrievalError
from ragdist.index.snapshot import read_manifest
from ragdist.retrieval.cluster import init_ray
from ragdist.retrieval.shard import ShardServer

log = logging.getLogger(__name__)


@dataclass
class RetrievalConfig:
    top_k: int = 3
    address: str = ""  # Ray cluster to attach to; "" = $RAY_ADDRESS, else a new loopback cluster
    namespace: str = "ragdist"
    service_name: str = "default"
    actor_num_cpus: float = 0.25  # Ray's share per shard actor (the training ranks are not counted by Ray)
    threads_per_shard: int = 1  # FAISS OpenMP threads in each shard actor
    timeout_s: float = 60.0  # per call, for all shards together
    cache_size: int = 50_000  # LRU entries keyed by (query, encoder, index version, k); 0 = off
    detached: bool = False  # keep the service alive after the process that started it exits
    ray_num_cpus: int | None = None  # CPUs of a cluster we start (default: all cores)


_OWNED: dict[str, Any] = {}


def controller_name(service: str) -> str:
    return f"ragdist-service:{service}"


class ServiceController:
    """Holds the service's topology: which snapshot version, which actor serves which shard."""

    def __init__(self, snapshot: str, version: str, dim: int, shards: list[Any]):
        self.state = {"snapshot": snapshot, "version": version, "dim": dim, "shards": shards}

    def topology(self) -> dict[str, Any]:
        return self.state

    def shutdown(self) -> None:
        import ray

        for handle in self.state["shards"]:
            ray.kill(handle, no_restart=True)


def start_service(snapshot: str, cfg: RetrievalConfig) -> Any:
    """Create one actor per shard of `snapshot` and a named controller; wait until all are loaded."""
    import ray

    init_ray(cfg.address or None, num_cpus=cfg.ray_num_cpus, namespace=cfg.namespace)
    manifest = read_manifest(snapshot)
    name = controller_name(cfg.service_name)
    try:
        old = ray.get_actor(name, namespace=cfg.namespace)
        ray.get(old.shutdown.remote(), timeout=cfg.timeout_s)
        ray.kill(old, no_restart=True)
    except ValueError:
        pass  # no previous service of that name
    lifetime = "detached" if cfg.detached else None
    Shard = ray.remote(ShardServer)
    shards = [
        Shard.options(num_cpus=cfg.actor_num_cpus, max_restarts=-1, lifetime=lifetime).remote(
            str(snapshot), s, threads=cfg.threads_per_shard
        )
        for s in range(manifest["num_shards"])
    ]
    t0 = time.perf_counter()
    try:
        ray.get([s.ping.remote() for s in shards], timeout=max(cfg.timeout_s, 120))
    except Exception as e:
        for s in shards:
            ray.kill(s, no_restart=True)
        raise RetrievalError(f"retrieval service failed to load {snapshot}: {_cause(e)}") from None
    controller = (
        ray.remote(ServiceController)
        .options(name=name, namespace=cfg.namespace, num_cpus=0, lifetime=lifetime)
        .remote(str(snapshot), manifest["version"], int(manifest["dim"]), shards)
    )
    ray.get(controller.topology.remote())
    # A non-detached actor dies with its last handle: keep one for as long as this process runs.
    _OWNED[cfg.service_name] = controller
    log.info("retrieval service %r: %d shards of %s up in %.1fs", cfg.service_name, len(shards),
             manifest["version"], time.perf_counter() - t0)
    return controller


def stop_service(cfg: RetrievalConfig) -> None:
    import ray

    try:
        ctl = ray.get_actor(controller_name(cfg.service_name), namespace=cfg.namespace)
    except ValueError:
        return
    ray.get(ctl.shutdown.remote(), timeout=cfg.timeout_s)
    ray.kill(ctl, no_restart=True)
    _OWNED.pop(cfg.service_name, None)


def _cause(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    useful = [m for m in msg if "Error" in m] or msg
    return useful[-1] if useful else type(e).__name__


def normalize_query(q: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", q)).strip().lower()


@dataclass
class SearchResult:
    scores: np.ndarray  # (nq, k) float32, best first
    ids: np.ndarray  # (nq, k) int64 global row ids, -1 where fewer than k exist
    passages: list[list[dict[str, Any]]]  # per query, the passages in rank order


class RetrievalClient:
    """Fans each query batch out to every shard and merges the exact global top-k."""

    def __init__(self, cfg: RetrievalConfig, embedder: Any | None = None):
        import ray

        self.cfg = cfg
        init_ray(cfg.address or None, num_cpus=cfg.ray_num_cpus, namespace=cfg.namespace)
        try:
            self.controller = ray.get_actor(controller_name(cfg.service_name), namespace=cfg.namespace)
        except ValueError:
            raise RetrievalError(
                f"no retrieval service named {cfg.service_name!r} in Ray namespace {cfg.namespace!r}"
            ) from None
        self.embedder = embedder
        self._cache: OrderedDict[tuple, list[dict[str, Any]]] = OrderedDict()
        self.stats = {"calls": 0, "queries": 0, "cache_hits": 0, "latency_s": []}
        self.refresh()

    def refresh(self) -> None:
        import ray

        topo = ray.get(self.controller.topology.remote(), timeout=self.cfg.timeout_s)
        self.version, self.dim, self.shards = topo["version"], topo["dim"], topo["shards"]

    def search(self, vectors: np.ndarray, k: int) -> SearchResult:
        import faiss
        import ray

        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RetrievalError(f"query vectors have shape {tuple(q.shape)}; the index has dim {self.dim}")
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise RetrievalError(f"k={k!r}: must be a positive integer")
        if not np.isfinite(q).all():
            raise RetrievalError("query vectors contain NaN or inf")
        t0 = time.perf_counter()
        ref = ray.put(q)
        refs = [s.search.remote(ref, int(k)) for s in self.shards]
        try:
            parts = ray.get(refs, timeout=self.cfg.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RetrievalError(f"retrieval timed out after {self.cfg.timeout_s}s") from None
        except ray.exceptions.RayError as e:
            raise RetrievalError(f"retrieval failed: {_cause(e)}") from None
        heap = faiss.ResultHeap(len(q), int(k), keep_max=True)
        by_gid: dict[int, dict[str, Any]] = {}
        for D, G, rows in parts:
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(G, dtype=np.int64))
            for grow, prow in zip(G, rows):
                for g, p in zip((g for g in grow if g >= 0), prow):
                    by_gid[int(g)] = p
        heap.finalize()
        ids = heap.I.copy()
        passages = [[by_gid[int(g)] for g in row if g >= 0] for row in ids]
        self.stats["calls"] += 1
        self.stats["queries"] += len(q)
        self.stats["latency_s"].append(time.perf_counter() - t0)
        return SearchResult(heap.D.copy(), ids, passages)

    def retrieve(self, questions: list[str], k: int) -> list[list[dict[str, Any]]]:
        """Text in, passages out; cached by (normalized query, encoder, index version, k)."""
        if self.embedder is None:
            raise RetrievalError("this client has no query embedder; pass one or call search() with vectors")
        keys = [(normalize_query(q), self.embedder.name, self.version, k) for q in questions]
        out: list[list[dict[str, Any]] | None] = [None] * len(questions)
        missing = []
        for i, key in enumerate(keys):
            hit = self._cache.get(key) if self.cfg.cache_size else None
            if hit is not None:
                self._cache.move_to_end(key)
                out[i] = hit
                self.stats["cache_hits"] += 1
            else:
                missing.append(i)
        if missing:
            vecs = self.embedder.encode([questions[i] for i in missing])
            res = self.search(vecs, k)
            for i, ps in zip(missing, res.passages):
                out[i] = ps
                if self.cfg.cache_size:
                    self._cache[keys[i]] = ps
                    if len(self._cache) > self.cfg.cache_size:
                        self._cache.popitem(last=False)
        return out  # type: ignore[return-value]
