"""The service's control plane: a named controller actor that owns the shard replicas.

It holds, per loaded index version, `replicas` actors for every shard (Ray restarts a dead one,
which reloads its shard from the snapshot and replays the version's update log from here), which
version is primary, which is the canary and with what fraction of traffic, and the log of
streaming updates. Clients read the topology once and then talk to shard actors directly; a
cheap `state()` call tells them when the topology (generation) or the data (epoch) changed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ragdist.errors import RetrievalError
from ragdist.index.builder import shard_of_doc
from ragdist.index.snapshot import read_manifest, resolve
from ragdist.retrieval.cluster import init_ray
from ragdist.retrieval.shard import ShardServer

if TYPE_CHECKING:
    from ragdist.retrieval.client import RetrievalConfig

log = logging.getLogger(__name__)

_OWNED: dict[str, Any] = {}


def controller_name(service: str) -> str:
    return f"ragdist-service:{service}"


def cause(e: BaseException) -> str:
    """The useful line of a (possibly remote) exception."""
    msg = [m.strip() for m in str(e).strip().splitlines() if m.strip()]
    useful = [m for m in msg if "Error" in m and "Traceback" not in m] or msg
    return useful[-1] if useful else type(e).__name__


@dataclass
class Version:
    vid: str
    snapshot: str
    dim: int
    metric: str
    embedder: str
    num_shards: int
    count: int
    next_gid: int
    replicas: list[list[Any]]  # [shard][replica] actor handles
    epoch: int = 0
    log: list[tuple[int, dict[int, dict[str, Any]]]] = field(default_factory=list)
    written: dict[str, float] = field(default_factory=dict)  # chunk id -> timestamp of its last write

    def view(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "dim": self.dim,
            "metric": self.metric,
            "embedder": self.embedder,
            "num_shards": self.num_shards,
            "count": self.count,
            "epoch": self.epoch,
            "replicas": self.replicas,
        }


class ServiceController:
    """Runs as a threaded Ray actor: shard replicas call back into it (update log) while it waits on them."""

    def __init__(self, cfg: RetrievalConfig):
        self.cfg = cfg
        self.versions: dict[str, Version] = {}
        self.primary = ""
        self.canary: tuple[str, float] | None = None
        self.previous = ""  # the primary before the last promote, kept for rollback
        self.generation = 0
        self._lock = threading.RLock()  # topology
        self._update = threading.Lock()  # one update at a time, in epoch order
        self._log = threading.Lock()  # log reads never wait for an update in flight

    # ------------------------------------------------------------------ versions
    def load(self, snapshot: str, make_primary: bool | None = None) -> str:
        """Start every replica of every shard of `snapshot`; return its version id.

        A version that fails to load (a corrupted file, a bad manifest) is torn down and the
        error raised; whatever was serving keeps serving.
        """
        import ray

        try:
            path = resolve(snapshot)
            manifest = read_manifest(path)
        except Exception as e:
            raise RetrievalError(f"cannot load {snapshot}: {cause(e)}") from None
        vid = manifest["version"]
        with self._lock:
            if vid in self.versions:
                raise RetrievalError(f"version {vid} is already loaded in service {self.cfg.service_name!r}")
        replicas = self._start_replicas(str(path), manifest, vid)
        flat = [h for shard in replicas for h in shard]
        try:
            ray.get([h.ping.remote() for h in flat], timeout=max(self.cfg.timeout_s, 120))
        except Exception as e:
            for h in flat:
                ray.kill(h, no_restart=True)
            keep = f"; still serving {self.primary}" if self.primary else ""
            raise RetrievalError(f"version {vid} failed to load from {path}: {cause(e)}{keep}") from None
        v = Version(
            vid=vid,
            snapshot=str(path),
            dim=int(manifest["dim"]),
            metric=manifest.get("metric", "ip"),
            embedder=str(manifest.get("embedder", "")),
            num_shards=int(manifest["num_shards"]),
            count=int(sum(s["count"] for s in manifest["shards"])),
            next_gid=int(manifest.get("next_gid", manifest.get("num_chunks", 0))),
            replicas=replicas,
        )
        with self._lock:
            self.versions[vid] = v
            if make_primary or (make_primary is None and not self.primary):
                self.primary = vid
            self.generation += 1
        return vid

    def _start_replicas(self, path: str, manifest: dict[str, Any], vid: str) -> list[list[Any]]:
        import ray

        cfg = self.cfg
        n_rep = max(1, int(cfg.replicas))
        gpus = ray.cluster_resources().get("GPU", 0) if cfg.device in ("auto", "gpu") else 0
        if cfg.device == "gpu" and not gpus:
            raise RetrievalError("retrieval.device=gpu but the Ray cluster has no GPU")
        me = ray.get_runtime_context().current_actor
        Shard = ray.remote(ShardServer)
        lifetime = "detached" if cfg.detached else None
        out = []
        for s in range(int(manifest["num_shards"])):
            reps = []
            for _ in range(n_rep):
                opts: dict[str, Any] = dict(
                    num_cpus=cfg.actor_num_cpus,
                    max_restarts=cfg.max_restarts,
                    max_task_retries=0,  # the client retries on another replica instead
                    lifetime=lifetime,
                    scheduling_strategy="SPREAD",  # replicas of a shard on distinct nodes when there are several
                )
                if gpus:
                    opts["num_gpus"] = 1.0 / max(1, cfg.shards_per_gpu)
                reps.append(
                    Shard.options(**opts).remote(
                        path,
                        s,
                        nprobe=cfg.nprobe,
                        efsearch=cfg.efsearch,
                        threads=cfg.threads_per_shard,
                        flat_backend=cfg.flat_backend,
                        flat_dtype=cfg.flat_dtype,
                        device="gpu" if gpus else "cpu",
                        lexical=cfg.mode != "dense" or cfg.hybrid.enabled,  # BM25 built at load
                        controller=me,
                        version_id=vid,
                    )
                )
            out.append(reps)
        return out

    def _known(self, vid: str) -> Version:
        v = self.versions.get(vid)
        if v is None:
            raise RetrievalError(f"unknown index version {vid!r}; loaded: {sorted(self.versions)}")
        return v

    def set_canary(self, vid: str, fraction: float) -> None:
        with self._lock:
            self._known(vid)
            if vid == self.primary:
                raise RetrievalError(f"version {vid} is the primary; a canary must be another loaded version")
            if not 0.0 <= float(fraction) <= 1.0:
                raise RetrievalError(f"canary fraction {fraction!r} must be within [0, 1]")
            self.canary = (vid, float(fraction))
            self.generation += 1

    def promote(self, vid: str | None = None) -> str:
        """Make `vid` (default: the canary) the primary in one step; the old primary is kept for rollback."""
        retired = []
        with self._lock:
            if vid is None:
                if self.canary is None:
                    raise RetrievalError("no canary to promote; name a version")
                vid = self.canary[0]
            self._known(vid)
            if vid == self.primary:
                return vid
            if self.previous and self.previous not in (vid, self.primary):
                retired.append(self.previous)
            self.previous, self.primary = self.primary, vid
            if self.canary is not None and self.canary[0] == vid:
                self.canary = None
            if not self.cfg.keep_previous:
                retired.append(self.previous)
                self.previous = ""
            self.generation += 1
            gone = [self.versions.pop(r) for r in retired if r in self.versions]
        self._kill(gone)
        return vid

    def rollback(self) -> str:
        """Drop the canary if there is one, else return to the primary before the last promote."""
        with self._lock:
            if self.canary is not None:
                gone = [self.versions.pop(self.canary[0])]
                self.canary = None
            elif self.previous:
                gone = [self.versions.pop(self.primary)]
                self.primary, self.previous = self.previous, ""
            else:
                raise RetrievalError("nothing to roll back: no canary and no previous primary")
            self.generation += 1
        self._kill(gone)
        return self.primary

    def unload(self, vid: str) -> None:
        with self._lock:
            self._known(vid)
            if vid == self.primary:
                raise RetrievalError(f"version {vid} is the primary; promote another version first")
            if self.canary is not None and self.canary[0] == vid:
                self.canary = None
            if self.previous == vid:
                self.previous = ""
            gone = [self.versions.pop(vid)]
            self.generation += 1
        self._kill(gone)

    @staticmethod
    def _kill(versions: list[Version]) -> None:
        import ray

        for v in versions:
            for shard in v.replicas:
                for h in shard:
                    ray.kill(h, no_restart=True)

    # ------------------------------------------------------------------ reads
    def topology(self) -> dict[str, Any]:
        with self._lock:
            p = self.versions.get(self.primary)
            return {
                "generation": self.generation,
                "primary": self.primary,
                "canary": self.canary,
                "previous": self.previous,
                "versions": {vid: v.view() for vid, v in self.versions.items()},
                # the single-version view older clients read
                "snapshot": p.snapshot if p else "",
                "version": self.primary,
                "dim": p.dim if p else 0,
                "shards": [reps[0] for reps in p.replicas] if p else [],
            }

    def state(self) -> tuple[int, dict[str, int]]:
        """(generation, epoch per version): what a client checks before trusting its cache."""
        with self._lock:
            return self.generation, {vid: v.epoch for vid, v in self.versions.items()}

    def log_since(self, vid: str, shard: int, after: int) -> list[tuple[int, dict[str, Any]]]:
        with self._log:
            v = self.versions.get(vid)
            if v is None:
                return []
            return [(e, ops.get(shard, {})) for e, ops in v.log if e > after]

    def replica_info(self) -> list[dict[str, Any]]:
        import ray

        with self._lock:
            handles = [(vid, s, r, h) for vid, v in self.versions.items()
                       for s, reps in enumerate(v.replicas) for r, h in enumerate(reps)]
        out = []
        for vid, s, r, h in handles:
            try:
                info = ray.get(h.info.remote(), timeout=5)
                info.update(alive=True)
            except Exception as e:
                info = {"shard": s, "alive": False, "error": cause(e)}
            info.update(version_id=vid, replica=r)
            out.append(info)
        return out

    # ------------------------------------------------------------------ updates
    def update(
        self,
        vid: str | None,
        rows: list[dict[str, Any]],
        vectors: np.ndarray | None,
        delete_ids: list[str],
        delete_doc_ids: list[str],
        ts: float | None,
    ) -> dict[str, Any]:
        """Upsert `rows` (with `vectors`) and delete ids/documents as one new epoch of version `vid`.

        A write older (by `ts`) than the last write of the same chunk id is skipped, so replayed or
        reordered writers cannot resurrect stale text. Returns once every live replica applied it.
        """
        import ray

        ts = time.time() if ts is None else float(ts)
        with self._update:
            with self._lock:
                v = self._known(vid or self.primary)
            ids = [r["id"] for r in rows]
            fresh = [v.written.get(cid, -np.inf) <= ts for cid in ids]
            keep = [i for i, ok in enumerate(fresh) if ok]
            skipped = [cid for cid, ok in zip(ids, fresh) if not ok]
            dels = [d for d in delete_ids if v.written.get(d, -np.inf) <= ts]
            skipped += [d for d in delete_ids if v.written.get(d, -np.inf) > ts]
            rows = [rows[i] for i in keep]
            vecs = np.zeros((0, v.dim), np.float32) if vectors is None else np.asarray(vectors, np.float32)[keep]
            gids = np.arange(v.next_gid, v.next_gid + len(rows), dtype=np.int64)
            epoch = v.epoch + 1
            ops: dict[int, dict[str, Any]] = {}
            # An upserted id may live in any shard (contiguous sharding, or an earlier version of the
            # document): every shard drops it, then its owner by document hash adds the new row.
            gone = sorted(set(dels) | {r["id"] for r in rows})
            owner = np.array([shard_of_doc(r["doc_id"], v.num_shards) for r in rows], np.int64)
            for s in range(v.num_shards):
                mine = np.flatnonzero(owner == s)
                ops[s] = {
                    "delete_ids": gone,
                    "delete_doc_ids": list(delete_doc_ids),
                    "add": {"gids": gids[mine], "vectors": vecs[mine], "rows": [rows[i] for i in mine]},
                }
            with self._log:
                v.log.append((epoch, ops))
            refs = [(h, h.apply.remote(epoch, ops[s])) for s, reps in enumerate(v.replicas) for h in reps]
            lagging = 0
            for _h, ref in refs:
                try:
                    ray.get(ref, timeout=self.cfg.timeout_s)
                except Exception as e:  # a dead replica replays the log when Ray restarts it
                    lagging += 1
                    log.warning("update epoch %d: a replica did not apply it now (%s)", epoch, cause(e))
            for cid in ids:
                v.written[cid] = max(v.written.get(cid, -np.inf), ts)
            for d in dels:
                v.written[d] = max(v.written.get(d, -np.inf), ts)
            v.next_gid += len(rows)
            with self._lock:
                v.epoch = epoch
            return {"version": v.vid, "epoch": epoch, "upserted": len(rows), "deleted": len(dels),
                    "skipped": skipped, "lagging_replicas": lagging}

    def compact(self, vid: str | None = None, promote: bool = True) -> dict[str, Any]:
        """Fold the version's update log into a new snapshot on disk, load it and (default) promote it.

        Updates wait meanwhile (none may land between the fold and the swap); queries do not.
        The new version starts at epoch 0 with an empty log, so restarts replay nothing.
        """
        from ragdist.index.reshard import fold_updates

        with self._update:
            with self._lock:
                v = self._known(vid or self.primary)
                was_primary = v.vid == self.primary
            updates = []
            for _, ops in v.log:
                first = ops.get(0, {})
                adds = [o.get("add") or {} for o in ops.values()]
                updates.append({
                    "delete_ids": first.get("delete_ids", []),
                    "delete_doc_ids": first.get("delete_doc_ids", []),
                    "add": {
                        "gids": np.concatenate([a["gids"] for a in adds if len(a.get("gids", ()))] or [np.zeros(0, np.int64)]),
                        "vectors": np.concatenate([a["vectors"] for a in adds if len(a.get("gids", ()))]
                                                  or [np.zeros((0, v.dim), np.float32)]),
                        "rows": [r for a in adds for r in a.get("rows", [])],
                    },
                })
            path = fold_updates(v.snapshot, updates, next_gid=v.next_gid)
            new = self.load(str(path), make_primary=False)
            with self._lock:
                self.versions[new].written = dict(v.written)
            if promote and was_primary:
                self.promote(new)
            return {"snapshot": str(path), "version": new, "folded_epochs": v.epoch, "promoted": promote and was_primary}

    def shutdown(self) -> None:
        with self._lock:
            gone = list(self.versions.values())
            self.versions.clear()
            self.primary, self.canary, self.previous = "", None, ""
            self.generation += 1
        self._kill(gone)


def start_service(snapshot: str, cfg: RetrievalConfig) -> Any:
    """Start (or replace) the named service serving `snapshot`; wait until every replica is loaded."""
    import ray

    init_ray(cfg.address or None, num_cpus=cfg.ray_num_cpus, namespace=cfg.namespace)
    validate_config(cfg)
    name = controller_name(cfg.service_name)
    try:
        old = ray.get_actor(name, namespace=cfg.namespace)
        ray.get(old.shutdown.remote(), timeout=cfg.timeout_s)
        ray.kill(old, no_restart=True)
    except ValueError:
        pass  # no previous service of that name
    lifetime = "detached" if cfg.detached else None
    controller = (
        ray.remote(ServiceController)
        .options(name=name, namespace=cfg.namespace, num_cpus=0, lifetime=lifetime, max_concurrency=16)
        .remote(cfg)
    )
    t0 = time.perf_counter()
    try:
        vid = ray.get(controller.load.remote(str(snapshot)))
    except Exception as e:
        ray.kill(controller, no_restart=True)
        raise RetrievalError(f"retrieval service failed to load {snapshot}: {cause(e)}") from None
    # A non-detached actor dies with its last handle: keep one for as long as this process runs.
    _OWNED[cfg.service_name] = controller
    log.info("retrieval service %r: %s up in %.1fs (%d replica(s) per shard)", cfg.service_name, vid,
             time.perf_counter() - t0, cfg.replicas)
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


def validate_config(cfg: RetrievalConfig) -> None:
    from ragdist.errors import ConfigError
    from ragdist.retrieval.client import retrieval_mode

    retrieval_mode(cfg)  # raises on an unknown mode or one that contradicts hybrid.enabled
    a = cfg.auto
    checks = [
        (0 < a.holdout < 1, f"retrieval.auto.holdout={a.holdout}: must be between 0 and 1"),
        (a.questions >= 2 and a.batch_size >= 1 and a.k >= 0,
         "retrieval.auto.questions must be >= 2, batch_size >= 1 and k >= 0"),
        (bool(a.lexical_weights) and all(w > 0 for w in a.lexical_weights),
         f"retrieval.auto.lexical_weights={list(a.lexical_weights)}: one or more weights > 0"),
        (bool(a.rrf_ks) and all(r > 0 for r in a.rrf_ks), f"retrieval.auto.rrf_ks={list(a.rrf_ks)}: one or more, > 0"),
        (cfg.replicas >= 1, f"retrieval.replicas={cfg.replicas}: must be >= 1"),
        (cfg.on_shard_down in ("raise", "partial"), f"retrieval.on_shard_down={cfg.on_shard_down!r}: raise | partial"),
        (cfg.flat_backend in ("auto", "faiss", "torch"), f"retrieval.flat_backend={cfg.flat_backend!r}: auto | faiss | torch"),
        (cfg.flat_dtype in ("fp32", "bf16"), f"retrieval.flat_dtype={cfg.flat_dtype!r}: fp32 | bf16"),
        (cfg.device in ("auto", "cpu", "gpu"), f"retrieval.device={cfg.device!r}: auto | cpu | gpu"),
        (cfg.shards_per_gpu >= 1, f"retrieval.shards_per_gpu={cfg.shards_per_gpu}: must be >= 1"),
        (cfg.timeout_s > 0 and cfg.attempt_timeout_s > 0, "retrieval.timeout_s and attempt_timeout_s must be > 0"),
        (cfg.k_beyond_corpus in ("pad", "error"), f"retrieval.k_beyond_corpus={cfg.k_beyond_corpus!r}: pad | error"),
        (cfg.hybrid.rrf_k > 0 and cfg.hybrid.depth > 0, "retrieval.hybrid.rrf_k and depth must be > 0"),
        (cfg.hybrid.dense_weight >= 0 and cfg.hybrid.lexical_weight >= 0, "retrieval.hybrid weights must be >= 0"),
        (cfg.rerank.top_n > 0, f"retrieval.rerank.top_n={cfg.rerank.top_n}: must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
