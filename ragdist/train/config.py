"""The training groups' schemas: `trainer` (engine, optimizer, schedule, loop; `trainer.examples`),
`model` (the generator) and `peft`. Each dataclass checks its own values when it is built, so a bad
value fails once, when the config becomes objects, naming its key.

    ragdist-train trainer=fsdp trainer.precision=bf16 peft=lora model.name_or_path=/models/llama
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from ragdist.errors import ConfigError
from ragdist.utils.validate import at_least, one_of, require

PASSAGE_TEMPLATE = "passage {n}: {title}. {text}\n"
QUESTION_TEMPLATE = "question: {question}\nanswer:"


@dataclass
class ExamplesConfig:
    # Each retrieved passage, in order; fields: {n} (1-based position), {title}, {text}.
    passage_template: str = PASSAGE_TEMPLATE
    # After the passages; fields: {question}. The answer follows it after one space.
    question_template: str = QUESTION_TEMPLATE
    aggregation: str = "concat"  # concat | sequential | summarize
    # sequential: the rows one training example gives. all = one per shown passage (RA-DIT); sample = one
    # passage drawn from the retriever's posterior softmax(score / passage_temperature) over those shown
    # (uniform where one has no dense score): the cost of one passage per example, the passages weighed
    # as evaluation weighs them (eval.passage_prior=retriever).
    sequential_rows: str = "all"
    passage_temperature: float = 0.05
    shuffle_passages: bool = True  # seeded shuffle while training; eval keeps rank order
    distractor_p: float = 0.0  # per passage slot, probability that a distractor replaces / joins it
    distractor_mode: str = "replace"  # replace | add
    distractor_source: str = "lower_ranks"  # lower_ranks (over-retrieved) | random (any passage)
    over_retrieve: int = 0  # lower ranks fetched for distractors; 0 = as many as top_k
    inject_gold_p: float = 0.0  # probability of putting the gold passage in when retrieval missed it
    # Probability that an example shows no gold passage (next ranks take its place; the target stays the
    # answer): RAFT's share of examples without the answer, so the reader learns what to do when retrieval
    # missed. Needs gold ids on the training examples; applied before distractors and gold injection.
    drop_gold_p: float = 0.0
    # Counterfactual examples: probability that an example's answer is swapped, wherever it stands as a
    # word in its question and shown passages, for another training answer of the same shape (letters,
    # digits and punctuation alike, e.g. "KKD" for "LAX", "1,495" for "87"), which becomes the target.
    # The swapped answer cannot be recalled, only read, so the generator learns to copy from the passages
    # instead of memorising the training answers. Only examples whose answer appears in a shown passage.
    swap_answer_p: float = 0.0
    # Of the swapped examples, the share whose new answer is made up (`swap_made_up`): its words spelt
    # anew from the tokenizer's word pieces (and with `all` its digits and codes drawn at random too): a
    # training answer's spelling can be half recalled, a made-up one only copied, which is what teaches a
    # small generator to copy names of several tokens to the end.
    swap_made_up_p: float = 0.0
    # words: another training answer of the same shape with only its words made up, its digits and codes
    # kept (real numbers and codes split into tokens as the eval's do); all: the whole answer made up.
    swap_made_up: str = "words"
    answer_max_frac: float = 0.5  # the answer keeps at most this share of max_seq_len
    # summarize: "" = a frozen copy of the generator as it starts training; else a causal LM dir.
    summary_model: str = ""
    summary_prompt: str = "{passages}summary:"  # fields: {passages} (the formatted passages)
    summary_max_new_tokens: int = 24
    summary_max_input: int = 192  # tokens of passages the summarizer reads

    def __post_init__(self) -> None:
        _check_fields(self.passage_template, {"n", "title", "text"}, set(), "passage_template")
        _check_fields(self.question_template, {"question"}, {"question"}, "question_template")
        _check_fields(self.summary_prompt, {"passages"}, {"passages"}, "summary_prompt")
        choices = {
            "aggregation": ("concat", "sequential", "summarize"),
            "sequential_rows": ("all", "sample"),
            "distractor_mode": ("replace", "add"),
            "distractor_source": ("lower_ranks", "random"),
            "swap_made_up": ("all", "words"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"trainer.examples.{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        for key in ("distractor_p", "inject_gold_p", "drop_gold_p", "swap_answer_p", "swap_made_up_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"trainer.examples.{key}={getattr(self, key)}: must be a probability in [0, 1]")
        if not 0.0 < self.answer_max_frac <= 1.0:
            raise ConfigError(f"trainer.examples.answer_max_frac={self.answer_max_frac}: must be in (0, 1]")
        if self.passage_temperature <= 0:
            raise ConfigError(f"trainer.examples.passage_temperature={self.passage_temperature}: must be positive")
        if self.over_retrieve < 0:
            raise ConfigError(f"trainer.examples.over_retrieve={self.over_retrieve}: must not be negative")


def _check_fields(template: str, allowed: set[str], required: set[str], key: str) -> None:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"trainer.examples.{key}={template!r}: not a valid template ({e})") from None
    if names - allowed:
        raise ConfigError(
            f"trainer.examples.{key}={template!r}: unknown field(s) {sorted(names - allowed)}; allowed {sorted(allowed)}"
        )
    if required - names:
        raise ConfigError(f"trainer.examples.{key}={template!r}: must contain {sorted(required - names)}")


PRETEXT_TASKS = ("cloze", "prefix", "section")


@dataclass
class PretextConfig:
    # Optimizer steps of the pretext stage, which runs before the `rag` variant and whose weights
    # `rag` starts from; 0 = no pretext stage.
    steps: int = 0
    lr: float = 0.0  # 0 = trainer.lr
    warmup_steps: int = -1  # -1 = trainer.warmup_steps
    top_k: int = 0  # passages per task; 0 = retrieval.top_k
    # Reading tasks, drawn uniformly per example. cloze: the span is blanked out of its sentence, the
    # target is the span; prefix (Atlas's prefix LM): the query stops where the span starts, the target
    # is the span and the words after it; section (Atlas's title-to-section): the query is the title, the
    # target the passage's first words. prefix and section targets are `prefix_words` words long.
    tasks: list[str] = field(default_factory=lambda: ["cloze"])
    prefix_words: int = 12
    span_words: int = 4  # longest span masked, in words
    context_words: int = 8  # words of the span's sentence kept in the query (before the blank; after it
    # only when fewer than 3 precede it)
    title: bool = True  # the passage's title leads the query (it names what the passage is about)
    # A span found in more than this share of passages (and in more than one) is template text, skipped.
    max_span_df: float = 0.01
    df_sample: int = 50_000  # passages the span frequencies are counted on (a seeded sample of larger corpora)
    # Share of tasks whose original passage (and any passage holding the same chunk id) is left out of
    # the retrieved set; the target stays the span (RAFT's share without the answer).
    drop_gold_p: float = 0.0
    # Share of tasks whose span is made up anew in its form (digits, codes and words at random, as
    # `trainer.examples.swap_made_up` makes answers), in the passages shown and in the target. A corpus
    # small enough to be seen many times over in the stage (the elements' 241 chunks, 66 times in 500
    # steps of 32) is otherwise learnt by heart: the span is recalled from the query, not read.
    made_up_p: float = 0.0
    # Share of each `rag` micro-batch's examples replaced by pretext tasks (0 = QA only), so that
    # fine-tuning on questions keeps the generic reading skill.
    mix: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"trainer.pretext.steps={self.steps}: must not be negative")
        bad = [t for t in self.tasks if t not in PRETEXT_TASKS]
        if bad or not self.tasks:
            raise ConfigError(
                f"trainer.pretext.tasks={list(self.tasks)}: expected a non-empty list of {', '.join(PRETEXT_TASKS)}"
            )
        for key in ("span_words", "context_words", "df_sample", "prefix_words"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.pretext.{key}={getattr(self, key)}: must be at least 1")
        for key in ("max_span_df", "drop_gold_p", "made_up_p", "mix"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"trainer.pretext.{key}={getattr(self, key)}: must be in [0, 1]")
        if self.lr < 0 or self.top_k < 0:
            raise ConfigError("trainer.pretext.lr and trainer.pretext.top_k must not be negative")


@dataclass
class TrainerConfig:
    engine: str = "deepspeed"  # deepspeed | fsdp
    nproc: int = 2  # ranks ragdist-train spawns on this node when not started by a launcher
    zero_stage: int = 2  # DeepSpeed only: 0 (plain data parallel), 1, 2 or 3
    # CPU offload. DeepSpeed: optimizer state (ZeRO 1-3) and parameters (ZeRO-3 only);
    # FSDP2: either one turns on CPUOffloadPolicy, which offloads parameters, gradients and the step.
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    max_steps: int = 1000
    grad_clip: float = 1.0  # 0 = no clipping
    # auto (model.dtype's) | fp32 | bf16 | fp16 (fp16: DeepSpeed only). bf16 / fp16 compute in that
    # dtype and keep fp32 master weights and optimizer state, whatever dtype the model loaded in.
    precision: str = "auto"
    max_seq_len: int = 256
    log_every: int = 25
    # The ranks agree on the steps' losses and on a stop request every this many seconds (and at
    # every log and checkpoint step): one small all-reduce then instead of one per step, and no
    # host sync on the loss in between. A preemption request is acted on at most this late. 0 = every step.
    sync_every_s: float = 1.0
    seed: int = 0
    omp_threads: int = 1  # per rank; more threads per rank than cores/ranks only oversubscribes
    master_port: int = 0  # 0 = pick a free port
    variants: list[str] = field(default_factory=lambda: ["rag", "closed_book"])
    ds_config: str = ""  # a raw DeepSpeed JSON file; overrides what is derived from this config
    # DeepSpeed on CPU ranks: "gloo" = DeepSpeed's own collectives on the process group; "shm"
    # (opt-in) routes its gradient all-reduce and parameter all-gather through shared memory on one
    # node (same results, a fraction of gloo's loopback time; see train/deepspeed_shm.py). GPU: NCCL.
    cpu_collectives: str = "gloo"
    # PyTorch's fused AdamW kernel (CPU or CUDA). On CPU it updated a 2.2M-parameter ZeRO partition
    # in 1.3 ms instead of 8.7 ms; its results differ from the default AdamW in the last bit of some
    # elements, so a run's loss trajectory changes with it: off unless asked for.
    fused_optimizer: bool = False
    # Checkpoints of the training state (model, optimizer, scheduler, RNG, data position) under
    # <run_dir>/train_state/<variant>/step_N; 0 = only at the end.
    save_every: int = 0
    keep_checkpoints: int = 2  # newest checkpoints kept per variant
    resume: str = ""  # "" = start fresh | auto = newest checkpoint of this run_dir if any | a path
    # Batches each rank builds ahead (retrieval included) in a background thread; 0 = inline. Deeper
    # than retrieval_lookahead, so that one lookahead call's embedding spreads over several steps.
    prefetch_depth: int = 16
    retrieval_lookahead: int = 8  # questions of this many upcoming batches retrieved in one call; 1 = per batch
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    # The reader's pretext stage before `rag` (ragdist/train/pretext.py); steps=0 = none.
    pretext: PretextConfig = field(default_factory=PretextConfig)

    def __post_init__(self) -> None:
        if self.engine not in ("deepspeed", "fsdp"):
            raise ConfigError(f"trainer.engine={self.engine!r}: expected 'deepspeed' or 'fsdp'")
        if self.cpu_collectives not in ("shm", "gloo"):
            raise ConfigError(f"trainer.cpu_collectives={self.cpu_collectives!r}: expected 'shm' or 'gloo'")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"trainer.precision={self.precision!r}: expected auto, fp32, bf16 or fp16")
        for key in ("micro_batch_size", "grad_accum", "max_steps", "retrieval_lookahead"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}={getattr(self, key)}: must be at least 1")
        if self.sync_every_s < 0:
            raise ConfigError(f"trainer.sync_every_s={self.sync_every_s}: must not be negative")
        for key in ("save_every", "prefetch_depth", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"trainer.{key}={getattr(self, key)}: must not be negative")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"trainer.keep_checkpoints={self.keep_checkpoints}: keep at least 1")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"trainer.schedule={self.schedule!r}: expected cosine, linear or constant")
        if len(self.betas) != 2:
            raise ConfigError(f"trainer.betas={list(self.betas)}: expected two numbers")


@dataclass
class ModelConfig:
    # Local dir or hub id of a causal LM; "" = build `arch` from the sizes below (random init).
    name_or_path: str = ""
    # Tokenizer for a model built from config: "minilm" = the one shipped with the offline embedder
    # (uncased WordPiece: "1,495" decodes as "1, 495"); "bpe" = a lossless byte-level BPE trained on
    # the run's corpus and training QA (ragdist/train/tokenizer.py); or any HF tokenizer path.
    tokenizer: str = "minilm"
    bpe_vocab_size: int = 8000
    bpe_cache_dir: str = "data/tokenizers"  # trained BPEs, keyed by their inputs
    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position: int = 512
    # The dtype weights are loaded, held outside the optimizer, evaluated and exported in:
    # fp32 | bf16 | fp16. trainer.precision=auto trains in the matching mixed precision (fp32 master
    # weights either way).
    dtype: str = "fp32"
    # sdpa | eager | flash_attention_2 (needs the flash-attn package and a CUDA GPU; sdpa otherwise,
    # with a warning saying which is missing).
    attn_implementation: str = "sdpa"
    # Recompute each block's activations in the backward pass: less memory, ~a third more compute.
    gradient_checkpointing: bool = False
    # The chat template prompts are built with: "" = the tokenizer's own, if it has one (plain
    # prompts otherwise); "none" = plain prompts even when it has one; else a template file
    # (.jinja) or the template text itself.
    chat_template: str = ""
    # Chunked linear + cross-entropy over answer tokens only, never materializing full logits.
    fused_loss: bool = True
    # Also train on the prompt's tokens (passages, question), weighed by this (how: prompt_loss_norm);
    # 0 = the answer only. Random weights learn to carry a span forward from the passages' own
    # text far sooner than from the few answer tokens alone; a pretrained model needs none of it.
    prompt_loss_weight: float = 0.0
    # How the two losses are weighed: token = each prompt token counts prompt_loss_weight of an answer
    # token, so a prompt of 80 tokens outweighs an answer of 3 about 27 to 1 at weight 1; mean = the
    # prompt tokens' mean loss weighs prompt_loss_weight against the answer tokens' mean, whatever the
    # lengths: (answer + w * prompt) / (1 + w). A model trained from scratch learns which span answers a
    # question far sooner with mean (docs/training.md).
    prompt_loss_norm: str = "token"
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("model.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        one_of("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position", "bpe_vocab_size"):
            at_least(f"model.{key}", getattr(self, key), 1)
        require(0.0 <= self.prompt_loss_weight <= 1.0, f"model.prompt_loss_weight={self.prompt_loss_weight}: must be in [0, 1]")
        one_of("model.prompt_loss_norm", self.prompt_loss_norm, ("token", "mean"))
        if not self.name_or_path:
            require(self.hidden_size % self.num_heads == 0,
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")


@dataclass
class PeftConfig:
    method: str = "none"  # none | lora | qlora (4-bit base weights with bitsandbytes; CUDA only)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Layers that get adapters, by name or dotted name suffix (`q_proj`, `attn.c_proj`), or
    # [all-linear]; [] = every linear layer of the architecture's attention blocks (q/k/v/o_proj in
    # Llama, Qwen2, Mistral; qkv_proj/o_proj in Phi-3; attn.c_attn/attn.c_proj in GPT-2).
    target_modules: list[str] = field(default_factory=list)
    # Regular expressions searched in parameter names (as `named_parameters()` of the HF model prints them).
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)
    # > 0: only the last N transformer blocks train (with adapters: only their adapters).
    train_last_n_blocks: int = 0
    # Also write the adapter alone (adapter_model.safetensors + adapter_config.json) next to the
    # merged model that evaluation loads.
    save_adapter: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("none", "lora", "qlora"):
            raise ConfigError(f"peft.method={self.method!r}: expected none, lora or qlora")
        if self.method != "none":
            if self.r < 1:
                raise ConfigError(f"peft.r={self.r}: the LoRA rank must be at least 1")
            if not 0.0 <= self.dropout < 1.0:
                raise ConfigError(f"peft.dropout={self.dropout}: must be in [0, 1)")
        if self.train_last_n_blocks < 0:
            raise ConfigError(f"peft.train_last_n_blocks={self.train_last_n_blocks}: must not be negative")
        for key in ("freeze", "unfreeze"):
            for pat in getattr(self, key):
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ConfigError(f"peft.{key}: {pat!r} is not a regular expression ({e})") from None
