"""The retrieval client: fan out to one replica of every shard, merge the exact global top-k.

    start_service(snapshot, cfg)                 # once (the recipe does it)
    client = RetrievalClient(cfg, embedder)      # in every training rank
    client.retrieve(questions, k, filter={"source": "wiki"})
    client.search(vectors, k) -> SearchResult    # ids, scores, passages, partial flag
    client.metrics()                             # latency per shard, QPS, queue depth, cache hit rate

Each shard call goes to the replica with the fewest calls outstanding from this client, skipping
replicas that failed recently. A call that fails is retried on another replica at once; one that
takes longer than `attempt_timeout_s` is hedged to another replica (first answer wins). When no
replica of a shard answers, `on_shard_down` decides: raise, or return the other shards' merge
flagged `partial` with the missing shards named — never a silently shorter list.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragdist.errors import ConfigError, RetrievalError
from ragdist.retrieval.cluster import init_ray
from ragdist.retrieval.filters import Filter, compile_filter
from ragdist.retrieval.metrics import ServiceMetrics
from ragdist.retrieval.service import (  # noqa: F401  (re-exported: the recipes import them from here)
    ServiceController,
    cause,
    controller_name,
    start_service,
    stop_service,
    validate_config,
)
from ragdist.retrieval.shard import ShardServer  # noqa: F401

log = logging.getLogger(__name__)

# Ray passes arguments under ~100 KiB inside the call message; a bigger query batch is put in the
# object store once and the same reference handed to every shard.
INLINE_BYTES = 96 * 1024


MODES = ("dense", "bm25", "hybrid", "auto")


@dataclass
class HybridConfig:
    enabled: bool = False  # the older switch for mode=hybrid (true = hybrid when mode is dense)
    dense_weight: float = 1.0
    lexical_weight: float = 1.0
    rrf_k: int = 60  # RRF constant: score = sum of weight / (rrf_k + rank)
    depth: int = 50  # candidates taken from each list before fusing


@dataclass
class RerankConfig:
    model: str = ""  # a local HF sequence-classification model dir; "" = no re-ranking
    top_n: int = 20  # candidates re-scored by the cross-encoder
    batch_size: int = 32
    max_length: int = 256
    threads: int = 0  # torch threads while re-ranking; 0 = leave as is


@dataclass
class AutoModeConfig:
    """How mode=auto (and the fusion sweep of the retrieval-only eval) measures, on training questions."""

    k: int = 0  # rank cut-off of the R@k criterion; 0 = retrieval.top_k (what the generator is given)
    questions: int = 1000  # training questions sampled (seeded) for the sweep and the choice
    holdout: float = 0.5  # share of them held out to choose the mode; the rest tune the fusion weights
    lexical_weights: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0])  # dense weight 1
    rrf_ks: list[int] = field(default_factory=lambda: [10, 60])
    batch_size: int = 256  # questions per retrieve call
    seed: int = 0


@dataclass
class RetrievalConfig:
    top_k: int = 3
    # dense (vectors) | bm25 (lexical only) | hybrid (both, fused: hybrid.*) | auto (the best of the
    # three by R@k on held-out training questions, chosen once before training: ragdist.retrieval.select)
    mode: str = "dense"
    address: str = ""  # Ray cluster to attach to; "" = $RAY_ADDRESS, else a new loopback cluster
    namespace: str = "ragdist"
    service_name: str = "default"
    replicas: int = 1  # actors per shard; a query goes to one replica of every shard
    actor_num_cpus: float = 0.25  # Ray's share per shard actor (the training ranks are not counted by Ray)
    threads_per_shard: int = 1  # FAISS / torch threads in each shard actor
    max_restarts: int = -1  # Ray restarts a dead shard actor (it reloads its shard); -1 = always
    timeout_s: float = 60.0  # per call, for all shards together
    attempt_timeout_s: float = 10.0  # one shard call; then it is hedged on another replica
    on_shard_down: str = "raise"  # raise | partial (results flagged partial, missing shards named)
    flat_backend: str = "auto"  # Flat shards: auto (timed at load) | faiss | torch (ragdist.kernels)
    flat_dtype: str = "fp32"  # torch backend: fp32 (exact) | bf16 (bf16 scan, exact fp32 re-scoring)
    device: str = "auto"  # auto (GPU when the cluster has one) | cpu | gpu
    shards_per_gpu: int = 1
    nprobe: int = 0  # IVF search breadth; 0 = the snapshot's
    efsearch: int = 0  # HNSW search breadth; 0 = the snapshot's
    k_beyond_corpus: str = "pad"  # k > passages: pad with id -1 (as FAISS does) | error
    cache_size: int = 50_000  # LRU entries keyed by (query, encoder, index version, epoch, k, …); 0 = off
    check_every_s: float = 0.0  # how stale the client's view of versions/epochs may get; 0 = checked per call
    keep_previous: bool = True  # keep the old primary loaded after a promote, for rollback
    detached: bool = False  # keep the service alive after the process that started it exits
    ray_num_cpus: int | None = None  # CPUs of a cluster we start (default: all cores)
    metrics_window: int = 2048  # calls kept for latency percentiles
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    auto: AutoModeConfig = field(default_factory=AutoModeConfig)


def retrieval_mode(cfg: RetrievalConfig) -> str:
    """The configured mode; `hybrid.enabled=true` (the older switch) still means hybrid."""
    if cfg.mode not in MODES:
        raise ConfigError(f"retrieval.mode={cfg.mode!r}: expected one of {' | '.join(MODES)}")
    if cfg.hybrid.enabled and cfg.mode != "hybrid":
        if cfg.mode != "dense":
            raise ConfigError(f"retrieval.hybrid.enabled=true contradicts retrieval.mode={cfg.mode}: "
                              "set retrieval.mode only")
        return "hybrid"
    return cfg.mode


def normalize_query(q: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", q)).strip().lower()


@dataclass
class SearchResult:
    scores: np.ndarray  # (nq, k) float32, best first
    ids: np.ndarray  # (nq, k) int64 global row ids, -1 where fewer than k exist
    passages: list[list[dict[str, Any]]]  # per query, the passages in rank order
    partial: bool = False  # some shard answered from no replica: results cover the other shards only
    missing_shards: list[int] = field(default_factory=list)
    version: str = ""
    epoch: int = 0  # the update epoch every shard answered at
    lexical_ids: np.ndarray | None = None  # hybrid: BM25's global top list, -1 padded
    payload: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)


class _Replica:
    __slots__ = ("handle", "key", "shard", "cool_until")

    def __init__(self, handle: Any, shard: int):
        self.handle = handle
        self.key = handle._actor_id.hex()
        self.shard = shard
        self.cool_until = 0.0


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
        self._lock = threading.Lock()  # cache and bookkeeping: a trainer may prefetch from a thread
        self.m = ServiceMetrics(cfg.metrics_window)
        self._replicas: dict[str, _Replica] = {}
        self._turns: dict[str, int] = {}
        self._rng = np.random.default_rng()
        self._epochs: dict[str, int] = {}
        self._abandoned: list[tuple[Any, str]] = []
        self._checked = 0.0
        self._reranker: Any = None
        self.last_partial = False
        self.refresh()

    # ------------------------------------------------------------------ topology
    def refresh(self) -> None:
        import ray

        topo = ray.get(self.controller.topology.remote(), timeout=self.cfg.timeout_s)
        self._apply(topo)

    def _apply(self, topo: dict[str, Any]) -> None:
        self.generation = topo["generation"]
        self.primary = topo["primary"]
        self.canary = tuple(topo["canary"]) if topo["canary"] else None
        self.views = topo["versions"]
        if not self.primary:
            raise RetrievalError(f"retrieval service {self.cfg.service_name!r} serves no index version")
        replicas = {}
        for vid, v in self.views.items():
            v["reps"] = []
            for s, handles in enumerate(v["replicas"]):
                reps = []
                for h in handles:
                    key = h._actor_id.hex()
                    rep = self._replicas.get(key) or _Replica(h, s)
                    replicas[key] = rep
                    reps.append(rep)
                v["reps"].append(reps)
            self._epochs[vid] = max(self._epochs.get(vid, 0), int(v["epoch"]))
        self._replicas = replicas
        p = self.views[self.primary]
        # `version` labels the primary in cache keys; `dim` / `shards` are the single-version view.
        self.version, self.dim = self.primary, int(p["dim"])
        self.shards = [reps[0] for reps in p["replicas"]]

    def _sync(self, force: bool = False) -> None:
        """Pick up version and epoch changes (one small controller call, at most every check_every_s)."""
        import ray

        now = time.perf_counter()
        if not force and self.cfg.check_every_s > 0 and now - self._checked < self.cfg.check_every_s:
            return
        try:
            gen, epochs = ray.get(self.controller.state.remote(), timeout=self.cfg.timeout_s)
        except ray.exceptions.RayError as e:
            raise RetrievalError(f"retrieval service {self.cfg.service_name!r}: controller unreachable "
                                 f"({cause(e)})") from None
        self._note_state(gen, epochs)
        self._checked = now

    def _note_state(self, gen: int, epochs: dict[str, int]) -> None:
        if gen != self.generation:
            self.refresh()
        for vid, e in epochs.items():
            self._epochs[vid] = max(self._epochs.get(vid, 0), int(e))

    def _view(self, version: str | None) -> tuple[str, dict[str, Any]]:
        if version is None:
            vid = self.primary
            if self.canary is not None and self._rng.random() < self.canary[1]:
                vid = self.canary[0]
        else:
            vid = version
        v = self.views.get(vid)
        if v is None:
            raise RetrievalError(f"unknown index version {vid!r}; loaded: {sorted(self.views)}")
        return vid, v

    # ------------------------------------------------------------------ fan-out
    def _pick(self, reps: list[_Replica], tried: set[str], now: float) -> _Replica | None:
        cands = [r for r in reps if r.key not in tried]
        if not cands:
            return None
        healthy = [r for r in cands if r.cool_until <= now] or cands
        low = min(self.m.outstanding[r.key] for r in healthy)
        best = [r for r in healthy if self.m.outstanding[r.key] == low]
        slot = reps[0].key  # round robin per shard among ties
        turn = self._turns[slot] = self._turns.get(slot, -1) + 1
        return best[turn % len(best)]

    def _release_abandoned(self) -> None:
        import ray

        with self._lock:
            abandoned, self._abandoned = self._abandoned, []
        if not abandoned:
            return
        ready, _ = ray.wait([r for r, _ in abandoned], num_returns=len(abandoned), timeout=0)
        done = set(ready)
        keep = []
        for ref, key in abandoned:
            if ref in done:
                self.m.done(key)
            else:
                keep.append((ref, key))
        with self._lock:
            self._abandoned.extend(keep)

    def _fanout(self, vid: str, v: dict[str, Any], q: np.ndarray, k: int, shards: Sequence[int],
                **kw: Any) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """Per-shard answers (shard -> result dict) and the shards no replica answered."""
        import ray

        self._release_abandoned()
        cfg = self.cfg
        q_arg = ray.put(q) if q.nbytes > INLINE_BYTES else q
        pending: dict[Any, tuple[int, _Replica, float]] = {}
        tried: dict[int, set[str]] = {s: set() for s in shards}
        results: dict[int, dict[str, Any]] = {}
        down: set[int] = set()
        t0 = time.perf_counter()
        deadline = t0 + cfg.timeout_s

        def send(s: int, now: float) -> bool:
            rep = self._pick(v["reps"][s], tried[s], now)
            if rep is None:
                return False
            tried[s].add(rep.key)
            pending[rep.handle.query.remote(q_arg, k, **kw)] = (s, rep, now)
            self.m.sent(rep.key)
            return True

        for s in shards:
            if not send(s, t0):
                down.add(s)
        while True:
            now = time.perf_counter()
            open_ = [s for s in shards if s not in results and s not in down]
            if not open_:
                break
            if now >= deadline:
                down.update(open_)
                break
            for s in open_:
                live = [t for (ss, _, t) in pending.values() if ss == s and now - t < cfg.attempt_timeout_s]
                if not live:
                    # Every attempt failed or timed out: hedge on another replica, else the shard is down.
                    if send(s, now):
                        self.m.counters["hedges"] += 1
                    else:
                        down.add(s)
            wait_on = [ref for ref, (s, _, _) in pending.items() if s not in results and s not in down]
            if not wait_on:
                continue
            expiry = min(t + cfg.attempt_timeout_s for ref in wait_on for (_, _, t) in [pending[ref]])
            ready, _ = ray.wait(wait_on, num_returns=1, timeout=max(0.0, min(deadline, expiry) - now))
            for ref in ready:
                s, rep, t_sent = pending.pop(ref)
                self.m.done(rep.key)
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    err = e.cause if hasattr(e, "cause") else None
                    if isinstance(err, (RetrievalError, ConfigError)):
                        self._abandon(pending)
                        raise RetrievalError(str(err)) from None
                    self._failed(rep, s, e)
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                        ray.exceptions.WorkerCrashedError) as e:
                    self._failed(rep, s, e)
                    if s not in results and send(s, time.perf_counter()):
                        self.m.counters["retries"] += 1
                    continue
                if s in results or s in down:
                    continue
                results[s] = r
                self.m.shard(s, time.perf_counter() - t_sent, float(r.get("t", 0.0)))
        self._abandon(pending)
        return results, sorted(down)

    def _failed(self, rep: _Replica, shard: int, e: BaseException) -> None:
        rep.cool_until = time.perf_counter() + 2.0
        self.m.counters["replica_failures"] += 1
        log.warning("retrieval: shard %d replica %s failed (%s); trying another", shard, rep.key[:8], cause(e))

    def _abandon(self, pending: dict[Any, tuple[int, _Replica, float]]) -> None:
        # Unanswered calls still occupy their replica: count them as outstanding until they finish.
        with self._lock:
            self._abandoned.extend((ref, rep.key) for ref, (_, rep, _) in pending.items())

    # ------------------------------------------------------------------ search
    def _check_query(self, vectors: Any, k: Any, v: dict[str, Any], vid: str) -> np.ndarray:
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = int(v["dim"])
        if q.ndim != 2 or q.shape[1] != dim:
            raise RetrievalError(f"query vectors have shape {tuple(q.shape)}; the index has dim {dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RetrievalError(f"k={k!r}: must be a positive integer")
        if not np.isfinite(q).all():
            raise RetrievalError("query vectors contain NaN or inf")
        if k > int(v["count"]) and self.cfg.k_beyond_corpus == "error":
            raise RetrievalError(f"k={k} exceeds the {v['count']} passages of index version {vid}")
        return q

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        filter: dict[str, Any] | Filter | None = None,
        version: str | None = None,
        passages: bool = True,
        texts: list[str] | None = None,
        lexical_k: int = 0,
    ) -> SearchResult:
        """Exact global top-k over all shards (approximate only as far as the index type is)."""
        import ray

        t0 = time.perf_counter()
        state_ref = None
        if self.cfg.check_every_s <= 0 or t0 - self._checked >= self.cfg.check_every_s:
            state_ref = self.controller.state.remote()  # answered while the shards work
        vid, v = self._view(version)
        q = self._check_query(vectors, k, v, vid)
        flt = compile_filter(filter)
        spec = flt.to_spec() if flt is not None else None
        kw = dict(filter=spec, texts=texts, lexical_k=int(lexical_k), passages=passages)
        shards = range(int(v["num_shards"]))
        results, down = self._fanout(vid, v, q, int(k), shards, min_epoch=self._epochs.get(vid, 0), **kw)
        if state_ref is not None:
            try:
                gen, epochs = ray.get(state_ref, timeout=self.cfg.timeout_s)
            except ray.exceptions.RayError as e:
                raise RetrievalError(f"retrieval service {self.cfg.service_name!r}: controller unreachable "
                                     f"({cause(e)})") from None
            self._checked = time.perf_counter()
            if gen != self.generation:
                self._note_state(gen, epochs)
                if version is None and vid not in (self.primary, self.canary and self.canary[0]):
                    return self.search(vectors, k, filter=filter, version=None, passages=passages,
                                       texts=texts, lexical_k=lexical_k)  # the version changed under us
                v = self.views.get(vid, v)
            for ov, e in epochs.items():
                self._epochs[ov] = max(self._epochs.get(ov, 0), int(e))
        # Every shard must answer at one update epoch: re-ask any that answered at an older one.
        target = max([self._epochs.get(vid, 0)] + [r["epoch"] for r in results.values()])
        behind = [s for s, r in results.items() if r["epoch"] != target]
        if behind:
            again, more_down = self._fanout(vid, v, q, int(k), behind, epoch=target, **kw)
            results.update(again)
            down = sorted(set(down) | set(more_down))
            for s in more_down:
                results.pop(s, None)
        self._epochs[vid] = max(self._epochs.get(vid, 0), target)
        if down:
            self.m.counters["partial_results"] += 1
            msg = f"shard(s) {down} of index version {vid}: no replica answered within {self.cfg.timeout_s}s"
            if self.cfg.on_shard_down != "partial":
                raise RetrievalError(msg)
            log.warning("retrieval: %s; returning results flagged partial", msg)
        ordered = [results[s] for s in sorted(results)]  # ties resolve the same way on every call
        keep_max = v.get("metric", "ip") == "ip"
        scores, ids = merge_topk([(r["D"], r["G"]) for r in ordered], int(k), keep_max, len(q))
        payload: dict[int, dict[str, Any]] = {}
        if passages:
            for r in ordered:
                payload.update(r["payload"])
        lex = None
        if lexical_k > 0:
            lex = merge_topk([(r["LS"], r["LG"]) for r in ordered], int(lexical_k), True, len(q))[1]
        rows = [[payload[int(g)] for g in row if g >= 0] for row in ids] if passages else []
        dt = time.perf_counter() - t0
        self.m.call(len(q), dt)
        self.m.by_version[vid] += len(q)
        self.last_partial = bool(down)
        return SearchResult(scores, ids, rows, partial=bool(down), missing_shards=list(down), version=vid,
                            epoch=target, lexical_ids=lex, payload=payload)

    # ------------------------------------------------------------------ text in, passages out
    def _mode(self) -> tuple:
        h, r = self.cfg.hybrid, self.cfg.rerank
        mode = retrieval_mode(self.cfg)
        return (
            (mode, h.dense_weight, h.lexical_weight, h.rrf_k, h.depth) if mode == "hybrid" else (mode,),
            ("rerank", r.model, r.top_n) if r.model else (),
        )

    def _route(self, norm: str) -> str:
        # Sticky per query text: a question always meets the same version during a canary.
        if self.canary is not None and zlib.crc32(norm.encode()) / 2**32 < self.canary[1]:
            return self.canary[0]
        return self.primary

    def retrieve(self, questions: list[str], k: int, *, filter: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:
        """Text in, passages out; hybrid / re-ranked by config; cached by (query, encoder, version, epoch, …)."""
        if self.embedder is None:
            raise RetrievalError("this client has no query embedder; pass one or call search() with vectors")
        flt = compile_filter(filter)
        fkey = flt.key if flt is not None else ""
        if self.cfg.cache_size:
            self._sync()
        norms = [normalize_query(q) for q in questions]
        routes = [self._route(n) for n in norms]
        mode = self._mode()

        def key(i: int, vid: str) -> tuple:
            label = self.version if vid == self.primary else vid
            return (norms[i], self.embedder.name, label, self._epochs.get(vid, 0), int(k), fkey, mode)

        out: list[list[dict[str, Any]] | None] = [None] * len(questions)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, vid in enumerate(routes):
                hit = self._cache.get(key(i, vid)) if self.cfg.cache_size else None
                if hit is not None:
                    self._cache.move_to_end(key(i, vid))
                    out[i] = hit
                    self.m.counters["cache_hits"] += 1
                else:
                    missing.setdefault(vid, []).append(i)
                    self.m.counters["cache_misses"] += 1
        partial = False
        for vid, idx in missing.items():
            got, res_partial = self._retrieve_uncached([questions[i] for i in idx], int(k), flt, vid)
            partial |= res_partial
            with self._lock:
                for i, ps in zip(idx, got):
                    out[i] = ps
                    if self.cfg.cache_size and not res_partial:  # a partial answer is never remembered
                        self._cache[key(i, vid)] = ps
                        while len(self._cache) > self.cfg.cache_size:
                            self._cache.popitem(last=False)
        self.last_partial = partial
        return out  # type: ignore[return-value]

    def _retrieve_uncached(self, questions: list[str], k: int, flt: Filter | None, vid: str
                           ) -> tuple[list[list[dict[str, Any]]], bool]:
        want = self.views[vid].get("embedder")
        if want and want != self.embedder.name:
            raise RetrievalError(
                f"index version {vid} was embedded with {want}; this client encodes queries with {self.embedder.name}"
            )
        h, r = self.cfg.hybrid, self.cfg.rerank
        mode = retrieval_mode(self.cfg)
        n_cand = max(k, r.top_n) if r.model else k
        if mode == "auto":
            raise RetrievalError("retrieval.mode=auto is resolved once before use "
                                 "(ragdist.retrieval.select.resolve_mode); this client was given it unresolved")
        if mode == "bm25":
            # The shards answer a dense and a lexical list in one call; the dense one is not used here,
            # so a zero query (k=1) keeps it cheap and the encoder out of the way.
            zeros = np.zeros((len(questions), int(self.views[vid]["dim"])), np.float32)
            res = self.search(zeros, 1, filter=flt, version=vid, texts=questions, lexical_k=n_cand)
            cands = [[res.payload[int(g)] for g in row if g >= 0] for row in res.lexical_ids]
        elif mode == "hybrid":
            depth = max(n_cand, h.depth)
            vecs = self.embedder.encode(questions)
            res = self.search(vecs, depth, filter=flt, version=vid, texts=questions, lexical_k=depth)
            cands = [
                [res.payload[g] for g in fused[:n_cand]]
                for fused in rrf_fuse(res.ids, res.lexical_ids, h.dense_weight, h.lexical_weight, h.rrf_k)
            ]
        else:
            res = self.search(self.embedder.encode(questions), n_cand, filter=flt, version=vid)
            cands = res.passages
        if r.model:
            return self.reranker().rerank(questions, cands, k), res.partial
        return [c[:k] for c in cands], res.partial

    def reranker(self) -> Any:
        if self._reranker is None:
            from ragdist.retrieval.rerank import CrossEncoderReranker

            r = self.cfg.rerank
            self._reranker = CrossEncoderReranker(r.model, batch_size=r.batch_size, max_length=r.max_length,
                                                  threads=r.threads)
        return self._reranker

    # ------------------------------------------------------------------ versions and updates
    def _admin(self, ref: Any) -> Any:
        import ray

        try:
            out = ray.get(ref, timeout=max(self.cfg.timeout_s, 120))
        except ray.exceptions.RayError as e:
            raise RetrievalError(cause(e)) from None
        self.refresh()
        return out

    def load_version(self, snapshot: str, *, primary: bool = False) -> str:
        """Load another snapshot version beside the current one; returns its version id."""
        return self._admin(self.controller.load.remote(str(snapshot), primary))

    def set_canary(self, version: str, fraction: float) -> None:
        self._admin(self.controller.set_canary.remote(version, float(fraction)))

    def promote(self, version: str | None = None) -> str:
        return self._admin(self.controller.promote.remote(version))

    def rollback(self) -> str:
        return self._admin(self.controller.rollback.remote())

    def unload(self, version: str) -> None:
        self._admin(self.controller.unload.remote(version))

    def compact(self, version: str | None = None, *, promote: bool = True) -> dict[str, Any]:
        """Write the streaming updates into a new snapshot version and (default) serve it instead."""
        return self._admin(self.controller.compact.remote(version, promote))

    def versions(self) -> dict[str, Any]:
        self.refresh()
        return {
            "primary": self.primary,
            "canary": self.canary,
            "versions": {vid: {k: v[k] for k in ("snapshot", "dim", "embedder", "num_shards", "count", "epoch")}
                         for vid, v in self.views.items()},
        }

    def upsert(self, chunks: Sequence[Any], vectors: np.ndarray, *, ts: float | None = None,
               version: str | None = None) -> dict[str, Any]:
        """Add or replace chunks (by chunk id) with their vectors, as one atomic update epoch."""
        return self.update(upsert=chunks, vectors=vectors, ts=ts, version=version)

    def delete(self, ids: Sequence[str] = (), *, doc_ids: Sequence[str] = (), ts: float | None = None,
               version: str | None = None) -> dict[str, Any]:
        """Delete chunks by id and/or whole documents; honoured by every query that starts after this returns."""
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
        vid, v = self._view(version or self.primary)
        rows = [_row(c, i) for i, c in enumerate(upsert)]
        vecs = None
        if rows:
            if vectors is None:
                raise RetrievalError(f"upsert: {len(rows)} chunks but no vectors")
            vecs = np.ascontiguousarray(vectors, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape != (len(rows), int(v["dim"])):
                raise RetrievalError(
                    f"upsert: vectors have shape {tuple(vecs.shape)}; expected ({len(rows)}, {v['dim']})"
                )
            if not np.isfinite(vecs).all():
                raise RetrievalError("upsert: vectors contain NaN or inf")
        ids = [str(i) for i in delete_ids]
        docs = [str(d) for d in delete_doc_ids]
        out = self._admin(self.controller.update.remote(vid, rows, vecs, ids, docs, ts))
        self._epochs[vid] = max(self._epochs.get(vid, 0), int(out["epoch"]))
        return out

    # ------------------------------------------------------------------ metrics
    @property
    def stats(self) -> dict[str, Any]:
        c = self.m.counters
        return {"calls": c["calls"], "queries": c["queries"], "cache_hits": c["cache_hits"],
                "latency_s": [x[2] for x in self.m.calls]}

    def metrics(self, *, replicas: bool = False) -> dict[str, Any]:
        """Client-side latency per shard (p50/p95/p99), QPS, queue depth, cache hit rate, hottest shard.

        `replicas=True` adds each replica's own counters (calls, busy time, backend, epoch, alive).
        """
        import ray

        out = self.m.summary()
        out["cache_entries"] = len(self._cache)
        if replicas:
            out["replicas"] = ray.get(self.controller.replica_info.remote(), timeout=self.cfg.timeout_s)
        return out


def flat_metrics(m: dict[str, Any], prefix: str = "retrieval/") -> dict[str, float]:
    """`RetrievalClient.metrics()` as flat scalars, for a metrics logger (wandb, JSONL)."""
    out = {f"{prefix}{k}": float(m[k]) for k in ("qps", "cache_hit_rate", "max_queue_depth", "retries", "hedges",
                                                   "replica_failures", "partial_results") if k in m}
    for p, v in m.get("latency_ms", {}).items():
        out[f"{prefix}latency_{p}_ms"] = float(v)
    for s, sm in m.get("shards", {}).items():
        for p, v in sm["rtt_ms"].items():
            out[f"{prefix}shard{s}/{p}_ms"] = float(v)
    if m.get("hottest_shard") is not None:
        out[f"{prefix}hottest_shard"] = float(m["hottest_shard"])
    return out


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


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, keep_max: bool, nq: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k of per-shard (scores, ids) lists, padded like FAISS (-1 ids).

    The same answer as `faiss.ResultHeap`, in numpy: the heap's OpenMP loops cost milliseconds per
    call when the client's cores are busy (training ranks), far more than this sort of k x shards.
    """
    pad = np.finfo(np.float32).min if keep_max else np.finfo(np.float32).max
    if not parts:
        return np.full((nq, k), pad, np.float32), np.full((nq, k), -1, np.int64)
    D = np.concatenate([np.asarray(p[0], np.float32) for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p[1], np.int64) for p in parts], axis=1)
    key = np.where(ids < 0, np.inf, -D if keep_max else D)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    D = np.take_along_axis(D, order, 1)
    ids = np.take_along_axis(ids, order, 1)
    D = np.where(ids < 0, pad, D).astype(np.float32)
    if ids.shape[1] < k:
        extra = k - ids.shape[1]
        D = np.pad(D, ((0, 0), (0, extra)), constant_values=pad)
        ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=-1)
    return np.ascontiguousarray(D), np.ascontiguousarray(ids)


def rrf_fuse(dense: np.ndarray, lexical: np.ndarray | None, w_dense: float, w_lex: float, rrf_k: int
             ) -> list[list[int]]:
    """Reciprocal-rank fusion of two ranked id lists per query: sum of weight / (rrf_k + rank)."""
    out = []
    for i in range(len(dense)):
        score: dict[int, float] = {}
        first: dict[int, int] = {}
        for w, row in ((w_dense, dense[i]), (w_lex, lexical[i] if lexical is not None else ())):
            for rank, g in enumerate(row, start=1):
                g = int(g)
                if g < 0:
                    continue
                score[g] = score.get(g, 0.0) + w / (rrf_k + rank)
                first.setdefault(g, len(first))
        out.append(sorted(score, key=lambda g: (-score[g], first[g])))
    return out
