"""Plain RAG and closed-book fine-tuning: the example source of the one training loop, and the export.

    summary = train_variant("rag", examples, trainer=..., model_cfg=..., tokenizer=tok, top_k=3,
                            retrieve=retriever.retrieve, run_dir=run_dir, logger=logger)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ragdist.data.qa import QAExample
from ragdist.errors import ConfigError
from ragdist.index.snapshot import atomic_write_text
from ragdist.prompts import write_reader_format
from ragdist.train.engine import TrainerConfig
from ragdist.train.engines import build_engine
from ragdist.train.examples import ExampleBuilder, PassageStore, Summarizer
from ragdist.train.model import (
    AnswerLossLM,
    GeneratorBuilder,
    ModelConfig,
    build_generator,
    load_generator,
    save_pretrained_atomic,
)
from ragdist.train.peft import (
    PeftConfig,
    apply_peft,
    is_peft_model,
    load_quantized_generator,
    require_cuda_for_qlora,
    save_adapter_and_merged,
)
from ragdist.train.prefetch import Lookahead
from ragdist.train.pretext import PretextSource
from ragdist.train.trainer import Position, Trainer, finished_summary
from ragdist.utils.logger import RunLogger

log = logging.getLogger(__name__)


def build_module_fn(model_cfg: ModelConfig, tokenizer: Any, peft_cfg: PeftConfig) -> Callable[[], torch.nn.Module]:
    def wrap(base: torch.nn.Module) -> torch.nn.Module:
        return AnswerLossLM(apply_peft(base, peft_cfg), fused_loss=model_cfg.fused_loss,
                            prompt_loss_weight=model_cfg.prompt_loss_weight, prompt_loss_norm=model_cfg.prompt_loss_norm)

    if peft_cfg.method == "qlora":
        return lambda: wrap(load_quantized_generator(model_cfg))
    return GeneratorBuilder(model_cfg, tokenizer, wrap)


def make_summarizer(trainer: TrainerConfig, model_cfg: ModelConfig, tokenizer: Any) -> Summarizer | None:
    fmt = trainer.examples
    if fmt.aggregation != "summarize":
        return None
    if fmt.summary_model:
        model, tok = load_generator(fmt.summary_model)
        return Summarizer(model, tok, fmt)
    # A frozen copy of the generator as training starts: rank-local, so summaries can be made in the
    # prefetch thread without touching the sharded, changing weights.
    return Summarizer(build_generator(model_cfg, tokenizer), tokenizer, fmt)


class ExampleSource:
    """Batches of (retrieved passages, question, answer) examples: the plain RAG and closed-book source.

    Retrieved ahead in the prefetch thread: a batch depends only on its position (and the index
    version), never on the model being trained; the prompts are encoded on the training thread. With `lookahead` > 1 the questions of several upcoming batches
    are retrieved in one call (same passages, see `Lookahead`).
    """

    prefetch = True

    def __init__(self, examples: list[QAExample], builder: ExampleBuilder, lookahead: int = 1):
        self.examples = examples
        self.num_examples = len(examples)
        self.builder = builder
        self.lookahead = lookahead

    def stream(self, positions: Iterator[Position]) -> Iterator[Position]:
        b = self.builder
        if b.retrieve is None or b.top_k == 0 or self.lookahead <= 1:
            return positions
        la = Lookahead(b.retrieve, positions, lambda p: [self.examples[i].question for i in p.ids], self.lookahead)
        b.retrieve = la
        return la.positions()

    def fetch(self, pos: Position) -> Any:
        return self.builder.fetch(self.examples, pos.ids, pos.epoch)

    def build(self, pos: Position, fetched: Any) -> Any:
        return self.builder.assemble(self.examples, pos.ids, pos.epoch, fetched)


def train_variant(
    variant: str,
    examples: list[QAExample],
    *,
    trainer: TrainerConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    top_k: int,
    retrieve: Callable[[list[str], int], list[list[dict[str, Any]]]] | None,
    run_dir: str | Path,
    logger: RunLogger,
    peft_cfg: PeftConfig | None = None,
    store: PassageStore | None = None,
    index_version: Callable[[], str | None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    export: bool = True,
    source_factory: Callable[[ExampleBuilder], Any] | None = None,
) -> dict[str, Any]:
    """Train one generator; `retrieve(questions, k)` gives each question its passages (top_k=0: closed book).

    `source_factory(builder)` makes the batch source from the example builder (default: `examples`
    through `ExampleSource`; the pretext stage makes its reading tasks here).

    Raises `Preempted` (after checkpointing) when `stop_requested()` turned true on any rank.
    """
    run_dir = Path(run_dir)
    peft_cfg = peft_cfg or PeftConfig()
    require_cuda_for_qlora(peft_cfg)
    if peft_cfg.method == "qlora" and (trainer.engine == "fsdp" or trainer.zero_stage == 3):
        raise ConfigError("peft.method=qlora: 4-bit base weights cannot be sharded; use trainer=deepspeed with zero_stage 0-2")
    done = finished_summary(run_dir, variant, trainer)
    if done is not None:
        log.info("[%s] already trained to step %d in %s; skipping", variant, done["steps"], run_dir)
        return done
    summarizer = make_summarizer(trainer, model_cfg, tokenizer) if top_k > 0 else None
    builder = ExampleBuilder(
        tokenizer, trainer.examples, top_k=top_k, max_len=trainer.max_seq_len, retrieve=retrieve,
        store=store, summarizer=summarizer, seed=trainer.seed,
    )  # fmt: skip
    if source_factory is not None:
        source = source_factory(builder)
    else:
        source = ExampleSource(examples, builder, trainer.retrieval_lookahead)
    engine = build_engine(trainer, build_module_fn(model_cfg, tokenizer, peft_cfg), run_dir)
    try:
        summary = Trainer(
            variant, engine, source, cfg=trainer, run_dir=run_dir, logger=logger,
            stop_requested=stop_requested, index_version=index_version,
        ).fit()  # fmt: skip
        state_dict = engine.full_state_dict()
    finally:
        engine.close()  # before building the export copy: ZeRO-3 would partition it
    if engine.rank == 0 and export:
        _export(state_dict, model_cfg, tokenizer, peft_cfg, Path(summary["checkpoint"]))
        if top_k > 0:
            write_reader_format(summary["checkpoint"], trainer.examples, top_k)
        atomic_write_text(run_dir / f"train_{variant}.json", json.dumps(summary, indent=1))
    dist.barrier()
    return summary


def _export(
    state_dict: dict[str, torch.Tensor] | None,
    model_cfg: ModelConfig,
    tokenizer: Any,
    peft_cfg: PeftConfig,
    out: Path,
) -> None:
    """Rank 0: an HF model directory evaluation can load (adapters merged), plus the adapter alone."""
    assert state_dict is not None
    lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items()}
    if peft_cfg.method == "none":
        lm = build_generator(model_cfg, tokenizer)
        save_pretrained_atomic(lm, tokenizer, out, state_dict=_match_dtypes(lm, lm_state))
        return
    # A fresh full-precision copy carrying the trained weights: the engine's own module may hold only
    # shards, or (QLoRA) 4-bit base weights; those adapters merge into the full-precision base.
    qlora = peft_cfg.method == "qlora"
    lm = apply_peft(build_generator(model_cfg, tokenizer), dataclasses.replace(peft_cfg, method="lora") if qlora else peft_cfg)
    if qlora:
        lm_state = {k: v for k, v in lm_state.items() if "lora_" in k}
    missing, unexpected = lm.load_state_dict(_match_dtypes(lm, lm_state), strict=False)
    if unexpected or (not qlora and [m for m in missing if "lm_head" not in m]):
        raise RuntimeError(f"export: state dict does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    assert is_peft_model(lm)
    save_adapter_and_merged(lm, tokenizer, out, save_adapter=peft_cfg.save_adapter)


def _match_dtypes(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16 training leaves bf16 weights; the saved model keeps the dtype it was built with."""
    ref = model.state_dict()
    return {k: v.to(ref[k].dtype) if k in ref else v for k, v in sd.items()}


def train_pretext(
    store: PassageStore,
    *,
    trainer: TrainerConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    top_k: int,
    retrieve: Callable[[list[str], int], list[list[dict[str, Any]]]],
    run_dir: str | Path,
    logger: RunLogger,
    peft_cfg: PeftConfig | None = None,
    index_version: Callable[[], str | None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """The reader's pretext stage (`trainer.pretext`): reading tasks made from the corpus in `store`,
    with passages from `retrieve`, through the same loop and export as `train_variant` (variant
    "pretext"; checkpoint `<run_dir>/checkpoints/pretext`, which the `rag` variant then starts from)."""
    pcfg = trainer.pretext
    stage = dataclasses.replace(
        trainer,
        max_steps=pcfg.steps,
        lr=pcfg.lr or trainer.lr,
        warmup_steps=trainer.warmup_steps if pcfg.warmup_steps < 0 else pcfg.warmup_steps,
        # a task's span, made up whole in its form for `made_up_p` of the tasks (PretextSource)
        examples=dataclasses.replace(trainer.examples, drop_gold_p=pcfg.drop_gold_p, swap_answer_p=pcfg.made_up_p,
                                     swap_made_up_p=1.0),
    )
    return train_variant(
        "pretext", [], trainer=stage, model_cfg=model_cfg, tokenizer=tokenizer, top_k=pcfg.top_k or top_k,
        retrieve=retrieve, run_dir=run_dir, logger=logger, peft_cfg=peft_cfg, store=store,
        index_version=index_version, stop_requested=stop_requested,
        source_factory=lambda b: PretextSource(store, b, pcfg, seed=trainer.seed, lookahead=trainer.retrieval_lookahead),
    )  # fmt: skip
