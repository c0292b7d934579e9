"""The `index` group's schema: the FAISS factory string, sharding and where snapshots live."""

from __future__ import annotations

from dataclasses import dataclass

from ragdist.utils.validate import at_least, non_negative, one_of, require


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
    nprobe: int = 16  # IVF search breadth (recorded in the manifest as the serving default)
    efsearch: int = 64  # HNSW search breadth (likewise)
    # Keep each shard's exact float32 vectors beside its index (.npy): "auto" does so only when the
    # index stores lossy codes (PQ, SQ), so that a reshard never needs to re-embed.
    store_vectors: str = "auto"  # auto | always | never
    recall_queries: int = 256  # held-out queries for the approximate index's recall@k (0 = skip)
    recall_k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("index.metric", self.metric, ("ip", "l2"))
        one_of("index.sharding", self.sharding, ("contiguous", "hash"))
        one_of("index.store_vectors", self.store_vectors, ("auto", "always", "never"))
        require(bool(self.factory.strip()), "index.factory is empty: give a FAISS factory string (Flat, IVF256,PQ32, …)")
        for key in ("num_shards", "train_sample", "nprobe", "efsearch", "recall_k"):
            at_least(f"index.{key}", getattr(self, key), 1)
        non_negative("index.recall_queries", self.recall_queries)
