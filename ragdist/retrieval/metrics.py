"""Client-side service metrics: latency percentiles per shard, QPS, queue depth, cache hit rate."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

import numpy as np


def percentiles_ms(values: Any) -> dict[str, float]:
    if not len(values):
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    p = np.percentile(np.asarray(values, np.float64) * 1000.0, [50, 95, 99])
    return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}


class ServiceMetrics:
    """Bounded windows (the last `window` events of each kind), so a long run costs fixed memory."""

    def __init__(self, window: int = 2048):
        self.window = window
        self.calls: deque[tuple[float, int, float]] = deque(maxlen=window)  # (end time, queries, seconds)
        self.shard_rtt: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.shard_busy: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.outstanding: dict[str, int] = defaultdict(int)
        self.max_outstanding: dict[str, int] = defaultdict(int)
        self.counters: dict[str, int] = defaultdict(int)
        self.by_version: dict[str, int] = defaultdict(int)

    def call(self, queries: int, seconds: float) -> None:
        self.calls.append((time.perf_counter(), queries, seconds))
        self.counters["calls"] += 1
        self.counters["queries"] += queries

    def shard(self, shard: int, rtt: float, busy: float) -> None:
        self.shard_rtt[shard].append(rtt)
        self.shard_busy[shard].append(busy)

    def sent(self, replica: str) -> None:
        self.outstanding[replica] += 1
        self.max_outstanding[replica] = max(self.max_outstanding[replica], self.outstanding[replica])

    def done(self, replica: str) -> None:
        self.outstanding[replica] = max(0, self.outstanding[replica] - 1)

    def qps(self) -> float:
        if not self.calls:
            return 0.0
        first_end, _, first_s = self.calls[0]
        last_end = self.calls[-1][0]
        span = last_end - (first_end - first_s)
        return sum(c[1] for c in self.calls) / span if span > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        c = self.counters
        lookups = c["cache_hits"] + c["cache_misses"]
        busy = {s: float(np.sum(v)) for s, v in self.shard_busy.items()}
        hottest = max(busy, key=busy.get) if busy else None
        total_busy = sum(busy.values())
        return {
            "calls": c["calls"],
            "queries": c["queries"],
            "qps": round(self.qps(), 2),
            "latency_ms": percentiles_ms([x[2] for x in self.calls]),
            "shards": {
                s: {"rtt_ms": percentiles_ms(self.shard_rtt[s]), "busy_ms": percentiles_ms(self.shard_busy[s]),
                    "calls": len(self.shard_rtt[s])}
                for s in sorted(self.shard_rtt)
            },
            "queue_depth": dict(self.outstanding),
            "max_queue_depth": max(self.max_outstanding.values(), default=0),
            "cache_hit_rate": round(c["cache_hits"] / lookups, 4) if lookups else 0.0,
            "cache_hits": c["cache_hits"],
            "hottest_shard": hottest,
            "hottest_shard_busy_share": round(busy[hottest] / total_busy, 4) if hottest is not None and total_busy else 0.0,
            "retries": c["retries"],
            "hedges": c["hedges"],
            "replica_failures": c["replica_failures"],
            "partial_results": c["partial_results"],
            "lagging_retries": c["lagging_retries"],  # shards asked again because they were behind an epoch
            "freshness_probes": c["probes"],  # all-cached answers checked with one replica
            "queries_by_version": dict(self.by_version),
        }


def flat_metrics(m: dict[str, Any], prefix: str = "retrieval/") -> dict[str, float]:
    """`ShardedRetriever.metrics()` as flat scalars, for a metrics logger (wandb, JSONL)."""
    out = {f"{prefix}{k}": float(m[k]) for k in ("qps", "cache_hit_rate", "max_queue_depth", "retries", "hedges",
                                                   "replica_failures", "partial_results", "controller_calls")
           if k in m}
    for p, v in m.get("latency_ms", {}).items():
        out[f"{prefix}latency_{p}_ms"] = float(v)
    for s, sm in m.get("shards", {}).items():
        for p, v in sm["rtt_ms"].items():
            out[f"{prefix}shard{s}/{p}_ms"] = float(v)
    if m.get("hottest_shard") is not None:
        out[f"{prefix}hottest_shard"] = float(m["hottest_shard"])
    return out
