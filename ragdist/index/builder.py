"""Corpus chunks + vectors → a sharded FAISS snapshot. The factory string is the config."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.data.corpus import Chunk
from ragdist.errors import ConfigError, IndexError_
from ragdist.index.snapshot import SnapshotWriter


@dataclass
class IndexConfig:
    factory: str = "Flat"  # any faiss.index_factory string: Flat, IVF256,Flat, IVF256,PQ32, HNSW32, SQ8 …
    metric: str = "ip"  # ip (cosine on normalized vectors) | l2
    num_shards: int = 2
    sharding: str = "contiguous"  # contiguous | hash (of the document id)
    root: str = "indexes/default"  # snapshot root: versions live below it
    snapshot: str = ""  # use this existing snapshot (dir or root) instead of building one
    rebuild: bool = False  # build a new version even when one with the same inputs exists
    train_sample: int = 100_000  # vectors used to train quantizers (IVF/PQ/SQ)
    nprobe: int = 16  # IVF search breadth
    efsearch: int = 64  # HNSW search breadth
    seed: int = 0


def faiss_metric(metric: str) -> int:
    import faiss

    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ConfigError(f"index.metric={metric!r}: expected 'ip' or 'l2'")


def assign_shards(chunks: Sequence[Chunk], num_shards: int, strategy: str) -> list[np.ndarray]:
    """Global row ids of each shard. Hash sharding keeps all chunks of a document together."""
    n = len(chunks)
    if num_shards < 1:
        raise ConfigError(f"index.num_shards={num_shards}: must be >= 1")
    if num_shards > n:
        raise ConfigError(f"index.num_shards={num_shards}: more shards than the {n} chunks in the corpus")
    if strategy == "contiguous":
        return [a.astype(np.int64) for a in np.array_split(np.arange(n), num_shards)]
    if strategy == "hash":
        owner = np.array([zlib.crc32(c.doc_id.encode()) % num_shards for c in chunks], dtype=np.int64)
        return [np.flatnonzero(owner == s).astype(np.int64) for s in range(num_shards)]
    raise ConfigError(f"index.sharding={strategy!r}: expected 'contiguous' or 'hash'")


def make_index(factory: str, dim: int, metric: str) -> Any:
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        raise ConfigError(f"index.factory={factory!r}: FAISS cannot build it ({str(e).splitlines()[-1]})") from None


def train_template(cfg: IndexConfig, vectors: np.ndarray) -> Any:
    """One trained (empty) index; every shard starts as a clone so their codes are comparable."""
    import faiss

    index = make_index(cfg.factory, vectors.shape[1], cfg.metric)
    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.train_sample, len(vectors))
        sample = vectors[np.sort(rng.choice(len(vectors), n, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as e:
            raise ConfigError(
                f"index.factory={cfg.factory!r}: training on {n} vectors failed ({str(e).splitlines()[-1]}); "
                "use fewer lists/centroids for a small corpus"
            ) from None
    return faiss.clone_index(index)


def build_snapshot(
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    cfg: IndexConfig,
    *,
    embedder_name: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(chunks) != len(vectors):
        raise IndexError_(f"{len(chunks)} chunks but {len(vectors)} vectors")
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise IndexError_(f"vectors must be a float32 matrix, got {vectors.dtype} {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise IndexError_("embeddings contain NaN or inf")
    dim = int(vectors.shape[1])
    shards = assign_shards(chunks, cfg.num_shards, cfg.sharding)
    template = train_template(cfg, vectors)
    shard_info = []
    with SnapshotWriter(cfg.root) as w:
        for s, rows in enumerate(shards):
            index = faiss.clone_index(template)
            if len(rows):
                index.add(np.ascontiguousarray(vectors[rows]))
            idx_name, meta_name = f"shard_{s:04d}.faiss", f"shard_{s:04d}.parquet"
            faiss.write_index(index, str(w.path(idx_name)))
            table = pa.Table.from_pylist([dict(chunks[r].to_row(), gid=int(r)) for r in rows]) if len(rows) else (
                pa.table({k: pa.array([], pa.string()) for k in ("id", "doc_id", "text", "title", "source", "meta")})
                .append_column("timestamp", pa.array([], pa.float64()))
                .append_column("gid", pa.array([], pa.int64()))
            )
            pq.write_table(table, w.path(meta_name))
            shard_info.append({"id": s, "index": idx_name, "meta": meta_name, "count": int(len(rows))})
        manifest = {
            "dim": dim,
            "factory": cfg.factory,
            "metric": cfg.metric,
            "sharding": cfg.sharding,
            "num_shards": cfg.num_shards,
            "num_chunks": len(chunks),
            "embedder": embedder_name,
            "shards": shard_info,
            **(extra or {}),
        }
        return w.commit(manifest)
