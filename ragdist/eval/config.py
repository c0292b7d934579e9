"""The `eval` group's schema: what ragdist-eval compares and how answers are generated and scored."""

from __future__ import annotations

from dataclasses import dataclass, field

from ragdist.utils.validate import at_least, non_negative, one_of, probability, require

#: The comparison rows, in table order.
STRATEGIES = ["closed_book", "base_rag", "closed_book_rag", "pretext", "rag", "joint"]


@dataclass
class EvalConfig:
    # Tokens an answer may take; None: the longest training answer's, and a quarter more
    # (eval/generation.py:answer_budget). The report counts eval answers longer than the budget.
    max_new_tokens: int | None = None
    batch_size: int = 32  # questions per generate call (on each rank)
    # Ranks that generate when ragdist-eval, or ragdist-train after training, evaluates outside a
    # launcher (each on its own GPU where there are GPUs); under a launcher every rank does.
    nproc: int = 1
    max_questions: int | None = None
    max_prompt_len: int = 256
    checkpoint: str = ""  # ragdist-eval: model dir to evaluate ("" = the run's checkpoints)
    run_dir: str = ""  # ragdist-eval: a finished run whose checkpoints to evaluate
    # ragdist-eval: train the rows that have no checkpoint yet (rag, closed_book), then compare.
    compare: bool = False
    # ragdist-eval: retrieval alone (dense, BM25, hybrid, + re-rank), no generator: ragdist/eval/retrieval_eval.py
    retrieval_only: bool = False
    retrieval_batch_size: int = 256  # questions per retrieve call in the retrieval-only eval
    # Which rows to report (those whose inputs exist): closed_book | base_rag | closed_book_rag | rag | joint.
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    # A joint (generator + retriever) run to add as a row: its run dir; the parts below override it.
    joint_run: str = ""
    joint_checkpoint: str = ""  # generator dir ("" = <joint_run>/checkpoints/joint, else .../rag)
    joint_snapshot: str = ""  # index snapshot ("" = the joint run's index.snapshot)
    joint_encoder: str = ""  # query encoder dir ("" = <joint_run>/retriever, else the run's embedder)
    topk_sweep: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 5])  # EM vs number of passages
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10])  # P/R/nDCG@k cut-offs
    distractors: list[int] = field(default_factory=lambda: [1, 3])  # passages added for the robustness EM
    distractor_source: str = "hard"  # hard (ranked below top-k, not answering) | random (from the corpus)
    order_checks: bool = True  # EM with the passage order reversed and shuffled
    # A model trained with aggregation=sequential reads each passage alone; its answers are weighed by
    # p(passage | question): retriever = softmax(dense score / retriever_temperature) (0.05: the
    # scale 20 the MiniLM embedder was trained with), uniform = every passage alike.
    passage_prior: str = "retriever"
    retriever_temperature: float = 0.05
    latency_samples: int = 32  # questions timed one at a time (batch size 1), per strategy
    latency_warmup: int = 2  # untimed questions before those
    nli_model: str = ""  # local HF sequence-classification dir: model-based faithfulness ("" = off)
    nli_label: str = "entailment"
    nli_threshold: float = 0.5
    nli_batch_size: int = 16
    plots: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        require(not unknown, f"eval.strategies: unknown {unknown} (known: {STRATEGIES})")
        one_of("eval.distractor_source", self.distractor_source, ("hard", "random"))
        one_of("eval.passage_prior", self.passage_prior, ("retriever", "uniform"))
        require(self.retriever_temperature > 0, f"eval.retriever_temperature={self.retriever_temperature}: must be positive")
        for key in ("max_new_tokens", "batch_size", "nproc", "max_prompt_len", "nli_batch_size", "max_questions",
                    "retrieval_batch_size"):
            at_least(f"eval.{key}", getattr(self, key), 1)
        for key in ("latency_samples", "latency_warmup"):
            non_negative(f"eval.{key}", getattr(self, key))
        require(all(k >= 0 for k in self.topk_sweep), f"eval.topk_sweep={list(self.topk_sweep)}: must not be negative")
        require(all(k >= 1 for k in self.recall_ks), f"eval.recall_ks={list(self.recall_ks)}: positive integers")
        require(all(n >= 1 for n in self.distractors), f"eval.distractors={list(self.distractors)}: positive integers")
        probability("eval.nli_threshold", self.nli_threshold)
