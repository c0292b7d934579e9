"""A shard server: one FAISS shard and its passage metadata, loaded from a verified snapshot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import IndexError_, RetrievalError
from ragdist.index.snapshot import read_manifest, verify_file


class ShardServer:
    """Plain class so it can be tested in-process; the service wraps it with `ray.remote`."""

    def __init__(self, snapshot: str, shard_id: int, *, nprobe: int = 16, efsearch: int = 64, threads: int = 1):
        import faiss
        import pyarrow.parquet as pq

        self.snapshot = Path(snapshot)
        self.manifest = read_manifest(self.snapshot)
        shards = self.manifest["shards"]
        if not 0 <= shard_id < len(shards):
            raise IndexError_(f"{self.snapshot}: no shard {shard_id} (snapshot has {len(shards)})")
        info = shards[shard_id]
        self.shard_id = shard_id
        self.version = self.manifest["version"]
        self.dim = int(self.manifest["dim"])
        if threads:
            faiss.omp_set_num_threads(threads)
        self.index = faiss.read_index(str(verify_file(self.snapshot, self.manifest, info["index"])))
        if self.index.d != self.dim:
            raise IndexError_(f"{self.snapshot}: shard {shard_id} has dim {self.index.d}, manifest says {self.dim}")
        _set_search_params(self.index, nprobe, efsearch)
        table = pq.read_table(verify_file(self.snapshot, self.manifest, info["meta"]))
        cols = table.to_pydict()
        self.gids = np.asarray(cols["gid"], dtype=np.int64)
        self.rows = [
            {
                "id": cols["id"][i],
                "doc_id": cols["doc_id"][i],
                "text": cols["text"][i],
                "title": cols["title"][i],
                "source": cols["source"][i],
                "timestamp": cols["timestamp"][i],
                "meta": json.loads(cols["meta"][i]) if cols["meta"][i] else {},
            }
            for i in range(table.num_rows)
        ]
        if len(self.rows) != self.index.ntotal:
            raise IndexError_(f"{self.snapshot}: shard {shard_id} has {self.index.ntotal} vectors, {len(self.rows)} rows")
        self.calls = 0
        self.busy_s = 0.0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[dict[str, Any]]]]:
        """Top-k of this shard: scores, global ids, and the passages they point at."""
        t0 = time.perf_counter()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RetrievalError(f"query shape {tuple(q.shape)}: expected (n, {self.dim})")
        D, I = self.index.search(q, k)
        G = np.where(I >= 0, self.gids[np.clip(I, 0, None)] if len(self.gids) else -1, -1)
        rows = [[self.rows[j] for j in row if j >= 0] for row in I]
        self.calls += 1
        self.busy_s += time.perf_counter() - t0
        return D, G, rows

    def info(self) -> dict[str, Any]:
        return {
            "shard": self.shard_id,
            "version": self.version,
            "count": int(self.index.ntotal),
            "dim": self.dim,
            "calls": self.calls,
            "busy_s": self.busy_s,
        }

    def ping(self) -> bool:
        return True


def _set_search_params(index: Any, nprobe: int, efsearch: int) -> None:
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", efsearch)):
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # the parameter does not apply to this index type
