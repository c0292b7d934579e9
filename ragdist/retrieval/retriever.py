"""Text in, passages out, through the sharded service: embed, cache, hybrid, re-rank, pinned version.

    retriever = ShardedRetriever(cfg, embedder)       # in every training rank (RetrievalClient: same)
    retriever.retrieve(questions, k)                  # the `Retriever` protocol (ragdist.retrieval.api)
    retriever.retrieve(questions, k, version=v, vectors=q)   # pinned version, caller's query vectors
    retriever.retrieve(questions, k, filter={"source": "wiki"})
    retriever.search(vectors, k) -> SearchResult      # vectors in: ids, scores, passages, partial flag
    retriever.metrics()                               # latency per shard, QPS, queue depth, cache hit rate

A search costs no controller call while nothing changes: shards' answers carry the topology
generation and the update epoch (see view.py). An answer served whole from the cache is checked
with one shard replica (its generation and epoch) unless `check_every_s` says the view is fresh.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from typing import Any

import numpy as np

from ragdist.errors import RetrievalError
from ragdist.retrieval.api import Passage, SearchResult
from ragdist.retrieval.config import RetrievalConfig, retrieval_mode
from ragdist.retrieval.server.filters import Filter, compile_filter
from ragdist.retrieval.transport import Transport, merge_topk
from ragdist.retrieval.view import ServiceView, VersionRoute, connect
from ragdist.utils.cache import LRU

log = logging.getLogger(__name__)


def normalize_query(q: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", q)).strip().lower()


class _Rerouted(Exception):
    """The version a text call was routed to is no longer where such a call goes: route it again."""


class ShardedRetriever:
    """The `Retriever` of the Ray service: fans each batch out to every shard, merges the exact top-k."""

    def __init__(
        self,
        cfg: RetrievalConfig,
        embedder: Any | None = None,
        *,
        view: ServiceView | None = None,
        index_embedder: str | None = None,
    ):
        """`index_embedder`: the passage encoder this query encoder pairs with, when they differ (a
        query tower trained against a frozen passage index); by default the query encoder's own name,
        and a version embedded by anything else is refused."""
        self.cfg = cfg
        self.embedder = embedder
        self.index_embedder = index_embedder
        self.view = view or ServiceView(connect(cfg), cfg)
        self.transport = Transport(cfg)
        self.m = self.transport.m
        self.cache = LRU(cfg.cache_size)
        self._reranker: Any = None
        self.last_partial = False

    @property
    def version(self) -> str:
        """The index version an unpinned call is served from (the primary)."""
        return self.view.primary

    # ------------------------------------------------------------------ vectors in
    def _check_query(self, vectors: Any, k: Any, v: VersionRoute) -> np.ndarray:
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != v.dim:
            raise RetrievalError(f"query vectors have shape {tuple(q.shape)}; the index has dim {v.dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RetrievalError(f"k={k!r}: must be a positive integer")
        if not np.isfinite(q).all():
            raise RetrievalError("query vectors contain NaN or inf")
        if k > v.count and self.cfg.k_beyond_corpus == "error":
            raise RetrievalError(f"k={k} exceeds the {v.count} passages of index version {v.vid}")
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
        _routed: bool = False,
    ) -> SearchResult:
        """Exact global top-k over all shards (approximate only as far as the index type is).

        `version` pins a loaded version; else the primary answers, or the canary for its share of calls.
        """
        t0 = time.perf_counter()
        flt = compile_filter(filter)
        kw = dict(
            filter=flt.to_spec() if flt is not None else None,
            texts=texts,
            lexical_k=int(lexical_k),
            passages=passages,
        )
        for attempt in (0, 1):
            v = self.view.route(version)
            q = self._check_query(vectors, k, v)
            results, down, epoch = self.transport.at_one_epoch(
                v.replicas, q, int(k), self.view.epoch(v.vid), **kw
            )
            gen = max((int(r.get("gen", 0)) for r in results.values()), default=0)
            stale = self.view.note(v.vid, gen, epoch if results else None)
            if attempt == 0 and (stale or down):
                # A newer topology, or shards that did not answer (their version may be gone): one
                # controller round trip, and ask again where this call would now go.
                gen0, routes0 = self.view.generation, (self.view.primary, self.view.canary)
                self.view.refresh()
                gone = v.vid not in self.view.versions
                rerouted = (self.view.primary, self.view.canary) != routes0 or not self.view.routable(v.vid)
                moved = (version is None or _routed) and rerouted
                if _routed and (moved or gone):
                    raise _Rerouted
                if gone and version is not None:
                    raise RetrievalError(
                        f"unknown index version {v.vid!r} (no longer loaded); loaded: "
                        f"{sorted(self.view.versions)}"
                    )
                if moved or gone or (down and self.view.generation != gen0):
                    continue
            break
        if down:
            self.m.counters["partial_results"] += 1
            msg = (
                f"shard(s) {down} of index version {v.vid}: no replica answered within {self.cfg.timeout_s}s"
            )
            if self.cfg.on_shard_down != "partial":
                raise RetrievalError(msg)
            log.warning("retrieval: %s; returning results flagged partial", msg)
        ordered = [results[s] for s in sorted(results)]  # ties resolve the same way on every call
        scores, ids = merge_topk([(r["D"], r["G"]) for r in ordered], int(k), v.metric == "ip", len(q))
        payload: dict[int, Passage] = {}
        if passages:
            for r in ordered:
                payload.update(r["payload"])
        lex = None
        if lexical_k > 0:
            lex = merge_topk([(r["LS"], r["LG"]) for r in ordered], int(lexical_k), True, len(q))[1]
        # Each passage carries its score (a copy: the payload dicts are shared), which evaluation turns
        # into the retriever's p(passage | question) when a model reads the passages one at a time.
        rows = (
            [[dict(payload[int(g)], score=float(s)) for g, s in zip(row, srow) if g >= 0] for row, srow in zip(ids, scores)]
            if passages
            else []
        )
        self.m.call(len(q), time.perf_counter() - t0)
        self.m.by_version[v.vid] += len(q)
        self.last_partial = bool(down)
        return SearchResult(
            scores,
            ids,
            rows,
            partial=bool(down),
            missing_shards=list(down),
            version=v.vid,
            epoch=epoch,
            lexical_ids=lex,
            payload=payload,
        )

    # ------------------------------------------------------------------ text in
    def _mode(self) -> tuple:
        h, r = self.cfg.hybrid, self.cfg.rerank
        mode = retrieval_mode(self.cfg)
        return (
            (mode, h.dense_weight, h.lexical_weight, h.rrf_k, h.depth) if mode == "hybrid" else (mode,),
            ("rerank", r.model, r.top_n) if r.model else (),
        )

    def retrieve(
        self,
        questions: list[str],
        k: int,
        version: str | None = None,
        vectors: np.ndarray | None = None,
        *,
        filter: dict[str, Any] | None = None,
    ) -> list[list[Passage]]:
        """Text in, passages out; hybrid / re-ranked by config; cached by (query, encoder, version, epoch…).

        `version` pins a loaded version (no canary draw). `vectors`: the questions' query vectors,
        computed by the caller; the embedder is not called and the cache is neither read nor written.
        """
        questions = list(questions)
        if vectors is not None:
            vectors = np.asarray(vectors)
            if vectors.ndim != 2 or len(vectors) != len(questions):
                raise RetrievalError(
                    f"vectors have shape {tuple(vectors.shape)}; expected one row per "
                    f"question ({len(questions)})"
                )
        elif self.embedder is None:
            raise RetrievalError("this retriever has no query embedder; pass vectors= or one at construction")
        flt = compile_filter(filter)
        norms = [normalize_query(q) for q in questions]
        for _ in range(3):
            try:
                return self._retrieve(questions, norms, int(k), version, vectors, flt)
            except _Rerouted:
                continue  # the version this call was routed to was promoted away or unloaded meanwhile
        raise RetrievalError(
            f"retrieval service {self.cfg.service_name!r}: its versions kept changing during "
            "the call; try again"
        )

    def _retrieve(
        self,
        questions: list[str],
        norms: list[str],
        k: int,
        version: str | None,
        vectors: np.ndarray | None,
        flt: Filter | None,
    ) -> list[list[Passage]]:
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(norms):
            groups.setdefault(self.view.route(version, n).vid, []).append(i)
        use_cache = vectors is None and self.cache.maxsize > 0
        out: list[list[Passage] | None] = [None] * len(questions)
        partial = False
        for vid, idx in groups.items():
            pinned = version is not None
            if not use_cache:
                got, p = self._uncached(
                    [questions[i] for i in idx],
                    k,
                    flt,
                    vid,
                    pinned,
                    None if vectors is None else vectors[idx],
                )
                partial |= p
                for i, ps in zip(idx, got):
                    out[i] = ps
                continue
            hits = {i: self.cache.get(self._key(norms[i], vid, k, flt)) for i in idx}
            todo = [i for i in idx if hits[i] is None]
            if todo:
                e0 = self.view.epoch(vid)
                got, p = self._uncached([questions[i] for i in todo], k, flt, vid, pinned)
                if self.view.epoch(vid) != e0 and len(todo) < len(idx):
                    todo = idx  # the search met a newer epoch: the hits were written at the old one
                    got, p = self._uncached([questions[i] for i in todo], k, flt, vid, pinned)
            elif not self._fresh(vid, pinned):
                todo = idx  # an update landed since these entries were written
                got, p = self._uncached([questions[i] for i in todo], k, flt, vid, pinned)
            else:
                got, p = [], False
            partial |= p
            for i, ps in zip(todo, got):
                out[i] = ps
                if not p:  # a partial answer is never remembered
                    self.cache.put(self._key(norms[i], vid, k, flt), ps)
            n_hit = len(idx) - len(todo)
            self.m.counters["cache_hits"] += n_hit
            self.m.counters["cache_misses"] += len(todo)
            for i in idx:
                if out[i] is None:
                    out[i] = hits[i]
        self.last_partial = partial
        return out  # type: ignore[return-value]

    def _key(self, norm: str, vid: str, k: int, flt: Filter | None) -> tuple:
        return (
            norm,
            self.embedder.name,
            vid,
            self.view.epoch(vid),
            k,
            flt.key if flt is not None else "",
            self._mode(),
        )

    def _fresh(self, vid: str, pinned: bool) -> bool:
        """May an all-cached answer from `vid` be served? One shard replica's (generation, epoch) says."""
        if self.cfg.check_every_s > 0 and time.perf_counter() - self.view.confirmed < self.cfg.check_every_s:
            return True
        state = self.transport.probe(self.view.versions[vid].replicas)
        if state is None:
            return False  # no replica answered: the search that follows sorts it out
        gen, epoch = state
        known = self.view.epoch(vid)
        if self.view.note(vid, gen, epoch):
            before = self.view.primary, self.view.canary
            self.view.refresh()
            if not pinned and (
                (self.view.primary, self.view.canary) != before or not self.view.routable(vid)
            ):
                raise _Rerouted
        return epoch <= known and vid in self.view.versions

    def _uncached(
        self,
        questions: list[str],
        k: int,
        flt: Filter | None,
        vid: str,
        pinned: bool,
        vecs: np.ndarray | None = None,
    ) -> tuple[list[list[Passage]], bool]:
        v = self.view.versions.get(vid)
        if v is None:
            if not pinned:
                raise _Rerouted
            raise RetrievalError(
                f"unknown index version {vid!r} (no longer loaded); loaded: {sorted(self.view.versions)}"
            )
        mode = retrieval_mode(self.cfg)
        if mode == "auto":
            raise RetrievalError("retrieval.mode=auto is resolved once before use "
                                 "(ragdist.retrieval.select.resolve_mode); this retriever was given it unresolved")
        if vecs is None and mode != "bm25":
            pairs_with = self.index_embedder or self.embedder.name
            if v.embedder and v.embedder != pairs_with:
                raise RetrievalError(
                    f"index version {vid} was embedded with {v.embedder}; this client encodes "
                    f"queries with {self.embedder.name}"
                    + (f" for passages embedded with {pairs_with}" if self.index_embedder else "")
                )
            vecs = self.embedder.encode(questions)
        h, r = self.cfg.hybrid, self.cfg.rerank
        n_cand = max(k, r.top_n) if r.model else k
        if mode == "bm25":
            # The shards answer a dense and a lexical list in one call; the dense one is not used here,
            # so a zero query (k=1) keeps it cheap and the encoder out of the way.
            zeros = np.zeros((len(questions), v.dim), np.float32)
            res = self.search(zeros, 1, filter=flt, version=vid, texts=questions, lexical_k=n_cand, _routed=not pinned)
            cands = [[res.payload[int(g)] for g in row if g >= 0] for row in res.lexical_ids]
        elif mode == "hybrid":
            depth = max(n_cand, h.depth)
            res = self.search(
                vecs, depth, filter=flt, version=vid, texts=questions, lexical_k=depth, _routed=not pinned
            )
            cands = [
                [res.payload[g] for g in fused[:n_cand]]
                for fused in rrf_fuse(res.ids, res.lexical_ids, h.dense_weight, h.lexical_weight, h.rrf_k)
            ]
        else:
            res = self.search(vecs, n_cand, filter=flt, version=vid, _routed=not pinned)
            cands = res.passages
        if r.model:
            return self.reranker().rerank(questions, cands, k), res.partial
        return [c[:k] for c in cands], res.partial

    def reranker(self) -> Any:
        if self._reranker is None:
            from ragdist.retrieval.rerank import CrossEncoderReranker

            r = self.cfg.rerank
            self._reranker = CrossEncoderReranker(
                r.model, batch_size=r.batch_size, max_length=r.max_length, threads=r.threads
            )
        return self._reranker

    # ------------------------------------------------------------------ metrics
    @property
    def stats(self) -> dict[str, Any]:
        c = self.m.counters
        return {
            "calls": c["calls"],
            "queries": c["queries"],
            "cache_hits": c["cache_hits"],
            "latency_s": [x[2] for x in self.m.calls],
        }

    def metrics(self, *, replicas: bool = False) -> dict[str, Any]:
        """Client-side latency per shard (p50/p95/p99), QPS, queue depth, cache hit rate, hottest shard,
        controller round trips. `replicas=True` adds each replica's own counters (calls, busy time,
        backend, epoch, alive)."""
        import ray

        out = self.m.summary()
        out["cache_entries"] = len(self.cache)
        out["controller_calls"] = self.view.controller_calls
        if replicas:
            out["replicas"] = ray.get(self.view.controller.replica_info.remote(), timeout=self.cfg.timeout_s)
        return out


def rrf_fuse(
    dense: np.ndarray, lexical: np.ndarray | None, w_dense: float, w_lex: float, rrf_k: int
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
