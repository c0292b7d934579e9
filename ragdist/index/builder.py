"""Corpus chunks + vectors → a sharded FAISS snapshot. The factory string is the config."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.data.corpus import Chunk
from ragdist.errors import ConfigError, IndexError_
from ragdist.index.config import IndexConfig
from ragdist.index.reader import exactly_reconstructable, set_search_params
from ragdist.index.snapshot import SnapshotWriter


def faiss_metric(metric: str) -> int:
    import faiss

    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ConfigError(f"index.metric={metric!r}: expected 'ip' or 'l2'")


def shard_of_doc(doc_id: str, num_shards: int) -> int:
    """Hash sharding: a stable owner per document, the same in every process and run."""
    return zlib.crc32(doc_id.encode()) % num_shards


def assign_doc_ids(doc_ids: Sequence[str], num_shards: int, strategy: str) -> list[np.ndarray]:
    """Row numbers of each shard. Hash sharding keeps all chunks of a document together."""
    n = len(doc_ids)
    if num_shards < 1:
        raise ConfigError(f"index.num_shards={num_shards}: must be >= 1")
    if num_shards > n:
        raise ConfigError(f"index.num_shards={num_shards}: more shards than the {n} chunks in the corpus")
    if strategy == "contiguous":
        return [a.astype(np.int64) for a in np.array_split(np.arange(n), num_shards)]
    if strategy == "hash":
        owner = np.array([shard_of_doc(d, num_shards) for d in doc_ids], dtype=np.int64)
        return [np.flatnonzero(owner == s).astype(np.int64) for s in range(num_shards)]
    raise ConfigError(f"index.sharding={strategy!r}: expected 'contiguous' or 'hash'")


def assign_shards(chunks: Sequence[Chunk], num_shards: int, strategy: str) -> list[np.ndarray]:
    return assign_doc_ids([c.doc_id for c in chunks], num_shards, strategy)


def make_index(factory: str, dim: int, metric: str) -> Any:
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        raise ConfigError(f"index.factory={factory!r}: FAISS cannot build it ({str(e).splitlines()[-1]})") from None


def training_rows(cfg: IndexConfig, n: int) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.choice(n, min(cfg.train_sample, n), replace=False))


def train_template(cfg: IndexConfig, vectors: np.ndarray) -> Any:
    """One trained (empty) index; every shard starts as a clone so their codes are comparable."""
    import faiss

    index = make_index(cfg.factory, vectors.shape[1], cfg.metric)
    if not index.is_trained:
        return train_on_sample(cfg, vectors[training_rows(cfg, len(vectors))])
    return faiss.clone_index(index)


def train_on_sample(cfg: IndexConfig, sample: np.ndarray, *, gpu: bool = False) -> Any:
    """A trained, empty index of `cfg.factory` from the rows `training_rows` chose.

    `gpu`: run the k-means of an IVF coarse quantizer on every visible GPU (faiss-gpu only);
    the trained index is the same kind of CPU index either way.
    """
    import faiss

    index = make_index(cfg.factory, sample.shape[1], cfg.metric)
    if index.is_trained:
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if gpu and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    try:
        index.train(np.ascontiguousarray(sample, np.float32))
    except RuntimeError as e:
        raise ConfigError(
            f"index.factory={cfg.factory!r}: training on {len(sample)} vectors failed ({str(e).splitlines()[-1]}); "
            "use fewer lists/centroids for a small corpus"
        ) from None
    if gpu and ivf is not None:
        ivf.clustering_index = None  # the GPU index must not outlive this call inside the template
    return faiss.clone_index(index)


def _wants_vectors(policy: str, index: Any) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy == "auto":
        return not exactly_reconstructable(index)
    raise ConfigError(f"index.store_vectors={policy!r}: expected auto, always or never")


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force ground truth (FAISS flat index of the same metric)."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1]) if metric == "ip" else faiss.IndexFlatL2(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors))
    return flat.search(np.ascontiguousarray(queries), k)


def sharded_search(indexes: Sequence[Any], gids: Sequence[np.ndarray], queries: np.ndarray, k: int,
                   metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Search every shard and merge into a global top-k of global ids, as the service does."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
    for index, g in zip(indexes, gids):
        if index.ntotal == 0:
            continue
        D, local = index.search(np.ascontiguousarray(queries), k)
        G = np.where(local >= 0, g[np.clip(local, 0, None)], -1)
        heap.add_result(np.ascontiguousarray(D, np.float32), np.ascontiguousarray(G, np.int64))
    heap.finalize()
    return heap.D, heap.I


def measure_recall(indexes: Sequence[Any], gids: Sequence[np.ndarray], vectors: np.ndarray, k: int, metric: str,
                   *, query_gids: np.ndarray | None = None, queries: np.ndarray | None = None) -> dict[str, Any]:
    """recall@k of the sharded index against exact search, on `queries` or on corpus rows `query_gids`.

    With corpus rows as queries each query's own row is left out of both lists: it is trivially
    found and would flatter the figure. `vectors` is indexed by global id.
    """
    own = query_gids is not None and queries is None
    if own:
        queries = vectors[query_gids]
    assert queries is not None
    kk = k + 1 if own else k
    _, exact = exact_search(vectors, queries, kk, metric)
    _, approx = sharded_search(indexes, gids, queries, kk, metric)
    return recall_entry(exact, approx, k, query_gids if own else None)


def recall_entry(exact: np.ndarray, approx: np.ndarray, k: int, query_gids: np.ndarray | None) -> dict[str, Any]:
    """The manifest's recall@k from exact and approximate global id lists (k + 1 deep for corpus rows)."""
    hits = []
    for i in range(len(exact)):
        drop = int(query_gids[i]) if query_gids is not None else -1
        e = [g for g in exact[i] if g >= 0 and g != drop][:k]
        a = [g for g in approx[i] if g >= 0 and g != drop][:k]
        if e:
            hits.append(len(set(a).intersection(e)) / len(e))
    return {
        "k": k,
        "recall": round(float(np.mean(hits)), 4) if hits else 1.0,
        "queries": len(hits),
        "query_gids": [int(g) for g in query_gids] if query_gids is not None else [],
    }


def exact_search_index(index: Any) -> bool:
    """A flat index answers exactly; every other FAISS structure is approximate."""
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def empty_rows_table() -> Any:
    import pyarrow as pa

    return (
        pa.table({k: pa.array([], pa.string()) for k in ("id", "doc_id", "text", "title", "source", "meta")})
        .append_column("timestamp", pa.array([], pa.float64()))
        .append_column("gid", pa.array([], pa.int64()))
    )


def write_shards(
    root: str | Path,
    template: Any,
    shard_rows: Sequence[np.ndarray],
    vectors: np.ndarray,
    rows: Sequence[dict[str, Any]],
    manifest: dict[str, Any],
    *,
    gids: np.ndarray | None = None,
    store_vectors: str = "auto",
    nprobe: int = 16,
    efsearch: int = 64,
    recall: Callable[[list[Any], list[np.ndarray]], dict[str, Any] | None] | None = None,
) -> Path:
    """Write one index + rows (+ vectors) per shard into a new snapshot version; commit atomically.

    `vectors`, `rows` and `gids` (global ids, default 0..n-1) are row-aligned; `shard_rows[s]` lists
    the row positions of shard s. `recall(indexes, shard_gids)` may add a recall entry to the manifest.
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    gids = np.arange(len(vectors), dtype=np.int64) if gids is None else np.asarray(gids, np.int64)
    shard_info, indexes, shard_gids = [], [], []
    with SnapshotWriter(root) as w:
        for s, pos in enumerate(shard_rows):
            index = faiss.clone_index(template)
            if len(pos):
                index.add(np.ascontiguousarray(vectors[pos]))
            idx_name, meta_name = f"shard_{s:04d}.faiss", f"shard_{s:04d}.parquet"
            faiss.write_index(index, str(w.path(idx_name)))
            table = (
                pa.Table.from_pylist([dict(rows[p], gid=int(gids[p])) for p in pos]) if len(pos) else empty_rows_table()
            )
            pq.write_table(table, w.path(meta_name))
            info = {"id": s, "index": idx_name, "meta": meta_name, "count": int(len(pos))}
            if _wants_vectors(store_vectors, index):
                info["vectors"] = f"shard_{s:04d}.vectors.npy"
                np.save(w.path(info["vectors"]), np.ascontiguousarray(vectors[pos], np.float32), allow_pickle=False)
            shard_info.append(info)
            set_search_params(index, nprobe, efsearch)
            indexes.append(index)
            shard_gids.append(gids[pos])
        manifest = dict(
            manifest,
            shards=shard_info,
            num_shards=len(shard_rows),
            num_chunks=int(len(vectors)),
            search={"nprobe": nprobe, "efsearch": efsearch},
            next_gid=max(int(manifest.get("next_gid", 0)), int(gids.max()) + 1 if len(gids) else 0),
        )
        if recall is not None and not exact_search_index(template):
            measured = recall(indexes, shard_gids)
            if measured is not None:
                manifest["recall"] = measured
        return w.commit(manifest)


def held_out_queries(n: int, nq: int, seed: int, train_rows: np.ndarray | None) -> np.ndarray:
    """Corpus rows not used to train the quantizer (all rows if training used every one)."""
    rng = np.random.default_rng(seed + 1)
    skip = np.unique(train_rows) if train_rows is not None and len(train_rows) < n else np.zeros(0, np.int64)
    # Positions in the pool of rows not trained on, then mapped to rows: the same draw as choosing
    # from that pool directly, without materialising it (n may be billions).
    pos = rng.choice(n - len(skip), min(nq, n - len(skip)), replace=False)
    shift = skip - np.arange(len(skip))  # rows skipped before each trained row
    return np.sort(pos + np.searchsorted(shift, pos, side="right")).astype(np.int64)


def build_snapshot(
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    cfg: IndexConfig,
    *,
    embedder_name: str,
    extra: dict[str, Any] | None = None,
    recall_queries: np.ndarray | None = None,
) -> Path:
    """Train on a sample, add each shard's vectors, write a new snapshot version atomically.

    For an approximate index the manifest's `recall` holds recall@k against exact search on
    held-out queries (`recall_queries` if given, e.g. embedded questions; else held-out corpus rows).
    """
    if len(chunks) != len(vectors):
        raise IndexError_(f"{len(chunks)} chunks but {len(vectors)} vectors")
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise IndexError_(f"vectors must be a float32 matrix, got {vectors.dtype} {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise IndexError_("embeddings contain NaN or inf")
    if cfg.store_vectors not in ("auto", "always", "never"):
        raise ConfigError(f"index.store_vectors={cfg.store_vectors!r}: expected auto, always or never")
    dim = int(vectors.shape[1])
    shards = assign_shards(chunks, cfg.num_shards, cfg.sharding)
    template = train_template(cfg, vectors)
    manifest = {
        "dim": dim,
        "factory": cfg.factory,
        "metric": cfg.metric,
        "sharding": cfg.sharding,
        "num_chunks": len(chunks),
        "embedder": embedder_name,
        **(extra or {}),
    }

    def recall(indexes: list[Any], shard_gids: list[np.ndarray]) -> dict[str, Any] | None:
        if cfg.recall_queries <= 0 and recall_queries is None:
            return None
        qg = None
        if recall_queries is None:
            qg = held_out_queries(len(vectors), cfg.recall_queries, cfg.seed, training_rows(cfg, len(vectors)))
        return measure_recall(indexes, shard_gids, vectors, cfg.recall_k, cfg.metric, query_gids=qg,
                              queries=recall_queries)

    return write_shards(
        cfg.root, template, shards, vectors, [c.to_row() for c in chunks], manifest,
        store_vectors=cfg.store_vectors, nprobe=cfg.nprobe, efsearch=cfg.efsearch, recall=recall,
    )
