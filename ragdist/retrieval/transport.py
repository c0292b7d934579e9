"""Talking to shard replicas: replica choice, retries, hedging, the deadline, and the exact top-k merge.

    t = Transport(cfg)
    answers, down = t.fanout(replicas, q, k, shards, min_epoch=e, ...)   # shard -> answer
    answers, down, epoch = t.at_one_epoch(replicas, q, k, known_epoch, ...)
    scores, ids = merge_topk([(a["D"], a["G"]) for a in answers.values()], k, keep_max, nq)

Each shard call goes to the replica with the fewest calls outstanding from this client, skipping
replicas that failed recently. A call that fails is retried on another replica at once; one that
takes longer than `attempt_timeout_s` is hedged to another replica (first answer wins). A replica
that has not applied the epoch asked for says so at once and is asked again shortly (the update is
on its way to it). A shard no replica answered before the deadline is returned in `down`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ragdist.errors import ConfigError, RetrievalError, cause
from ragdist.retrieval.config import RetrievalConfig
from ragdist.retrieval.metrics import ServiceMetrics

log = logging.getLogger(__name__)

# Ray passes arguments under ~100 KiB inside the call message; a bigger query batch is put in the
# object store once and the same reference handed to every shard.
INLINE_BYTES = 96 * 1024
BEHIND_WAIT_S = (0.002, 0.05)  # first and longest pause before asking a lagging shard again


class Replica:
    __slots__ = ("handle", "key", "shard", "cool_until")

    def __init__(self, handle: Any, key: str, shard: int):
        self.handle = handle
        self.key = key
        self.shard = shard
        self.cool_until = 0.0


class Transport:
    """Fan-out to one replica of each shard, with this client's load, failure and latency books."""

    def __init__(self, cfg: RetrievalConfig):
        self.cfg = cfg
        self.m = ServiceMetrics(cfg.metrics_window)
        self._turns: dict[str, int] = {}
        self._abandoned: list[tuple[Any, str]] = []
        self._lock = threading.Lock()

    def _pick(self, reps: list[Replica], tried: set[str], now: float) -> Replica | None:
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

    def _abandon(self, pending: dict[Any, tuple[int, Replica, float]]) -> None:
        # Unanswered calls still occupy their replica: count them as outstanding until they finish.
        with self._lock:
            self._abandoned.extend((ref, rep.key) for ref, (_, rep, _) in pending.items())

    def _failed(self, rep: Replica, shard: int, e: BaseException) -> None:
        rep.cool_until = time.perf_counter() + 2.0
        self.m.counters["replica_failures"] += 1
        log.warning(
            "retrieval: shard %d replica %s failed (%s); trying another", shard, rep.key[:8], cause(e)
        )

    def fanout(
        self, replicas: list[list[Replica]], q: np.ndarray, k: int, shards: Sequence[int], **kw: Any
    ) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """Per-shard answers (shard -> ShardServer.query's dict) and the shards no replica answered."""
        import ray

        self._release_abandoned()
        cfg = self.cfg
        q_arg = ray.put(q) if q.nbytes > INLINE_BYTES else q
        pending: dict[Any, tuple[int, Replica, float]] = {}
        tried: dict[int, set[str]] = {s: set() for s in shards}
        not_before: dict[int, float] = {s: 0.0 for s in shards}
        lagged: dict[int, int] = {s: 0 for s in shards}
        results: dict[int, dict[str, Any]] = {}
        down: set[int] = set()
        t0 = time.perf_counter()
        deadline = t0 + cfg.timeout_s

        def send(s: int, now: float) -> bool:
            rep = self._pick(replicas[s], tried[s], now)
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
            idle = []
            for s in open_:
                if any(ss == s and now - t < cfg.attempt_timeout_s for (ss, _, t) in pending.values()):
                    continue
                if now < not_before[s]:
                    idle.append(s)  # a lagging shard, asked again in a moment
                    continue
                # Every attempt failed, timed out or lagged: hedge on another replica, else the shard is down.
                hedge = not lagged[s]
                if send(s, now):
                    self.m.counters["hedges" if hedge else "lagging_retries"] += 1
                else:
                    down.add(s)
            wait_on = [ref for ref, (s, _, _) in pending.items() if s not in results and s not in down]
            wake = min(
                [deadline]
                + [pending[r][2] + cfg.attempt_timeout_s for r in wait_on]
                + [not_before[s] for s in idle]
            )
            if not wait_on:
                if idle:
                    time.sleep(max(0.0, wake - now))
                continue
            ready, _ = ray.wait(wait_on, num_returns=1, timeout=max(0.0, wake - now))
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
                except (
                    ray.exceptions.RayActorError,
                    ray.exceptions.ObjectLostError,
                    ray.exceptions.WorkerCrashedError,
                ) as e:
                    self._failed(rep, s, e)
                    if s not in results and send(s, time.perf_counter()):
                        self.m.counters["retries"] += 1
                    continue
                if s in results or s in down:
                    continue
                if "behind" in r:
                    # Not an error: this replica has not applied the epoch yet. Any replica may answer next.
                    tried[s].discard(rep.key)
                    lo, hi = BEHIND_WAIT_S
                    not_before[s] = time.perf_counter() + min(hi, lo * 2 ** lagged[s])
                    lagged[s] += 1
                    continue
                results[s] = r
                self.m.shard(s, time.perf_counter() - t_sent, float(r.get("t", 0.0)))
        self._abandon(pending)
        return results, sorted(down)

    def at_one_epoch(
        self, replicas: list[list[Replica]], q: np.ndarray, k: int, known_epoch: int, **kw: Any
    ) -> tuple[dict[int, dict[str, Any]], list[int], int]:
        """Every shard's answer at one update epoch (the newest any of them answered at), so that no
        query sees half of an update; returns (answers, shards down, that epoch)."""
        results, down = self.fanout(replicas, q, k, range(len(replicas)), min_epoch=known_epoch, **kw)
        target = max([known_epoch] + [r["epoch"] for r in results.values()])
        behind = [s for s, r in results.items() if r["epoch"] != target]
        if behind:
            again, more_down = self.fanout(replicas, q, k, behind, epoch=target, **kw)
            results.update(again)
            for s in more_down:
                results.pop(s, None)
            down = sorted(set(down) | set(more_down))
        return results, down, target

    def probe(self, replicas: list[list[Replica]]) -> tuple[int, int] | None:
        """(generation, epoch) from one replica: is an all-cached answer still current? None: no answer."""
        import ray

        now = time.perf_counter()
        shard = int(np.argmin([sum(self.m.outstanding[r.key] for r in reps) for reps in replicas]))
        tried: set[str] = set()
        while (rep := self._pick(replicas[shard], tried, now)) is not None:
            tried.add(rep.key)
            try:
                gen, epoch = ray.get(rep.handle.state.remote(), timeout=self.cfg.attempt_timeout_s)
                self.m.counters["probes"] += 1
                return int(gen), int(epoch)
            except ray.exceptions.RayError as e:
                self._failed(rep, shard, e)
        return None


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, keep_max: bool, nq: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k of per-shard (scores, ids) lists, padded like FAISS (-1 ids).

    The same answer as `faiss.ResultHeap` (tests/test_retrieval.py checks it), in numpy: the heap's
    OpenMP loops cost milliseconds per call when the client's cores are busy (training ranks), far
    more than this sort of k x shards. Ties keep the shard order, so every call resolves them alike.
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
