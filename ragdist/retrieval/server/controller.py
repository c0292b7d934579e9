"""The service's control plane: a named controller actor that owns the shard replicas.

It holds, per loaded index version, `replicas` actors for every shard (Ray restarts a dead one,
which reloads its shard from the snapshot and replays the version's update log from here), which
version is primary, which is the canary and with what fraction of traffic, and the log of
streaming updates. Clients read the topology once and then talk to shard actors directly: every
topology change bumps the generation and is pushed to every replica, and every update epoch is
applied on every replica before `update` returns, so a shard's answer tells a client when its
routing table or its epoch is out of date. Nothing here is on the search path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ragdist.errors import RetrievalError, cause
from ragdist.index.builder import shard_of_doc
from ragdist.index.snapshot import read_manifest, resolve
from ragdist.retrieval.server.shard import ShardServer

if TYPE_CHECKING:
    from ragdist.retrieval.config import RetrievalConfig

log = logging.getLogger(__name__)

REPAIR_TRIES = 30  # a replica that missed an update epoch is re-sent it this many times, a second apart


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
        self.reads: Counter[str] = Counter()  # topology / state / log reads served (tests count round trips)

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
        self._publish()
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
        self._publish()

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
        self._publish()
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
            primary = self.primary
        self._kill(gone)
        self._publish()
        return primary

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
        self._publish()

    def _publish(self) -> None:
        """Tell every replica the new generation, so that clients learn of it from their next answer.

        Returns once the live replicas acknowledged: a search that starts after an admin call
        returns sees the change. A dead replica learns it when Ray restarts it (`log_since`)."""
        import ray

        with self._lock:
            gen = self.generation
            handles = [h for v in self.versions.values() for reps in v.replicas for h in reps]
        refs = [h.set_generation.remote(gen) for h in handles]
        if refs:
            # Bounded by one attempt: a replica Ray is restarting reads the generation when it starts.
            ray.wait(refs, num_returns=len(refs), timeout=self.cfg.attempt_timeout_s)

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
            self.reads["topology"] += 1
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
        """(generation, epoch per version)."""
        with self._lock:
            self.reads["state"] += 1
            return self.generation, {vid: v.epoch for vid, v in self.versions.items()}

    def read_counts(self) -> dict[str, int]:
        """How many topology / state / log reads this controller has served (not counting this one)."""
        return dict(self.reads)

    def log_since(self, vid: str, shard: int, after: int) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
        """(generation, the version's update epochs after `after` for `shard`): a replica catching up."""
        with self._log:
            self.reads["log_since"] += 1
            v = self.versions.get(vid)
            entries = [] if v is None else [(e, ops.get(shard, {})) for e, ops in v.log if e > after]
        return self.generation, entries

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
            refs = [(h, s, h.apply.remote(epoch, ops[s])) for s, reps in enumerate(v.replicas) for h in reps]
            lagging = []
            for h, s, ref in refs:
                try:
                    ray.get(ref, timeout=self.cfg.timeout_s)
                except Exception as e:  # a dead replica replays the log when Ray restarts it
                    lagging.append((h, s))
                    log.warning("update epoch %d: a replica did not apply it now (%s)", epoch, cause(e))
            if lagging:
                # Readers wait for a shard that is behind rather than have it read the log on the search
                # path: keep re-sending the epoch (the replica fetches any gap itself) until it lands.
                threading.Thread(target=self._repair, args=(v.vid, epoch, lagging, ops), daemon=True).start()
            for cid in ids:
                v.written[cid] = max(v.written.get(cid, -np.inf), ts)
            for d in dels:
                v.written[d] = max(v.written.get(d, -np.inf), ts)
            v.next_gid += len(rows)
            with self._lock:
                v.epoch = epoch
            return {"version": v.vid, "epoch": epoch, "upserted": len(rows), "deleted": len(dels),
                    "skipped": skipped, "lagging_replicas": len(lagging)}

    def _repair(self, vid: str, epoch: int, lagging: list[tuple[Any, int]], ops: dict[int, dict[str, Any]]) -> None:
        import ray

        for _ in range(REPAIR_TRIES):
            time.sleep(1.0)
            with self._lock:
                if vid not in self.versions:
                    return
            still = []
            for h, s in lagging:
                try:
                    ray.get(h.apply.remote(epoch, ops[s]), timeout=self.cfg.timeout_s)
                except Exception:
                    still.append((h, s))
            if not still:
                return
            lagging = still
        log.warning("update epoch %d of %s: %d replica(s) still behind", epoch, vid, len(lagging))

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

