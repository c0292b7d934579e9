"""Retriever training's config (`joint=` group): the supervised stage, joint losses, the retriever's
optimizer, refresh triggers.

    ragdist-train +experiment=tiny joint=dpr                            # supervised on gold ids only
    ragdist-train +experiment=tiny joint=lsr joint.supervised.steps=200  # supervised first, then LSR
    ragdist-train +experiment=tiny joint=lsr joint.side=both joint.refresh_every=10

The supervised stage is a field of `JointConfig`, not a `joint.loss`: it runs before (or, with
loss=none, instead of) the generator-supervised losses and shares their side, encoder, refresh
machinery, recall measurement and output layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ragdist.errors import ConfigError
from ragdist.utils.validate import at_least, non_negative, one_of, positive, require

#: The retriever losses joint training knows (ragdist/joint/losses.py implements them).
LOSSES = ("rag_nll", "lsr", "pdist", "emdr2")


@dataclass
class SupervisedConfig:
    """DPR-style contrastive training of the retriever on the training QA's gold ids (`joint.supervised.*`)."""

    steps: int = 0  # optimizer steps of the supervised stage; 0 = no supervised stage
    batch_size: int = 16  # questions per micro-batch and rank: each question's gold is the others' negative
    hard_negatives: int = 2  # per question: the best-ranked non-gold passages the index returns
    mine_depth: int = 10  # passages retrieved per question to mine them from
    temperature: float = 0.05  # InfoNCE: softmax(cos / τ) over the batch's gold and mined passages
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "linear"  # constant | linear | cosine (after warmup, over `steps`)


@dataclass
class JointConfig:
    loss: str = "none"  # none (plain RAG fine-tuning) | rag_nll | lsr | pdist | emdr2
    side: str = "query"  # query: query encoder only | both: passage encoder too (asynchronous index refresh)
    top_k: int = 0  # passages per question the retriever scores and the generator reads; 0 = retrieval.top_k
    candidates: int = 0  # over-retrieve this many, re-score with the current encoders, keep top_k; 0 = top_k
    retriever_temperature: float = 0.1  # p(z|x) = softmax(score / τ) over the top_k (scores are cosines)
    lm_temperature: float = 1.0  # lsr / pdist: softmax(log p(y|x,z) / τ) is the generator's target
    generator_weight: float = 1.0  # loss = generator_weight · generator NLL + retriever_weight · retriever loss
    retriever_weight: float = 1.0
    retriever_start_step: int = 0  # the retriever only steps from here on (the generator first learns to read)
    lr: float = 3e-5  # the retriever's own optimizer (AdamW) and schedule
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (after warmup, over trainer.max_steps)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = no clipping
    encoder_max_length: int = 256
    query_noise: float = 0.0  # >0: start from a deliberately weakened query encoder (weights + noise × std)
    recall_ks: list[int] = field(default_factory=lambda: [1, 3, 5])  # recall@k on eval questions, before/after
    record_examples: bool = True  # <run>/joint/examples.rank<r>.jsonl: each example's index version
    # Asynchronous index refresh (side=both). A refresh starts when any trigger fires.
    refresh_every: int = 0  # every N optimizer steps; 0 = off
    refresh_max_staleness: int = 0  # when the served version's encoder snapshot is N steps old; 0 = off
    refresh_drift: float = 0.0  # when 1 − mean cos(probe passages now, in the index) reaches this; 0 = off
    refresh_probe: int = 16  # passages whose drift is measured (rank 0, every refresh_drift_every steps)
    refresh_drift_every: int = 10
    refresh_workers: int = 2  # Ray actors re-embedding the corpus in parallel
    refresh_threads: int = 1  # torch threads per embed worker
    refresh_nice: int = 19  # os.nice of the refresh processes: training keeps the CPU it needs
    refresh_batch_size: int = 32
    refresh_timeout_s: float = 600.0  # a refresh running longer counts as failed
    refresh_max_retries: int = 3  # failed attempts in a row before giving up until the next trigger
    refresh_backoff_s: float = 2.0  # retry after backoff × 2^(attempt−1), at most refresh_max_backoff_s
    refresh_max_backoff_s: float = 60.0
    # Bounded staleness: at this many steps behind, training waits for the refresh in flight; 0 = never waits.
    refresh_wait_staleness: int = 0
    refresh_supersede: bool = False  # a due refresh starts even while one runs (the older is then discarded)
    refresh_keep_versions: int = 2  # snapshot dirs of served versions kept under refresh_root
    refresh_final: bool = True  # one last refresh after the last step: the saved index matches the saved encoder
    refresh_root: str = ""  # "" = <run_dir>/joint/index
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)

    def __post_init__(self) -> None:
        one_of("joint.loss", self.loss, ("none", *LOSSES))
        one_of("joint.side", self.side, ("query", "both"))
        one_of("joint.schedule", self.schedule, ("constant", "linear", "cosine"))
        non_negative("joint.top_k", self.top_k)
        non_negative("joint.candidates", self.candidates)
        for key in ("retriever_temperature", "lm_temperature", "refresh_timeout_s"):
            positive(f"joint.{key}", getattr(self, key))
        for key in ("generator_weight", "retriever_weight", "lr", "query_noise", "refresh_drift", "grad_clip",
                    "refresh_every", "refresh_max_staleness", "refresh_max_retries", "refresh_probe",
                    "retriever_start_step", "refresh_wait_staleness", "refresh_backoff_s"):
            non_negative(f"joint.{key}", getattr(self, key))
        for key in ("refresh_workers", "refresh_threads", "refresh_batch_size", "refresh_drift_every",
                    "refresh_keep_versions", "encoder_max_length"):
            at_least(f"joint.{key}", getattr(self, key), 1)
        require(bool(self.recall_ks) and all(k >= 1 for k in self.recall_ks),
                f"joint.recall_ks={list(self.recall_ks)}: positive integers, at least one")
        require(self.side == "both" or not (self.refresh_every or self.refresh_max_staleness or self.refresh_drift
                                            or self.refresh_wait_staleness),
                "joint.refresh_* triggers need joint.side=both: with side=query the index never goes stale")


def check_joint_top_k(cfg: JointConfig, top_k: int) -> None:
    """What depends on the retrieval group too: the passages per question the retriever scores."""
    if top_k < 2:
        raise ConfigError(f"joint.top_k={top_k}: the retriever's distribution needs at least 2 passages per question")
    if cfg.candidates and cfg.candidates < top_k:
        raise ConfigError(f"joint.candidates={cfg.candidates}: must be 0 or at least joint.top_k={top_k}")


def check_supervised_config(cfg: JointConfig) -> None:
    """The supervised stage's values, and the joint keys it shares (side, refresh triggers)."""
    sup = cfg.supervised
    if cfg.side not in ("query", "both"):
        raise ConfigError(f"joint.side={cfg.side!r}: expected 'query' or 'both'")
    for key in ("steps", "hard_negatives", "warmup_steps"):
        if getattr(sup, key) < 0:
            raise ConfigError(f"joint.supervised.{key}={getattr(sup, key)}: must not be negative")
    if sup.batch_size < 1:
        raise ConfigError(f"joint.supervised.batch_size={sup.batch_size}: must be at least 1")
    if sup.batch_size < 2 and sup.hard_negatives == 0:
        raise ConfigError("joint.supervised: one question per batch and no hard negatives leaves nothing to contrast")
    if sup.mine_depth < sup.hard_negatives:
        raise ConfigError(f"joint.supervised.mine_depth={sup.mine_depth}: must be at least "
                          f"joint.supervised.hard_negatives={sup.hard_negatives}")
    if sup.temperature <= 0:
        raise ConfigError(f"joint.supervised.temperature={sup.temperature}: must be positive")
    if sup.lr < 0 or sup.weight_decay < 0:
        raise ConfigError("joint.supervised.lr and joint.supervised.weight_decay must not be negative")
    if sup.schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"joint.supervised.schedule={sup.schedule!r}: expected constant, linear or cosine")
    if not cfg.recall_ks or any(k < 1 for k in cfg.recall_ks):
        raise ConfigError(f"joint.recall_ks={list(cfg.recall_ks)}: positive integers, at least one")
    if cfg.side == "query" and (cfg.refresh_every or cfg.refresh_max_staleness or cfg.refresh_drift
                                or cfg.refresh_wait_staleness):
        raise ConfigError("joint.refresh_* triggers need joint.side=both: with side=query the index never goes stale")
