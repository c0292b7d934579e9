"""The `index` group's schema: the FAISS factory string, sharding and where snapshots live."""

from __future__ import annotations

from dataclasses import dataclass, field

from ragdist.utils.validate import at_least, non_negative, one_of, require


@dataclass
class BuildConfig:
    """How the distributed build (`ragdist.index.pipeline`) spreads the work over the Ray cluster."""

    workers: int = 0  # embedding actors; 0 = one per GPU when the cluster has GPUs, else 1
    batch_size: int = 0  # texts per encode batch inside a worker; 0 = embedder.batch_size
    part_mb: float = 4.0  # corpus bytes per part: the unit of scheduling, staging and resume
    device: str = "auto"  # auto (one GPU per worker when the cluster has GPUs) | cpu | gpu
    num_cpus: float = 1.0  # Ray's CPU share per worker (scheduling only; see threads)
    threads: int = 0  # torch threads per CPU worker; 0 = the cluster's CPUs / workers
    max_retries: int = 3  # a part whose worker died is re-run this often (on the restarted worker)
    # Read and chunk a worker's next part on a thread while it encodes this one: auto (GPU workers, so
    # the GPU does not wait on the corpus) | always | never. On CPU the thread competes with torch's
    # for the same cores (bench/embed.py --prefetch-too, 2 cores: 1% slower, 3% more CPU per chunk).
    prefetch: str = "auto"
    keep_staging: bool = False  # keep the embedded parts after a successful build (another factory reuses them)
    ready_timeout_s: float = 600.0  # workers must be placed and have loaded the model by then

    def __post_init__(self) -> None:
        one_of("index.build.device", self.device, ("auto", "cpu", "gpu"))
        one_of("index.build.prefetch", self.prefetch, ("auto", "always", "never"))
        for key in ("workers", "batch_size", "threads", "max_retries", "num_cpus"):
            non_negative(f"index.build.{key}", getattr(self, key))
        for key in ("part_mb", "ready_timeout_s"):
            require(getattr(self, key) > 0, f"index.build.{key}={getattr(self, key)}: must be > 0")


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
    build: BuildConfig = field(default_factory=BuildConfig)

    def __post_init__(self) -> None:
        one_of("index.metric", self.metric, ("ip", "l2"))
        one_of("index.sharding", self.sharding, ("contiguous", "hash"))
        one_of("index.store_vectors", self.store_vectors, ("auto", "always", "never"))
        require(bool(self.factory.strip()), "index.factory is empty: give a FAISS factory string (Flat, IVF256,PQ32, …)")
        for key in ("num_shards", "train_sample", "nprobe", "efsearch", "recall_k"):
            at_least(f"index.{key}", getattr(self, key), 1)
        non_negative("index.recall_queries", self.recall_queries)


@dataclass
class PlanConfig:
    passages: int = 0  # chunks to plan for; 0 = count the chunks of corpus.path
    sample_docs: int = 0  # count chunks in the first N documents only, scaled by file size (0 = all)
    dim: int = 0  # vector size; 0 = the embedder's
    passage_bytes: float = 0.0  # mean UTF-8 bytes of a passage's text+title+ids; 0 = from the corpus, else 300
    gpus: int = 0  # GPUs that serve the index (0 = CPU serving)
    nodes: int = 1
    gpu_memory_gb: float = 80.0
    node_memory_gb: float = 512.0
    headroom: float = 0.85  # usable fraction of each memory (allocator slack, fragmentation, spikes)
    build_workers: int = 0  # embedding workers; 0 = index.build.workers, else the GPUs, else 1
    embed_rate: float = 0.0  # chunks/s per worker; 0 = the measured CPU figure or the GPU estimate below
    cpu_embed_rate: float = 144.0  # chunks/s of one 2-core CPU worker: the demo corpus, 71,422 chunks in 495 s
    gpu_embed_rate: float = 5000.0  # chunks/s of one GPU worker (an estimate: see docs/scale.md)
    cpu_gflops: float = 256.0  # fp32 GEMM rate of one CPU task (2 cores here, numpy): training without GPUs
    gpu_gflops: float = 50000.0  # fp32 rate of one GPU for k-means (an assumption: no GPU measured here)
    add_gflops: float = 0.0  # rate of one shard's add task (coarse assignment + encoding); 0 = cpu_gflops
    scan_gbps: float = 10.0  # bytes of codes/vectors one shard scans per second per query
    # Fan-out + merge: a + b·S + c·S² ms of the client's CPU per call (ShardedRetriever.search),
    # fitted by bench/fanout.py on 1–128 shard actors here; the serial floor of a query's latency.
    fanout_ms: float = 3.0
    fanout_ms_per_shard: float = 0.33
    fanout_ms_per_shard_sq: float = 0.0015
    replica_availability: float = 0.99  # fraction of time one replica is up
    target_availability: float = 0.999  # fraction of queries that must find every shard up
    json_out: str = ""  # also write the plan as JSON here

    def __post_init__(self) -> None:
        for key in ("passages", "sample_docs", "dim", "passage_bytes", "gpus", "build_workers", "embed_rate",
                    "add_gflops"):
            non_negative(f"plan.{key}", getattr(self, key))
        at_least("plan.nodes", self.nodes, 1)
        require(0 < self.headroom <= 1, f"plan.headroom={self.headroom}: must be in (0, 1]")
        for key in ("replica_availability", "target_availability"):
            v = getattr(self, key)
            require(0 < v < 1, f"plan.{key}={v}: must be in (0, 1)")
