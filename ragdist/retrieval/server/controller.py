"""The service's control plane: a named controller actor that owns the shard replicas.

It holds, per loaded index version, `replicas` actors for every shard (Ray restarts a dead one,
which reloads its shard from the snapshot and replays the version's update log from here), which
version is primary, which is the canary and with what fraction of traffic, and the log of
streaming updates. Clients read the topology once and then talk to shard actors directly: every
topology change bumps the generation and is pushed to every replica, and every update epoch is
applied on every replica before `update` returns, so a shard's answer tells a client when its
routing table or its epoch is out of date. Nothing here is on the search path.

Surviving its own death. Ray restarts the controller (`retrieval.controller_max_restarts`) and
retries the calls it was serving. Its state lives in files (server/state.py): the topology is
rewritten atomically on every change, each update epoch is logged before any replica applies it,
and every admin call carries a request id whose result is stored with the change, so a retried call
returns the first answer instead of acting twice. Replicas are named, detached actors (they outlive
a controller restart and the new controller finds them by name); each watches its controller and
removes itself once the controller is gone for good. Replicas of one shard sit in a STRICT_SPREAD
placement group, one per node, when the cluster has enough nodes to host them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ragdist.errors import RetrievalError, cause
from ragdist.index.builder import shard_of_doc
from ragdist.index.snapshot import read_manifest, resolve
from ragdist.retrieval.server.shard import ShardServer
from ragdist.retrieval.server.state import ServiceStore

if TYPE_CHECKING:
    from ragdist.retrieval.config import RetrievalConfig

log = logging.getLogger(__name__)

REPAIR_TRIES = 30  # a replica that missed an update epoch is re-sent it this many times, a second apart
SHARD_SHARE = 0.001  # of `retrieval.node_resource` per replica: a marker, not a capacity
KEEP_RESULTS = 1024  # admin results (by request id) and update results (by update id) kept for retries
_UNSET = object()


def replica_name(service: str, nonce: str, shard: int, replica: int) -> str:
    return f"ragdist-shard:{service}:{nonce}:{shard}:{replica}"


def group_name(service: str, nonce: str, shard: int) -> str:
    return f"ragdist-shards:{service}:{nonce}:{shard}"


def host_nodes(nodes: list[dict[str, Any]], need: dict[str, float]) -> list[str]:
    """Ids of the live Ray nodes (`ray.nodes()` rows) whose resources can hold one replica (`need`)."""
    return [
        n["NodeID"] for n in nodes
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items())
    ]  # fmt: skip


def _bounded(d: OrderedDict, key: str, value: Any) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > KEEP_RESULTS:
        d.popitem(last=False)


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
    nonce: str = ""  # names this load's replicas, placement groups and update log
    groups: list[str] = field(default_factory=list)  # placement group per shard ([] = none)
    base_gid: int = 0  # next_gid when loaded; the log adds to it
    epoch: int = 0
    log: list[tuple[int, dict[int, dict[str, Any]]]] = field(default_factory=list)
    written: dict[str, float] = field(default_factory=dict)  # chunk id -> timestamp of its last write
    update_ids: OrderedDict = field(default_factory=OrderedDict)  # update id -> its result
    log_rows: int = 0  # rows upserted or deleted since the snapshot (what compaction would fold)

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

    def record(self) -> dict[str, Any]:
        """What a restarted controller needs to find this version again (the log holds the rest)."""
        return {
            "snapshot": self.snapshot, "dim": self.dim, "metric": self.metric, "embedder": self.embedder,
            "num_shards": self.num_shards, "count": self.count, "next_gid": self.base_gid,
            "nonce": self.nonce, "groups": self.groups, "n_rep": len(self.replicas[0]) if self.replicas else 0,
        }  # fmt: skip

    def replica_set(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "num_shards": self.num_shards,
                "n_rep": len(self.replicas[0]) if self.replicas else 0, "groups": self.groups}  # fmt: skip


def shard_ops(
    num_shards: int, rows: list[dict[str, Any]], gids: np.ndarray, vecs: np.ndarray, gone: list[str], docs: list[str]
) -> dict[int, dict[str, Any]]:
    """One epoch as each shard applies it. An upserted id may live in any shard (contiguous sharding, or
    an earlier version of the document): every shard drops it, then its owner by document hash adds it."""
    owner = np.array([shard_of_doc(r["doc_id"], num_shards) for r in rows], np.int64)
    ops: dict[int, dict[str, Any]] = {}
    for s in range(num_shards):
        mine = np.flatnonzero(owner == s)
        ops[s] = {
            "delete_ids": list(gone),
            "delete_doc_ids": list(docs),
            "add": {"gids": gids[mine], "vectors": vecs[mine], "rows": [rows[i] for i in mine]},
        }
    return ops


class ServiceController:
    """Runs as a threaded Ray actor: shard replicas call back into it (update log) while it waits on them.

    `state_dir` and `run_id` come from `start_service`: a controller Ray restarts runs this constructor
    again with the same arguments and finds its own state (same run id); a new service starts afresh.
    """

    def __init__(self, cfg: RetrievalConfig, state_dir: str = "", run_id: str = ""):
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
        self.run_id = run_id
        self.store = ServiceStore(state_dir) if state_dir else None
        self._results: OrderedDict = OrderedDict()  # request id -> result of an admin call
        self._garbage: list[dict[str, Any]] = []  # replica sets being started or torn down
        self._compacting = False
        self.recovered: dict[str, Any] = {}
        self.started = time.time()
        state = self.store.read() if self.store is not None else None
        if state is not None and run_id and state.get("run_id") == run_id:
            self._recover(state)
        elif self.store is not None:
            self.store.reset()
            self._save()

    def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ durable state
    def _save(self) -> None:
        if self.store is None:
            return
        with self._lock:
            state = {
                "run_id": self.run_id,
                "service": self.cfg.service_name,
                "generation": self.generation,
                "primary": self.primary,
                "canary": list(self.canary) if self.canary else None,
                "previous": self.previous,
                "versions": {vid: v.record() for vid, v in self.versions.items()},
                "garbage": list(self._garbage),
                "results": list(self._results.items()),
            }
            self.store.write(state)

    def _done(self, request_id: str | None) -> Any:
        """The stored result of an admin call Ray is retrying (it was applied before a restart)."""
        with self._lock:
            return self._results.get(request_id, _UNSET) if request_id else _UNSET

    def _remember(self, request_id: str | None, result: Any) -> None:
        if request_id:
            _bounded(self._results, request_id, result)

    def _recover(self, state: dict[str, Any]) -> None:
        """Rebuild the topology and the update logs from the state dir; find the replicas by name."""
        import ray

        t0 = time.perf_counter()
        self.generation = int(state["generation"])
        self.primary, self.previous = state["primary"], state["previous"]
        self.canary = tuple(state["canary"]) if state["canary"] else None  # type: ignore[assignment]
        self._results = OrderedDict((k, v) for k, v in state.get("results", []))
        self._garbage = list(state.get("garbage", []))
        temp = self.store.clean_temp() if self.store is not None else 0
        started = 0
        for vid, rec in state["versions"].items():
            replicas: list[list[Any]] = []
            for s in range(int(rec["num_shards"])):
                row = []
                for r in range(int(rec["n_rep"])):
                    try:
                        row.append(ray.get_actor(replica_name(self.cfg.service_name, rec["nonce"], s, r),
                                                 namespace=self.cfg.namespace))  # fmt: skip
                    except ValueError:  # gone for good (out of restarts): start it again
                        group = rec["groups"][s] if rec["groups"] else None
                        row.append(self._start_replica(rec["snapshot"], s, r, vid, rec["nonce"], group))
                        started += 1
                replicas.append(row)
            v = Version(vid=vid, snapshot=rec["snapshot"], dim=int(rec["dim"]), metric=rec["metric"],
                        embedder=rec["embedder"], num_shards=int(rec["num_shards"]), count=int(rec["count"]),
                        next_gid=int(rec["next_gid"]), replicas=replicas, nonce=rec["nonce"],
                        groups=list(rec["groups"]), base_gid=int(rec["next_gid"]))  # fmt: skip
            base = self.store.read_base(v.nonce) if self.store else {}
            v.written = dict(base.get("written", {}))
            v.update_ids = OrderedDict(base.get("update_ids", []))
            for epoch, record, gids, vecs in self.store.epochs(v.nonce) if self.store else []:
                self._replay(v, epoch, record, gids, vecs)
            self.versions[vid] = v
        self._save()
        self.recovered = {
            "at": time.time(), "versions": len(self.versions), "replicas_started": started, "temp_files": temp,
            "epochs": {vid: v.epoch for vid, v in self.versions.items()},
            "recover_s": time.perf_counter() - t0,
        }  # fmt: skip
        log.warning("controller of %r restarted: recovered %s", self.cfg.service_name, self.recovered)
        # Replicas are not called from here: one catching up would be waiting on this very constructor.
        threading.Thread(target=self._after_recovery, daemon=True, name="recovery").start()

    def _replay(self, v: Version, epoch: int, record: dict[str, Any], gids: np.ndarray, vecs: np.ndarray) -> None:
        ops = shard_ops(v.num_shards, record["rows"], gids, vecs.reshape(-1, v.dim), record["gone"], record["docs"])
        v.log.append((epoch, ops))
        v.epoch = epoch
        v.next_gid += len(gids)
        for cid in record["written"]:
            v.written[cid] = max(v.written.get(cid, -np.inf), float(record["ts"]))
        if record.get("update_id"):
            _bounded(v.update_ids, record["update_id"], record["result"])
        v.log_rows += int(record["size"])

    def _after_recovery(self) -> None:
        """Tear down half-started or half-retired replica sets, re-push the generation, repair lagging replicas."""
        import ray

        with self._lock:
            garbage = list(self._garbage)
        for entry in garbage:
            self._teardown(entry)
        with self._lock:
            self._garbage = [g for g in self._garbage if g not in garbage]
        self._save()
        self._publish()
        with self._lock:
            versions = list(self.versions.values())
        for v in versions:
            if not v.epoch:
                continue
            ops = dict(v.log)[v.epoch]
            lagging = []
            for s, reps in enumerate(v.replicas):
                for h in reps:
                    try:
                        if ray.get(h.apply.remote(v.epoch, ops[s]), timeout=self.cfg.timeout_s) < v.epoch:
                            lagging.append((h, s))
                    except Exception:  # noqa: BLE001 - restarting: it replays the log itself when it starts
                        lagging.append((h, s))
            if lagging:
                self._repair(v.vid, v.epoch, lagging, ops)

    def recovery(self) -> dict[str, Any]:
        """How this controller instance started: {} when fresh, else what it recovered and when."""
        return dict(self.recovered, started=self.started)

    # ------------------------------------------------------------------ placement
    def _bundle(self) -> dict[str, float]:
        import ray

        cfg = self.cfg
        need: dict[str, float] = {}
        if cfg.actor_num_cpus > 0:
            need["CPU"] = float(cfg.actor_num_cpus)
        if self._gpus():
            need["GPU"] = 1.0 / max(1, cfg.shards_per_gpu)
        if cfg.node_resource:
            need[cfg.node_resource] = SHARD_SHARE
            if not ray.cluster_resources().get(cfg.node_resource):
                raise RetrievalError(
                    f"retrieval.node_resource={cfg.node_resource!r}: no node of the Ray cluster offers it "
                    f"(ray start --resources '{{\"{cfg.node_resource}\": 1}}' on the nodes meant for shards)"
                )
        return need

    def _gpus(self) -> float:
        import ray

        if self.cfg.device not in ("auto", "gpu"):
            return 0.0
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if self.cfg.device == "gpu" and not gpus:
            raise RetrievalError("retrieval.device=gpu but the Ray cluster has no GPU")
        return gpus

    def _place(self, nonce: str, num_shards: int, n_rep: int, need: dict[str, float]) -> list[str]:
        """One STRICT_SPREAD placement group per shard (its replicas on distinct nodes) when enough
        nodes can host a replica (`need`); [] when there is nothing to spread or too few nodes (then warn)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if n_rep < 2 or not self.cfg.spread_replicas:
            return []
        hosts = host_nodes(ray.nodes(), need)
        if not need or len(hosts) < n_rep:
            log.warning(
                "retrieval.replicas=%d but %d Ray node(s) can host a replica (%s): replicas of a shard may "
                "share a node", n_rep, len(hosts), need or "no resources asked",
            )  # fmt: skip
            return []
        names = [group_name(self.cfg.service_name, nonce, s) for s in range(num_shards)]
        pgs = [placement_group([dict(need) for _ in range(n_rep)], strategy="STRICT_SPREAD", name=n,
                               lifetime="detached") for n in names]  # fmt: skip
        try:
            ray.get([pg.ready() for pg in pgs], timeout=max(self.cfg.timeout_s, 120))
        except Exception as e:
            for pg in pgs:
                remove_placement_group(pg)
            raise RetrievalError(
                f"cannot place {n_rep} replicas of each of {num_shards} shards on distinct nodes "
                f"({len(hosts)} can host {need}): {cause(e)}"
            ) from None
        return names

    def _start_replica(self, path: str, s: int, r: int, vid: str, nonce: str, group: str | None) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        gpus = self._gpus()
        opts: dict[str, Any] = dict(
            name=replica_name(cfg.service_name, nonce, s, r),
            namespace=cfg.namespace,
            num_cpus=cfg.actor_num_cpus,
            max_restarts=cfg.max_restarts,
            max_task_retries=0,  # the client retries on another replica instead
            # Outlives a controller restart (the new one finds it by name); it removes itself when the
            # controller is gone for good, and with the service otherwise.
            lifetime="detached",
            scheduling_strategy="SPREAD",
        )
        if gpus:
            opts["num_gpus"] = 1.0 / max(1, cfg.shards_per_gpu)
        if cfg.node_resource:
            opts["resources"] = {cfg.node_resource: SHARD_SHARE}
        if group:
            try:
                pg = ray.util.get_placement_group(group)
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
            except ValueError:
                log.warning("placement group %s is gone; replica %d of shard %d placed by SPREAD", group, r, s)
        return (
            ray.remote(ShardServer)
            .options(**opts)
            .remote(
                path,
                s,
                nprobe=cfg.nprobe,
                efsearch=cfg.efsearch,
                threads=cfg.threads_per_shard,
                flat_backend=cfg.flat_backend,
                flat_dtype=cfg.flat_dtype,
                device="gpu" if gpus else "cpu",
                lexical=cfg.mode != "dense" or cfg.hybrid.enabled,  # BM25 built at load
                controller=ray.get_runtime_context().current_actor,
                version_id=vid,
            )
        )

    def _teardown(self, entry: dict[str, Any], handles: list[Any] | None = None) -> None:
        """Kill a replica set (by handle, else by name) and remove its placement groups and log."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if handles is None:
            handles = []
            for s in range(int(entry["num_shards"])):
                for r in range(int(entry["n_rep"])):
                    try:
                        handles.append(ray.get_actor(replica_name(self.cfg.service_name, entry["nonce"], s, r),
                                                     namespace=self.cfg.namespace))  # fmt: skip
                    except ValueError:
                        pass
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception as e:  # noqa: BLE001 - already dead
                log.debug("kill: %s", cause(e))
        for g in entry.get("groups") or []:
            try:
                remove_placement_group(ray.util.get_placement_group(g))
            except Exception as e:  # noqa: BLE001 - already removed
                log.debug("remove placement group %s: %s", g, cause(e))
        if self.store is not None:
            self.store.drop_log(entry["nonce"])

    # ------------------------------------------------------------------ versions
    def load(self, snapshot: str, make_primary: bool | None = None, request_id: str | None = None) -> str:
        """Start every replica of every shard of `snapshot`; return its version id.

        A version that fails to load (a corrupted file, a bad manifest) is torn down and the
        error raised; whatever was serving keeps serving.
        """
        done = self._done(request_id)
        if done is not _UNSET:
            return done
        return self._load(snapshot, make_primary, request_id=request_id)

    def _load(self, snapshot: str, make_primary: bool | None, *, request_id: str | None = None,
              base: dict[str, Any] | None = None) -> str:  # fmt: skip
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
        need = self._bundle()  # checks device and node_resource against the cluster first
        nonce = uuid.uuid4().hex[:8]
        num_shards, n_rep = int(manifest["num_shards"]), max(1, int(self.cfg.replicas))
        entry = {"nonce": nonce, "num_shards": num_shards, "n_rep": n_rep,
                 "groups": [group_name(self.cfg.service_name, nonce, s) for s in range(num_shards)]}  # fmt: skip
        with self._lock:
            self._garbage.append(entry)  # until recorded: a restart tears down whatever got started
        self._save()
        replicas: list[list[Any]] = []
        try:
            groups = self._place(nonce, num_shards, n_rep, need)
            replicas = [[self._start_replica(str(path), s, r, vid, nonce, groups[s] if groups else None)
                         for r in range(n_rep)] for s in range(num_shards)]  # fmt: skip
            ray.get([h.ping.remote() for row in replicas for h in row], timeout=max(self.cfg.timeout_s, 120))
        except Exception as e:
            self._teardown(entry)  # by name: also the replicas started before the one that failed
            with self._lock:
                self._garbage.remove(entry)
            self._save()
            keep = f"; still serving {self.primary}" if self.primary else ""
            raise RetrievalError(f"version {vid} failed to load from {path}: {cause(e)}{keep}") from None
        next_gid = int(manifest.get("next_gid", manifest.get("num_chunks", 0)))
        v = Version(
            vid=vid,
            snapshot=str(path),
            dim=int(manifest["dim"]),
            metric=manifest.get("metric", "ip"),
            embedder=str(manifest.get("embedder", "")),
            num_shards=num_shards,
            count=int(sum(s["count"] for s in manifest["shards"])),
            next_gid=next_gid,
            replicas=replicas,
            nonce=nonce,
            groups=groups,
            base_gid=next_gid,
        )
        if base:
            v.written = dict(base.get("written", {}))
            v.update_ids = OrderedDict(base.get("update_ids", []))
            if self.store is not None:
                self.store.write_base(nonce, {"written": v.written, "update_ids": list(v.update_ids.items())})
        with self._lock:
            self.versions[vid] = v
            if make_primary or (make_primary is None and not self.primary):
                self.primary = vid
            self.generation += 1
            self._garbage.remove(entry)
            self._remember(request_id, vid)
        self._save()
        self._publish()
        return vid

    def _known(self, vid: str) -> Version:
        v = self.versions.get(vid)
        if v is None:
            raise RetrievalError(f"unknown index version {vid!r}; loaded: {sorted(self.versions)}")
        return v

    def set_canary(self, vid: str, fraction: float, request_id: str | None = None) -> None:
        if self._done(request_id) is not _UNSET:
            return
        with self._lock:
            self._known(vid)
            if vid == self.primary:
                raise RetrievalError(f"version {vid} is the primary; a canary must be another loaded version")
            if not 0.0 <= float(fraction) <= 1.0:
                raise RetrievalError(f"canary fraction {fraction!r} must be within [0, 1]")
            self.canary = (vid, float(fraction))
            self.generation += 1
            self._remember(request_id, None)
        self._save()
        self._publish()

    def promote(self, vid: str | None = None, request_id: str | None = None) -> str:
        """Make `vid` (default: the canary) the primary in one step; the old primary is kept for rollback."""
        done = self._done(request_id)
        if done is not _UNSET:
            return done
        return self._promote(vid, request_id=request_id)

    def _promote(self, vid: str | None, *, request_id: str | None = None, result: Any = _UNSET) -> str:
        retired = []
        with self._lock:
            if vid is None:
                if self.canary is None:
                    raise RetrievalError("no canary to promote; name a version")
                vid = self.canary[0]
            self._known(vid)
            if vid == self.primary:
                self._remember(request_id, vid if result is _UNSET else result)
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
            self._remember(request_id, vid if result is _UNSET else result)
        self._retire(gone)
        return vid

    def _retire(self, gone: list[Version]) -> None:
        """Save the new topology (naming what goes), kill what goes, publish."""
        with self._lock:
            entries = [v.replica_set() for v in gone]
            self._garbage.extend(entries)
        self._save()
        for v, entry in zip(gone, entries):
            self._teardown(entry, [h for shard in v.replicas for h in shard])
        if entries:
            with self._lock:
                self._garbage = [g for g in self._garbage if g not in entries]
            self._save()
        self._publish()

    def rollback(self, request_id: str | None = None) -> str:
        """Drop the canary if there is one, else return to the primary before the last promote."""
        done = self._done(request_id)
        if done is not _UNSET:
            return done
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
            self._remember(request_id, primary)
        self._retire(gone)
        return primary

    def unload(self, vid: str, request_id: str | None = None) -> None:
        if self._done(request_id) is not _UNSET:
            return
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
            self._remember(request_id, None)
        self._retire(gone)

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
        update_id: str | None = None,
    ) -> dict[str, Any]:
        """Upsert `rows` (with `vectors`) and delete ids/documents as one new epoch of version `vid`
        (None: the primary at the time the update runs).

        A write older (by `ts`) than the last write of the same chunk id is skipped, so replayed or
        reordered writers cannot resurrect stale text. Returns once every live replica applied it.
        The epoch is logged to the state dir first; an `update_id` already applied (a call Ray
        retries after a controller restart) returns its first result instead of a second epoch.
        """
        import ray

        ts = time.time() if ts is None else float(ts)
        with self._update:
            with self._lock:
                v = self._known(vid or self.primary)
            if update_id and update_id in v.update_ids:
                return dict(v.update_ids[update_id], replayed=True)
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
            gone = sorted(set(dels) | {r["id"] for r in rows})
            docs = list(delete_doc_ids)
            result = {"version": v.vid, "epoch": epoch, "upserted": len(rows), "deleted": len(dels),
                      "skipped": skipped}  # fmt: skip
            record = {"update_id": update_id or "", "ts": ts, "rows": rows, "gone": gone, "docs": docs,
                      "written": [cid for cid, ok in zip(ids, fresh) if ok] + dels, "result": result,
                      "size": len(rows) + len(dels) + len(docs)}  # fmt: skip
            if self.store is not None:
                try:
                    self.store.append(v.nonce, epoch, record, gids, vecs)
                except (OSError, TypeError, ValueError) as e:
                    raise RetrievalError(f"update epoch {epoch} of {v.vid} could not be logged: {cause(e)}") from None
            ops = shard_ops(v.num_shards, rows, gids, vecs, gone, docs)
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
            for cid in record["written"]:
                v.written[cid] = max(v.written.get(cid, -np.inf), ts)
            v.next_gid += len(rows)
            v.log_rows += record["size"]
            if update_id:
                _bounded(v.update_ids, update_id, result)
            with self._lock:
                v.epoch = epoch
                compact = (self.cfg.compact_log_rows > 0 and v.log_rows >= self.cfg.compact_log_rows
                           and v.vid == self.primary and not self._compacting)  # fmt: skip
                if compact:
                    self._compacting = True
        if compact:
            threading.Thread(target=self._auto_compact, args=(v.vid,), daemon=True, name="compact").start()
        return dict(result, lagging_replicas=len(lagging))

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

    def _auto_compact(self, vid: str) -> None:
        try:
            out = self.compact(vid, promote=True)
            log.info("update log of %s past retrieval.compact_log_rows=%d: folded into %s",
                     vid, self.cfg.compact_log_rows, out["version"])  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the log keeps serving; the next update tries again
            log.warning("compacting %s failed: %s", vid, cause(e))
        finally:
            with self._lock:
                self._compacting = False

    def compact(self, vid: str | None = None, promote: bool = True, request_id: str | None = None) -> dict[str, Any]:
        """Fold the version's update log into a new snapshot on disk, load it and (default) promote it.

        Updates wait meanwhile (none may land between the fold and the swap); queries do not.
        The new version starts at epoch 0 with an empty log, so restarts replay nothing.
        """
        from ragdist.index.reshard import fold_updates

        done = self._done(request_id)
        if done is not _UNSET:
            return done
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
            new = self._load(str(path), make_primary=False,
                             base={"written": v.written, "update_ids": list(v.update_ids.items())})  # fmt: skip
            result = {"snapshot": str(path), "version": new, "folded_epochs": v.epoch,
                      "promoted": promote and was_primary}  # fmt: skip
            if promote and was_primary:
                self._promote(new, request_id=request_id, result=result)
            else:
                with self._lock:
                    self._remember(request_id, result)
                self._save()
            return result

    def shutdown(self) -> None:
        with self._lock:
            gone = list(self.versions.values())
            self.versions.clear()
            self.primary, self.canary, self.previous = "", None, ""
            self.generation += 1
            garbage, self._garbage = list(self._garbage), []
        for v in gone:
            self._teardown(v.replica_set(), [h for shard in v.replicas for h in shard])
        for entry in garbage:
            self._teardown(entry)
        if self.store is not None:
            self.store.remove()
