"""The retrieval service's config schema, shared by the client modules and the server side."""

from __future__ import annotations

from dataclasses import dataclass, field

from ragdist.errors import ConfigError

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
    spread_replicas: bool = True  # a shard's replicas on distinct Ray nodes whenever enough nodes can host them
    node_resource: str = ""  # a custom resource marking the nodes that may host shards ("" = any node)
    controller_max_restarts: int = -1  # Ray restarts a dead controller; it recovers from `state_dir`
    state_dir: str = ""  # the controller's durable state; "" = <snapshot root>/_service/<namespace>/<service>
    compact_log_rows: int = 0  # fold the update log into a new snapshot version past this many rows; 0 = never
    connect_timeout_s: float = 30.0  # attaching to the Ray cluster and finding the service
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
    check_every_s: float = 0.0  # an all-cached answer trusts the view this long; 0 = checks each call
    keep_previous: bool = True  # keep the old primary loaded after a promote, for rollback
    detached: bool = False  # keep the service alive after the process that started it exits
    ray_num_cpus: int | None = None  # CPUs of a cluster we start (default: all cores)
    metrics_window: int = 2048  # calls kept for latency percentiles
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    auto: AutoModeConfig = field(default_factory=AutoModeConfig)

    def __post_init__(self) -> None:
        validate_config(self)


def controller_name(service: str) -> str:
    """The Ray actor name of a service's controller."""
    return f"ragdist-service:{service}"


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


def validate_config(cfg: RetrievalConfig) -> None:
    retrieval_mode(cfg)  # raises on an unknown mode or one that contradicts hybrid.enabled
    a = cfg.auto
    checks = [
        (0 < a.holdout < 1, f"retrieval.auto.holdout={a.holdout}: must be between 0 and 1"),
        (a.questions >= 2 and a.batch_size >= 1 and a.k >= 0,
         "retrieval.auto.questions must be >= 2, batch_size >= 1 and k >= 0"),
        (bool(a.lexical_weights) and all(w > 0 for w in a.lexical_weights),
         f"retrieval.auto.lexical_weights={list(a.lexical_weights)}: one or more weights > 0"),
        (bool(a.rrf_ks) and all(r > 0 for r in a.rrf_ks), f"retrieval.auto.rrf_ks={list(a.rrf_ks)}: one or more, > 0"),
        (cfg.replicas >= 1, f"retrieval.replicas={cfg.replicas}: must be >= 1"),
        (cfg.on_shard_down in ("raise", "partial"), f"retrieval.on_shard_down={cfg.on_shard_down!r}: raise | partial"),
        (cfg.flat_backend in ("auto", "faiss", "torch"), f"retrieval.flat_backend={cfg.flat_backend!r}: auto | faiss | torch"),
        (cfg.flat_dtype in ("fp32", "bf16"), f"retrieval.flat_dtype={cfg.flat_dtype!r}: fp32 | bf16"),
        (cfg.device in ("auto", "cpu", "gpu"), f"retrieval.device={cfg.device!r}: auto | cpu | gpu"),
        (cfg.shards_per_gpu >= 1, f"retrieval.shards_per_gpu={cfg.shards_per_gpu}: must be >= 1"),
        (cfg.timeout_s > 0 and cfg.attempt_timeout_s > 0, "retrieval.timeout_s and attempt_timeout_s must be > 0"),
        (cfg.k_beyond_corpus in ("pad", "error"), f"retrieval.k_beyond_corpus={cfg.k_beyond_corpus!r}: pad | error"),
        (cfg.hybrid.rrf_k > 0 and cfg.hybrid.depth > 0, "retrieval.hybrid.rrf_k and depth must be > 0"),
        (cfg.hybrid.dense_weight >= 0 and cfg.hybrid.lexical_weight >= 0, "retrieval.hybrid weights must be >= 0"),
        (cfg.rerank.top_n > 0, f"retrieval.rerank.top_n={cfg.rerank.top_n}: must be > 0"),
        (cfg.cache_size >= 0, f"retrieval.cache_size={cfg.cache_size}: must be >= 0"),
        (cfg.connect_timeout_s > 0, f"retrieval.connect_timeout_s={cfg.connect_timeout_s}: must be > 0"),
        (cfg.compact_log_rows >= 0, f"retrieval.compact_log_rows={cfg.compact_log_rows}: must be >= 0"),
        (cfg.controller_max_restarts >= -1,
         f"retrieval.controller_max_restarts={cfg.controller_max_restarts}: -1 (always) or >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
