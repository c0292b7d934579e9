"""Asynchronous index refresh for `joint.side=both`: training never waits for it.

    rank 0, step boundary         background thread (rank 0)        Ray (low priority)
    ─────────────────────         ──────────────────────────        ──────────────────
    due? → copy passage-encoder → write weights (safetensors) ──→  RefreshCoordinator.build:
           weights (ms)                                             EmbedWorker × N re-embed the corpus,
                                                                    build_snapshot → new version dir
                                  service.load_version(new) ←───────┘  (beside the served one)
    poll() → the loaded version ─→ broadcast to every rank → all ranks pin their queries to it from
                                  the same step on; then service.promote(new) and unload(old).

The refreshed versions live in a retrieval service of their own (`<retrieval.service_name>-joint`),
started on the run's index by rank 0: the run's main service keeps serving the original index to
everything else (the evaluation of the plain `rag` row, other clients).

Versions are ordered by a sequence number taken when a refresh starts: a refresh that finishes after
a newer one started is discarded, so the served index never goes back in time. A refresh that fails
(a crashed worker, a timeout, a version that fails to load) leaves the served version as it is; it is
retried with exponential backoff and the failure is logged. Embed workers and the coordinator run under
`os.nice` with one thread each: on a machine whose cores train, the refresh takes the leftover CPU.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragdist.data.corpus import Chunk
from ragdist.errors import IndexError_, RetrievalError
from ragdist.index.snapshot import read_manifest

if TYPE_CHECKING:
    from ragdist.joint.config import JointConfig
    from ragdist.joint.retriever import MeanPoolEncoder
    from ragdist.retrieval.api import Passage, SearchResult
    from ragdist.retrieval.config import RetrievalConfig

log = logging.getLogger(__name__)


@dataclass
class ServedVersion:
    """The index version the ranks query, and the encoder step whose passage vectors it holds."""

    seq: int  # order of refresh starts; 0 = the run's original index
    version: str  # the retrieval service's version id (the snapshot's)
    snapshot: str
    encoder_step: int  # training step at which the passage encoder was snapshotted


def load_chunks(snapshot: str | Path) -> tuple[list[Chunk], dict[str, Any]]:
    """The snapshot's passages in global-id order (checksummed), so a new version keeps every id."""
    from ragdist.index.reader import read_shard_rows

    snapshot = Path(snapshot)
    manifest = read_manifest(snapshot)
    rows: list[tuple[int, Chunk]] = []
    for s in range(len(manifest["shards"])):
        gids, cols = read_shard_rows(snapshot, manifest, s)
        for i, g in enumerate(gids):
            rows.append((int(g), Chunk(id=cols["id"][i], doc_id=cols["doc_id"][i], text=cols["text"][i],
                                       title=cols["title"][i] or "", source=cols["source"][i] or "",
                                       timestamp=cols["timestamp"][i], meta=cols["meta"][i] or {})))
    rows.sort(key=lambda r: r[0])
    if [g for g, _ in rows] != list(range(len(rows))):
        raise IndexError_(f"{snapshot}: passage ids are not 0..{len(rows) - 1} (updated in place?); "
                          "joint refresh re-embeds a compacted snapshot only")
    return [c for _, c in rows], manifest


class EmbedWorker:
    """A Ray actor re-embedding part of the corpus with the snapshotted passage encoder."""

    def __init__(self, encoder_path: str, max_length: int, threads: int, nice: int, batch_size: int):
        import torch

        from ragdist.joint.retriever import MeanPoolEncoder

        if nice:
            os.nice(nice)
        torch.set_num_threads(max(1, threads))
        self.encoder = MeanPoolEncoder(encoder_path, max_length)
        self.batch_size = batch_size
        self.loaded = ""

    def embed(self, weights: str, texts: list[str], crash: bool = False) -> np.ndarray:
        from ragdist.joint.retriever import load_weights

        if crash:
            os._exit(1)  # fault injection (tests): this worker process dies in the middle of a refresh
        if weights != self.loaded:
            self.encoder.load_weights(load_weights(weights))
            self.loaded = weights
        return self.encoder.encode(texts, self.batch_size)

    def ping(self) -> int:
        return os.getpid()


class RefreshCoordinator:
    """A Ray actor: fans re-embedding out to the embed workers, then writes a new snapshot version."""

    def __init__(self, source_snapshot: str, root: str, encoder_path: str, *, max_length: int, workers: int,
                 threads: int, nice: int, batch_size: int):
        from ragdist.index.builder import IndexConfig
        from ragdist.joint.retriever import PASSAGE_FORMAT

        if nice:
            os.nice(nice)
        self.chunks, manifest = load_chunks(source_snapshot)
        self.source_version = manifest.get("version", "")
        self.texts = [PASSAGE_FORMAT.format(text=c.text, title=c.title) for c in self.chunks]
        search = manifest.get("search", {})
        # The same index type, sharding and search settings as the run's index; no recall pass (the
        # original build measured it for this index type).
        self.index_cfg = IndexConfig(factory=manifest["factory"], metric=manifest.get("metric", "ip"),
                                     num_shards=len(manifest["shards"]), sharding=manifest.get("sharding", "contiguous"),
                                     root=root, nprobe=int(search.get("nprobe", 16)),
                                     efsearch=int(search.get("efsearch", 64)), recall_queries=0)
        self.spec = (encoder_path, max_length, threads, nice, batch_size)
        self.lock = threading.Lock()
        self.workers = [self._new_worker() for _ in range(max(1, workers))]

    def _new_worker(self) -> Any:
        import ray

        return ray.remote(EmbedWorker).options(num_cpus=0, max_restarts=0).remote(*self.spec)

    def _replace_dead_workers(self) -> int:
        import ray

        dead = 0
        with self.lock:
            for i, w in enumerate(self.workers):
                try:
                    ray.get(w.ping.remote(), timeout=30)
                except Exception:
                    self.workers[i] = self._new_worker()
                    dead += 1
        return dead

    def build(self, seq: int, weights: str, step: int, crash: bool = False, delay_s: float = 0.0) -> dict[str, Any]:
        import ray

        from ragdist.index.builder import build_snapshot

        t0 = time.perf_counter()
        with self.lock:
            workers = list(self.workers)
        parts = [p for p in np.array_split(np.arange(len(self.texts)), len(workers)) if len(p)]
        refs = [w.embed.remote(weights, [self.texts[i] for i in part], crash and j == 0)
                for j, (w, part) in enumerate(zip(workers, parts))]
        try:
            vectors = np.concatenate(ray.get(refs))
        except ray.exceptions.RayActorError as e:
            dead = self._replace_dead_workers()
            raise RuntimeError(f"an embed worker died during refresh {seq} ({dead} replaced): {e}") from None
        embed_s = time.perf_counter() - t0
        if delay_s:
            time.sleep(delay_s)  # fault injection (tests): a slow refresh
        t1 = time.perf_counter()
        path = build_snapshot(
            self.chunks, vectors, self.index_cfg, embedder_name=f"joint-passage-encoder@step{step}",
            extra={"joint": {"seq": seq, "encoder_step": step, "weights": weights, "source": self.source_version}},
        )
        return {"seq": seq, "snapshot": str(path), "version": path.name, "encoder_step": step, "docs": len(self.texts),
                "embed_s": embed_s, "build_s": time.perf_counter() - t1, "docs_per_s": len(self.texts) / max(embed_s, 1e-9)}

    def ping(self) -> bool:
        return True


@dataclass
class _Job:
    seq: int
    step: int
    reason: str
    started: float
    probe: np.ndarray | None = None
    superseded: bool = False


@dataclass
class RefreshRecord:
    seq: int
    step: int
    reason: str
    outcome: str  # served | discarded | failed
    wall_s: float
    served_at_step: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def joint_service(retrieval: RetrievalConfig) -> RetrievalConfig:
    """The service holding the refreshed versions of a side=both run."""
    return replace(retrieval, service_name=f"{retrieval.service_name}-joint", cache_size=0, detached=False)


class RefreshManager:
    """Rank 0's side of the refresh: when to start one, what to serve, retries, cleanup.

    Every method returns at once (milliseconds) when called from the training loop; the work runs in
    a background thread and on Ray. `service` is the retrieval service serving the versions.
    """

    def __init__(self, cfg: JointConfig, *, source_snapshot: str, served: ServedVersion, service: RetrievalConfig,
                 encoder_path: str, run_dir: str | Path, probe_texts: list[str] | None = None,
                 faults: dict[str, Any] | None = None):
        import ray

        from ragdist.retrieval.admin import ServiceAdmin

        self.cfg = cfg
        self.service = service
        self.served = served
        self.root = Path(cfg.refresh_root) if cfg.refresh_root else Path(run_dir) / "joint" / "index"
        self.weights_dir = Path(run_dir) / "joint" / "encoder_snapshots"
        self.probe_texts = probe_texts or []
        self.probe_ref: np.ndarray | None = None  # probe vectors of the served version's encoder
        # Test hooks only: {"crash_attempts": n} kills an embed worker process in each of the next n
        # refreshes; {"delay_s": {seq: s}} holds refresh `seq` back for s seconds before its snapshot.
        self.faults = dict(faults or {})
        self.crashes_left = int(self.faults.get("crash_attempts", 0))
        self.admin = ServiceAdmin(service)  # load / promote / unload, from the background threads
        self.admin_lock = threading.Lock()
        self.coord = (
            ray.remote(RefreshCoordinator)
            .options(num_cpus=0, max_concurrency=3, max_restarts=-1)
            .remote(str(source_snapshot), str(self.root), encoder_path, max_length=cfg.encoder_max_length,
                    workers=cfg.refresh_workers, threads=cfg.refresh_threads, nice=cfg.refresh_nice,
                    batch_size=cfg.refresh_batch_size)
        )
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ragdist-refresh")
        self.results: queue.Queue = queue.Queue()
        self.jobs: dict[int, _Job] = {}
        self.next_seq = served.seq + 1
        self.latest_started = served.seq
        self.last_start_step = served.encoder_step
        self.attempt = 0
        self.retry_at: float | None = None
        self.records: list[RefreshRecord] = []
        self.written: list[str] = []  # snapshot dirs this manager wrote, oldest first

    # ----------------------------------------------------------------- state
    def inflight(self) -> int:
        return len(self.jobs)

    def staleness(self, step: int) -> int:
        return step - self.served.encoder_step

    def drift(self, encoder: MeanPoolEncoder) -> float | None:
        """Measured staleness: 1 − mean cosine between the probe passages' vectors now and in the served index."""
        if self.probe_ref is None or not self.probe_texts:
            return None
        now = encoder.encode(self.probe_texts)
        return float(1.0 - np.mean(np.sum(now * self.probe_ref, axis=1)))

    def due(self, step: int, drift: float | None) -> str | None:
        cfg = self.cfg
        if self.retry_at is not None:
            return "retry" if time.monotonic() >= self.retry_at else None
        if cfg.refresh_every and step - self.last_start_step >= cfg.refresh_every:
            return "every"
        if cfg.refresh_max_staleness and self.staleness(step) >= cfg.refresh_max_staleness:
            return "staleness"
        if cfg.refresh_drift and drift is not None and drift >= cfg.refresh_drift:
            return "drift"
        return None

    # ----------------------------------------------------------------- starting
    def maybe_start(self, step: int, encoder: MeanPoolEncoder, drift: float | None = None) -> bool:
        reason = self.due(step, drift)
        if reason is None:
            return False
        busy = self.inflight()
        if busy and not (self.cfg.refresh_supersede and busy < 2):
            return False  # the due refresh starts when the current one ends
        self.start(step, encoder, reason)
        return True

    def start(self, step: int, encoder: MeanPoolEncoder, reason: str) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.latest_started = seq
        self.last_start_step = step
        self.retry_at = None
        # The copy is taken now, at the step boundary: the background thread writes exactly these weights.
        state = encoder.weights()
        probe = encoder.encode(self.probe_texts) if self.probe_texts and self.cfg.refresh_drift else None
        job = _Job(seq, step, reason, time.perf_counter(), probe)
        self.jobs[seq] = job
        crash = self.crashes_left > 0
        self.crashes_left -= int(crash)
        delay = float(self.faults.get("delay_s", {}).get(seq, 0.0))
        self.pool.submit(self._run, job, state, crash, delay)
        log.info("refresh %d started at step %d (%s); serving %s (encoder step %d)", seq, step, reason,
                 self.served.version, self.served.encoder_step)
        return seq

    def _run(self, job: _Job, state: dict[str, Any], crash: bool, delay: float) -> None:
        import ray

        from ragdist.joint.retriever import save_weights

        try:
            path = save_weights(state, self.weights_dir / f"step{job.step:07d}-r{job.seq}.safetensors",
                                {"step": str(job.step), "seq": str(job.seq)})
            del state
            ref = self.coord.build.remote(job.seq, str(path), job.step, crash, delay)
            res = ray.get(ref, timeout=self.cfg.refresh_timeout_s)
            self.written.append(res["snapshot"])
            res["weights"] = str(path)
            if self.latest_started == job.seq:  # else discarded by poll(); no point loading it
                with self.admin_lock:
                    res["version"] = self.admin.load_version(res["snapshot"])
                res["loaded"] = True
            self.results.put(("ok", job, res))
        except Exception as e:  # reported to the training thread, which logs it and schedules the retry
            self.results.put(("failed", job, {"error": _cause(e)}))

    # ----------------------------------------------------------------- results
    def poll(self, step: int) -> ServedVersion | None:
        """Collect finished refreshes; return the version to switch to now, if one is ready."""
        promoted: ServedVersion | None = None
        while True:
            try:
                status, job, res = self.results.get_nowait()
            except queue.Empty:
                break
            self.jobs.pop(job.seq, None)
            wall = time.perf_counter() - job.started
            if status == "failed":
                self._failed(job, res["error"], wall, step)
                continue
            newest = promoted.seq if promoted else self.served.seq
            if job.seq < self.latest_started or job.seq <= newest or not res.get("loaded"):
                log.warning("refresh %d (encoder step %d) finished after refresh %d started: discarded",
                            job.seq, job.step, self.latest_started)
                self.pool.submit(self._drop, res["version"] if res.get("loaded") else None, res["snapshot"])
                self.records.append(RefreshRecord(job.seq, job.step, job.reason, "discarded", wall, detail=res))
                continue
            self.attempt = 0
            promoted = ServedVersion(job.seq, res["version"], res["snapshot"], job.step)
            if job.probe is not None:
                self.probe_ref = job.probe
            self.records.append(RefreshRecord(job.seq, job.step, job.reason, "served", wall, step, res))
            log.info("refresh %d ready after %.1fs (re-embedded %d passages at %.0f/s): serving %s from step %d "
                     "(encoder step %d)", job.seq, wall, res["docs"], res["docs_per_s"], res["version"], step, job.step)
        return promoted

    def _failed(self, job: _Job, error: str, wall: float, step: int) -> None:
        self.records.append(RefreshRecord(job.seq, job.step, job.reason, "failed", wall, detail={"error": error}))
        self.attempt += 1
        if self.attempt > self.cfg.refresh_max_retries:
            log.error("refresh %d failed (%s); %d attempts failed in a row: giving up until the next trigger, "
                      "%s keeps serving", job.seq, error, self.attempt, self.served.version)
            self.attempt = 0
            self.retry_at = None
            self.last_start_step = step
            return
        backoff = min(self.cfg.refresh_max_backoff_s, self.cfg.refresh_backoff_s * 2 ** (self.attempt - 1))
        self.retry_at = time.monotonic() + backoff
        log.warning("refresh %d failed (attempt %d: %s); %s keeps serving; retrying in %.1fs",
                    job.seq, self.attempt, error, self.served.version, backoff)

    def promote(self, new: ServedVersion) -> None:
        """Called once every rank queries `new`: make it the service's primary and unload the old one."""
        old, self.served = self.served, new
        self.pool.submit(self._promote, new.version, old.version)
        self._prune()

    def _promote(self, new: str, old: str) -> None:
        try:
            with self.admin_lock:
                self.admin.promote(new)
                if old != new and old in self.admin.versions()["versions"]:
                    self.admin.unload(old)
        except Exception as e:  # the ranks already query `new` by id; a failed bookkeeping call costs memory only
            log.warning("refresh: promoting %s / unloading %s failed: %s", new, old, _cause(e))

    def _drop(self, version: str | None, snapshot: str | None) -> None:
        try:
            if version is not None:
                with self.admin_lock:
                    self.admin.unload(version)
        except Exception as e:
            log.warning("refresh: could not unload %s: %s", version, _cause(e))
        if snapshot:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the snapshots of the newest `refresh_keep_versions` served versions (the served one always).

        Only directories this manager wrote are ever removed: `refresh_root` may be shared."""
        keep = max(1, self.cfg.refresh_keep_versions)
        served = [r.detail["snapshot"] for r in self.records if r.outcome == "served"]
        kept = set(served[-keep:]) | {self.served.snapshot}
        for snap_dir in served:
            if snap_dir not in kept:
                shutil.rmtree(snap_dir, ignore_errors=True)
        live = {self.served.seq, *self.jobs}
        for f in self.weights_dir.glob("*.safetensors"):
            if not any(f.name.endswith(f"-r{s}.safetensors") for s in live):
                f.unlink(missing_ok=True)

    def wait(self, step: int) -> ServedVersion | None:
        """Block (bounded) until the refresh in flight is served or fails: the bounded-staleness mode."""
        deadline = time.monotonic() + self.cfg.refresh_timeout_s
        t0 = time.perf_counter()
        while self.inflight() and time.monotonic() < deadline:
            got = self.poll(step)
            if got is not None:
                log.info("refresh: training waited %.1fs for refresh %d (staleness %d)", time.perf_counter() - t0,
                         got.seq, self.staleness(step))
                return got
            time.sleep(0.05)
        return None

    # ----------------------------------------------------------------- end of training
    def finish(self, step: int, encoder: MeanPoolEncoder, final: bool) -> ServedVersion | None:
        """Wait (bounded) for refreshes in flight; with `final`, refresh once more with the last weights,
        so the index saved with the run matches the passage encoder saved with it."""
        deadline = time.monotonic() + self.cfg.refresh_timeout_s * (2 + self.cfg.refresh_max_retries)
        newest: ServedVersion | None = None
        final_started = False
        while time.monotonic() < deadline:
            got = self.poll(step)
            if got is not None:
                newest = got
                self.promote(got)
            if self.inflight():
                time.sleep(0.05)
            elif final and not final_started and self.served.encoder_step < step:
                self.start(step, encoder, "final")
                final_started = True
            elif final_started and self.retry_at is not None and self.served.encoder_step < step:
                if time.monotonic() >= self.retry_at:
                    self.start(step, encoder, "final")
                else:
                    time.sleep(0.05)
            else:
                break
        else:
            log.warning("refresh: %d still in flight at the end of training; %s stays", self.inflight(),
                        self.served.version)
        return newest

    def close(self) -> None:
        """Stop the refresh machinery; the service itself is stopped by whoever started it."""
        import ray

        self.pool.shutdown(wait=True, cancel_futures=True)
        keep = max(1, self.cfg.refresh_keep_versions)
        kept = {r.detail["snapshot"] for r in self.records if r.outcome == "served"}
        kept = set(sorted(kept, key=self.written.index)[-keep:]) | {self.served.snapshot}
        for snap_dir in self.written:
            if snap_dir not in kept:
                shutil.rmtree(snap_dir, ignore_errors=True)
        try:
            ray.kill(self.coord, no_restart=True)
        except Exception:  # already gone
            pass

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.records if r.outcome == "served"]
        return {
            "refreshes_started": self.next_seq - 1,
            "served": len(done),
            "failed": sum(r.outcome == "failed" for r in self.records),
            "discarded": sum(r.outcome == "discarded" for r in self.records),
            "refresh_s": [r.wall_s for r in done],
            "embed_docs_per_s": [r.detail.get("docs_per_s") for r in done],
            "records": [r.__dict__ for r in self.records],
        }


def _cause(e: BaseException) -> str:
    lines = [m for m in str(e).strip().splitlines() if m.strip()]
    useful = [m for m in lines if "Error" in m and "Traceback" not in m] or lines
    return f"{type(e).__name__}: {useful[-1] if useful else ''}".strip()


class IndexView:
    """The one index version a rank queries, pinned by id: a `Retriever` over the joint service.

    Switched only at step boundaries, at the same step on every rank, so every query of a step meets
    the same version. Queries go through `ShardedRetriever` (the same transport, hybrid and re-ranking
    as any other client); the trainable query encoder's vectors are passed in, so nothing is cached."""

    def __init__(self, service: RetrievalConfig, served: ServedVersion):
        from ragdist.retrieval.retriever import ShardedRetriever

        self.retriever = ShardedRetriever(service)
        self.served = served
        self._check(served)

    @property
    def version(self) -> str:
        return self.served.version

    def _check(self, served: ServedVersion) -> None:
        view = self.retriever.view
        if served.version not in view.versions:
            view.refresh()  # loaded since this rank last looked
        if served.version not in view.versions:
            raise RetrievalError(f"index version {served.version} is not loaded in service "
                                 f"{self.retriever.cfg.service_name!r} (loaded: {sorted(view.versions)})")

    def switch(self, served: ServedVersion) -> None:
        self._check(served)
        self.served = served

    def search(self, vectors: np.ndarray, k: int) -> SearchResult:
        """Dense exact top-k of `vectors` in the served version (recall measurements, tests)."""
        res = self.retriever.search(vectors, k, version=self.served.version)
        if res.partial:
            raise RetrievalError(f"index version {self.served.version}: shards {res.missing_shards} did not answer")
        return res

    def retrieve(self, questions: list[str], k: int, version: str | None = None,
                 vectors: np.ndarray | None = None) -> list[list[Passage]]:
        """The training query: `vectors` from the query encoder, hybrid / re-ranked as the service is
        configured, from the served version unless `version` names another loaded one."""
        if vectors is None:
            raise RetrievalError("IndexView.retrieve needs the query encoder's vectors (vectors=...)")
        out = self.retriever.retrieve(questions, k, version=version or self.served.version, vectors=vectors)
        if self.retriever.last_partial:
            raise RetrievalError(f"index version {version or self.served.version}: some shards did not answer")
        return out
