"""Joint retriever–generator training: a batch source and a hook of the one training loop.

    ragdist-train +experiment=tiny joint=lsr                          # query encoder only (index stays valid)
    ragdist-train +experiment=tiny joint=lsr joint.side=both joint.refresh_every=10

Per micro-batch (`JointSource.build`, inline: the batch holds the retriever's scores with gradient):
  1. the current query encoder embeds the questions; the pinned index version returns `candidates`
     passages each (over-retrieval);
  2. with side=both the candidates are re-scored with the current passage encoder and the top_k kept
     (Atlas' re-rank: the index may be a few steps stale, the scores are not);
  3. the retriever scores the kept passages with gradient; the generator reads one sequence per
     (question, passage); the engine's backward carries the joint loss into both.
Per optimizer step (`JointHook.after_step`): the retriever's gradients are all-reduced and its optimizer
steps; rank 0 polls the refresh manager; a new index version, when ready, is broadcast and every rank
switches to it at the same step. Checkpoints carry the retriever, its optimizer and the served version,
so a resumed run continues with the same losses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ragdist.distributed import on_rank0
from ragdist.errors import ConfigError
from ragdist.joint.config import JointConfig, check_joint_top_k
from ragdist.joint.refresh import ServedVersion
from ragdist.train.trainer import Hook, Position, Trainer, finished_summary

log = logging.getLogger(__name__)


def is_gold(passage: dict[str, Any], gold: set[str]) -> bool:
    return str(passage.get("id")) in gold or str(passage.get("doc_id")) in gold


def retrieval_recall(view: Any, encoder: Any, examples: list[Any], ks: list[int], batch: int = 64) -> dict[str, Any]:
    """recall@k: share of questions (with gold ids) whose gold passage is among the top k the index returns."""
    qs = [ex for ex in examples if ex.gold_ids]
    if not qs:
        return {"questions": 0}
    depth = max(ks)
    hits = {k: 0 for k in ks}
    mrr = 0.0
    for i in range(0, len(qs), batch):
        part = qs[i : i + batch]
        res = view.search(encoder.encode([ex.question for ex in part]), depth)
        for ex, ps in zip(part, res.passages):
            gold = set(ex.gold_ids)
            ranks = [r for r, p in enumerate(ps) if is_gold(p, gold)]
            for k in ks:
                hits[k] += bool(ranks and ranks[0] < k)
            mrr += 1.0 / (ranks[0] + 1) if ranks else 0.0
    out: dict[str, Any] = {f"recall@{k}": hits[k] / len(qs) for k in ks}
    out.update(mrr=mrr / len(qs), questions=len(qs), index_version=view.served.version)
    return out


def _broadcast_version(new: ServedVersion | None, rank: int, world: int) -> ServedVersion | None:
    """Rank 0's decision (a version or None) on every rank: one small broadcast a step, a second on a change."""
    if world == 1:
        return new
    flag = torch.tensor([1 if (rank == 0 and new is not None) else 0], dtype=torch.int64)
    dist.broadcast(flag, src=0)
    if not int(flag.item()):
        return None
    box = [asdict(new) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return ServedVersion(**box[0])


@dataclass
class JointBatch:
    tensors: dict[str, torch.Tensor]
    tokens: int
    examples: list[Any]
    passages: list[list[dict[str, Any]]]
    served: ServedVersion


class JointSource:
    """B questions × top_k retrieved passages as B·top_k sequences, plus the retriever's (B, top_k) scores."""

    prefetch = False  # the candidates are searched with, and scored by, the current query encoder: at step time

    def __init__(self, examples: list[Any], retriever: Any, view: Any, tokenizer: Any, *, top_k: int, candidates: int,
                 max_len: int, fmt: Any):
        self.examples = examples
        self.num_examples = len(examples)
        self.retriever, self.view, self.tokenizer = retriever, view, tokenizer
        self.top_k, self.candidates, self.max_len, self.fmt = top_k, candidates, max_len, fmt

    def stream(self, positions: Any) -> Any:
        return positions

    def fetch(self, pos: Position) -> None:
        return None

    def build(self, pos: Position, fetched: None = None) -> JointBatch:
        from ragdist.train.examples import collate_train, encode_train

        batch = [self.examples[i] for i in pos.ids]
        questions = [ex.question for ex in batch]
        served = self.view.served
        # One query forward, with gradient: its detached values search, the same tensor is scored.
        q = self.retriever.query(questions)
        # the detached vectors search through the same retriever as everything else (hybrid, rerank)
        candidates = self.view.retrieve(questions, self.candidates, vectors=q.detach().numpy())
        if self.candidates > self.top_k:
            chosen = _rerank(self.retriever, q.detach(), candidates, self.top_k)
        else:
            chosen = [ps[: self.top_k] for ps in candidates]
        scores = self.retriever.scores(questions, chosen, q=q)
        rows = [encode_train(self.tokenizer, ex.question, [p], ex.answers[0], self.max_len, self.fmt)
                for ex, ps in zip(batch, chosen) for p in ps]  # fmt: skip
        tensors = collate_train(rows, self.tokenizer.pad_token_id)
        tensors["retriever_scores"] = scores
        return JointBatch(tensors, int(tensors["attention_mask"].sum()), batch, chosen, served)


def _rerank(retriever: Any, q: torch.Tensor, candidates: list[list[dict[str, Any]]], top_k: int) -> list[list[dict[str, Any]]]:
    """Over-retrieved candidates re-scored with the current encoders (no gradient); the best top_k kept."""
    with torch.no_grad():
        flat = [p for ps in candidates for p in ps]
        p = retriever.passage_vectors(flat, grad=False)
    out, offset = [], 0
    for i, ps in enumerate(candidates):
        s = p[offset : offset + len(ps)] @ q[i]
        offset += len(ps)
        order = torch.argsort(s, descending=True)[:top_k].tolist()
        out.append([ps[j] for j in order])
    return out


class JointHook(Hook):
    """The retriever's optimizer step, the index refresh and the per-example record, after each step."""

    name = "joint"

    def __init__(self, cfg: JointConfig, retriever: Any, ropt: Any, view: Any, manager: Any, evals: list[Any],
                 record_path: Path | None):
        self.cfg, self.retriever, self.ropt, self.view, self.manager = cfg, retriever, ropt, view, manager
        self.evals = evals
        self.record_path = record_path
        self.fh: Any = None
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] = {}

    # -- state carried across a resume -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"recall_before": self.before, "served": asdict(self.view.served)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("recall_before")

    def save(self, path: Path, rank: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        # side=query: each rank's cache of frozen passage vectors. A vector's last bits depend on the
        # batch it was first encoded in (padding length), so a resumed run that re-encoded them would
        # drift from the uninterrupted one; the cache travels with the checkpoint (at most cache_size rows).
        cache = self.retriever.cache_state()
        if cache is not None:
            torch.save(cache, path / f"joint_cache.rank{rank:05d}.pt")
        if rank != 0:
            return
        # Every rank holds the same retriever (averaged gradients, same seed): rank 0's copy is the state.
        opt = self.ropt
        torch.save({"retriever": dict(self.retriever.state_dict()),
                    "optimizer": opt.opt.state_dict() if opt.opt else None,
                    "scheduler": opt.sched.state_dict() if opt.sched else None}, path / "joint.pt")  # fmt: skip

    def load(self, path: Path, rank: int) -> None:
        f = path / "joint.pt"
        if not f.is_file():
            raise ConfigError(f"{path.parent}: checkpoint has no joint retriever state ({f.name})")
        state = torch.load(f, weights_only=True)
        self.retriever.load_state_dict(state["retriever"])
        if self.ropt.opt is not None:
            self.ropt.opt.load_state_dict(state["optimizer"])
            self.ropt.sched.load_state_dict(state["scheduler"])
        cache = path / f"joint_cache.rank{rank:05d}.pt"
        if cache.is_file():
            self.retriever.load_cache_state(torch.load(cache, weights_only=True))

    # -- the loop's calls ------------------------------------------------------------------------
    def on_start(self, trainer: Trainer) -> None:
        if trainer.rank == 0 and self.before is None:
            self.before = retrieval_recall(self.view, self.retriever.query, self.evals, list(self.cfg.recall_ks))
            log.info("[joint %s/%s] recall before: %s", self.cfg.loss, self.cfg.side, _fmt_recall(self.before))
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.record_path, "a", encoding="utf-8")

    def after_micro(self, trainer: Trainer, pos: Position, batch: JointBatch, loss: torch.Tensor) -> None:
        if self.fh is None:
            return
        used = batch.served
        staleness = trainer.step - used.encoder_step if self.cfg.side == "both" else 0
        self.fh.writelines(
            json.dumps({"step": trainer.step, "example": ex.id, "index_version": used.version, "index_seq": used.seq,
                        "staleness": staleness, "passages": [str(p.get("id")) for p in ps]}) + "\n"
            for ex, ps in zip(batch.examples, batch.passages)
        )  # fmt: skip

    def after_step(self, trainer: Trainer, step: int) -> dict[str, Any]:
        cfg, manager, used = self.cfg, self.manager, self.view.served
        if step - 1 >= cfg.retriever_start_step:
            gnorm = self.ropt.step()
        else:  # the generator learns to read first; the retriever's gradients are dropped
            gnorm = 0.0
            for p in self.ropt.params:
                p.grad = None
        new, inflight, drift = None, 0, None
        if manager is not None:
            new = manager.poll(step)
            if cfg.refresh_drift and step % cfg.refresh_drift_every == 0:
                drift = manager.drift(self.retriever.passage)
            manager.maybe_start(step, self.retriever.passage, drift)
            inflight = manager.inflight()
            if new is None and cfg.refresh_wait_staleness and manager.staleness(step) >= cfg.refresh_wait_staleness:
                new = manager.wait(step)
        new = _broadcast_version(new, trainer.rank, trainer.world)
        if new is not None:
            self.view.switch(new)
            if manager is not None:
                manager.promote(new)
        parts = getattr(trainer.engine.module, "last", {}) or {}
        staleness = step - used.encoder_step if cfg.side == "both" else 0
        rec = {"gen_loss": parts.get("gen_loss"), "retriever_loss": parts.get("retriever_loss"),
               "agree": parts.get("agree"), "retriever_grad_norm": gnorm, "retriever_lr": self.ropt.lr(),
               "index_seq": used.seq, "staleness": staleness, "refresh_inflight": inflight}  # fmt: skip
        if drift is not None:
            rec["drift"] = drift
        if inflight:
            rec["note"] = f" index r{used.seq}, refreshing ({inflight})"
        return rec

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        final = self.manager.finish(trainer.step, self.retriever.passage, self.cfg.refresh_final) if self.manager else None
        final = _broadcast_version(final, trainer.rank, trainer.world)
        if final is not None and self.view.served.seq != final.seq:
            self.view.switch(final)
        if trainer.rank == 0:
            self.after = retrieval_recall(self.view, self.retriever.query, self.evals, list(self.cfg.recall_ks))
            log.info("[joint %s/%s] recall after: %s", self.cfg.loss, self.cfg.side, _fmt_recall(self.after))
        summary["joint"] = retriever_summary(summary["history"], loss=self.cfg.loss, cfg=self.cfg, before=self.before,
                                             after=self.after, view=self.view, manager=self.manager,
                                             run_dir=trainer.run_dir)  # fmt: skip

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.manager is not None:
            self.manager.close()


def retriever_summary(history: list[dict[str, Any]], *, loss: str, cfg: JointConfig, before: dict[str, Any] | None,
                      after: dict[str, Any], view: Any, manager: Any, run_dir: Path,
                      **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The `joint` part of a retriever-training summary (joint losses and the supervised stage alike)."""
    step_s = [h["step_s"] for h in history[1:]] or [0.0]
    during = [h["step_s"] for h in history[1:] if h.get("refresh_inflight")]
    return {
        "loss": loss,
        **extra,
        "side": cfg.side,
        "config": asdict(cfg),
        "recall_before": before or {},
        "recall_after": after,
        "median_step_s": float(np.median(step_s)),
        "max_step_during_refresh_s": float(max(during)) if during else None,
        "max_staleness": max((h.get("staleness", 0) for h in history), default=0),
        "final_index": asdict(view.served),
        "refresh": manager.summary() if manager is not None else None,
        "retriever_dir": str(run_dir / "retriever"),
    }


def _fmt_recall(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("recall@")) or "no gold ids"


def _resumed_served(trainer_cfg: Any, run_dir: Path, variant: str) -> ServedVersion | None:
    """The index version a resumed side=both run was serving when it checkpointed, if its snapshot still exists."""
    from ragdist.train import checkpoint as ckpt
    from ragdist.train.trainer import _resume_spec

    found = ckpt.find_checkpoint(_resume_spec(trainer_cfg.resume, variant), run_dir / "train_state" / variant)
    if found is None:
        return None
    served = ckpt.read_state(found).get("hooks", {}).get("joint", {}).get("served")
    if served and Path(served["snapshot"]).is_dir():
        return ServedVersion(**served)
    return None


def train_joint(
    variant: str,
    train: list[Any],
    evals: list[Any],
    *,
    joint: JointConfig,
    trainer: Any,
    model_cfg: Any,
    retrieval: Any,
    embedder_cfg: Any,
    snapshot: str,
    tokenizer: Any,
    run_dir: str | Path,
    logger: Any,
    faults: dict[str, Any] | None = None,
    peft_cfg: Any = None,
    stop_requested: Any = None,
    init_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train generator and retriever together; every rank calls this (the process group is up).

    `init_dir`: a run directory whose supervised stage left the encoders to start from (`snapshot` is
    then that stage's final index). Raises `Preempted` (after checkpointing) when `stop_requested()`
    turned true on any rank.
    """
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.index.snapshot import read_manifest
    from ragdist.joint.generator import JointLM
    from ragdist.joint.refresh import IndexView, RefreshManager, joint_service, load_chunks
    from ragdist.joint.retriever import JointRetriever, RetrieverOptimizer, encoder_dir
    from ragdist.retrieval.client import start_service, stop_service
    from ragdist.train.engine import lr_lambda
    from ragdist.train.engines import build_engine
    from ragdist.train.model import build_generator

    run_dir = Path(run_dir)
    top_k = joint.top_k or retrieval.top_k
    check_joint_top_k(joint, top_k)
    done = finished_summary(run_dir, variant, trainer)
    if done is not None:
        log.info("[%s] already trained to step %d in %s; skipping", variant, done["steps"], run_dir)
        return done
    fetch = max(joint.candidates, top_k)
    manifest = read_manifest(snapshot)
    if fetch > int(manifest["num_chunks"]):
        raise ConfigError(f"joint: {fetch} passages per question but the index holds only {manifest['num_chunks']}")
    enc_path = encoder_dir(resolve_model_path(embedder_cfg.name))
    if peft_cfg is not None and peft_cfg.method != "none":
        raise ConfigError(f"peft.method={peft_cfg.method}: joint training trains the full generator (or a frozen "
                          "part of it via peft.freeze / peft.train_last_n_blocks); adapters are not supported with joint.loss")

    # Same seed on every rank: the retriever replicas start identical and stay so (averaged gradients).
    torch.manual_seed(trainer.seed)
    retriever = JointRetriever(enc_path, joint.side, max_length=joint.encoder_max_length)
    if init_dir is not None:
        retriever.load_trained(init_dir)  # query_noise, if any, already weakened the supervised stage's start
    else:
        retriever.perturb_query(joint.query_noise, trainer.seed + 1)

    def build() -> torch.nn.Module:
        lm = build_generator(model_cfg, tokenizer)
        if peft_cfg is not None:
            from ragdist.train.peft import apply_freezing

            apply_freezing(lm, peft_cfg)
        return JointLM(lm, loss=joint.loss, generator_weight=joint.generator_weight,
                       retriever_weight=joint.retriever_weight, retriever_temperature=joint.retriever_temperature,
                       lm_temperature=joint.lm_temperature)  # fmt: skip

    engine = build_engine(trainer, build, run_dir)
    rank, world = engine.rank, engine.world_size
    sched = lr_lambda(replace(trainer, warmup_steps=joint.warmup_steps, schedule=joint.schedule,
                              min_lr_ratio=joint.min_lr_ratio))  # fmt: skip
    ropt = RetrieverOptimizer(retriever.trainable(), lr=joint.lr, weight_decay=joint.weight_decay,
                              grad_clip=joint.grad_clip, schedule=sched)  # fmt: skip

    served = ServedVersion(0, str(manifest["version"]), str(snapshot), 0)
    service = retrieval
    hook: JointHook | None = None
    try:
        if joint.side == "both":
            # Refreshed versions go to a service of the run's own; the main one keeps the original index.
            served = _resumed_served(trainer, run_dir, variant) or served
            service = joint_service(retrieval)
            on_rank0(lambda: start_service(served.snapshot, service), what="start the joint retrieval service")
        view = IndexView(service, served)
        manager = None
        if rank == 0 and joint.side == "both":
            probe = []
            if joint.refresh_drift:
                chunks, _ = load_chunks(snapshot)
                pick = np.random.default_rng(trainer.seed).choice(len(chunks), min(joint.refresh_probe, len(chunks)),
                                                                  replace=False)  # fmt: skip
                probe = [chunks[int(i)].text for i in sorted(pick)]
            manager = RefreshManager(joint, source_snapshot=str(snapshot), served=served, service=service,
                                     encoder_path=enc_path, run_dir=run_dir, probe_texts=probe, faults=faults)  # fmt: skip
            if probe:
                manager.probe_ref = retriever.passage.encode(probe)
        fmt = getattr(trainer, "examples", None)
        source = JointSource(train, retriever, view, tokenizer, top_k=top_k, candidates=fetch, max_len=trainer.max_seq_len,
                             fmt=fmt)  # fmt: skip
        record = run_dir / "joint" / f"examples.rank{rank}.jsonl" if joint.record_examples else None
        hook = JointHook(joint, retriever, ropt, view, manager, evals, record)
        summary = Trainer(variant, engine, source, cfg=trainer, run_dir=run_dir, logger=logger, hooks=[hook],
                          identity={"joint_loss": joint.loss, "joint_side": joint.side},
                          stop_requested=stop_requested, index_version=lambda: view.served.version,
                          log_prefix="joint").fit()  # fmt: skip
        state = engine.full_state_dict()
        if rank == 0:
            _save(run_dir, variant, engine, state, tokenizer, retriever, joint, summary, fmt, top_k)
        if world > 1:
            dist.barrier()
    finally:
        if hook is not None:
            hook.close()
        if rank == 0 and joint.side == "both":
            stop_service(service)
        engine.close()
    return summary


def _save(run_dir: Path, variant: str, engine: Any, state: Any, tokenizer: Any, retriever: Any,
          joint: JointConfig, summary: dict[str, Any], fmt: Any, top_k: int) -> None:
    from ragdist.index.snapshot import atomic_write_text
    from ragdist.joint.report import write_joint_report
    from ragdist.prompts import write_reader_format
    from ragdist.train.model import save_pretrained_atomic

    out = run_dir / "checkpoints" / variant
    lm_state = {k.removeprefix("lm."): v for k, v in state.items()} if state is not None else None
    save_pretrained_atomic(engine.module.lm, tokenizer, out, state_dict=lm_state)
    if fmt is not None:  # each training row held one retrieved passage: the model reads them one at a time
        write_reader_format(out, fmt, top_k, aggregation="sequential")
    # The query encoder as a plain HF encoder dir (mean pooling): what `ragdist-eval eval.joint_run=` reads.
    save_pretrained_atomic(retriever.query.model, retriever.query.tokenizer, run_dir / "retriever")
    if joint.side == "both":
        save_pretrained_atomic(retriever.passage.model, retriever.passage.tokenizer, run_dir / "passage_encoder")
    j = summary["joint"]
    final = {"snapshot": j["final_index"]["snapshot"], "version": j["final_index"]["version"],
             "encoder_step": j["final_index"]["encoder_step"], "query_encoder": str(run_dir / "retriever"),
             "passage_encoder": str(run_dir / "passage_encoder") if joint.side == "both" else ""}  # fmt: skip
    atomic_write_text(run_dir / "joint" / "final.json", json.dumps(final, indent=1))
    atomic_write_text(run_dir / f"train_{variant}.json", json.dumps(summary, indent=1, default=str))
    write_joint_report(run_dir, summary)
