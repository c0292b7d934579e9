"""Joint retriever–generator training: one loop per rank, the generator in the engine, the retriever beside it.

    ragdist-train +experiment=tiny joint=lsr                          # query encoder only (index stays valid)
    ragdist-train +experiment=tiny joint=lsr joint.side=both joint.refresh_every=10

Each optimizer step, on every rank:
  1. the current query encoder embeds the micro-batch's questions; the served index version returns
     `candidates` passages each (over-retrieval);
  2. with side=both the candidates are re-scored with the current passage encoder and the top_k kept
     (Atlas' re-rank: the index may be a few steps stale, the scores are not);
  3. the retriever scores the kept passages with gradient; the generator reads one sequence per
     (question, passage); the engine's backward carries the joint loss into both;
  4. the generator's engine steps; the retriever's gradients are all-reduced and its optimizer steps;
  5. rank 0 polls the refresh manager; a new index version, when ready, is broadcast and every rank
     switches to it at the same step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ragdist.errors import ConfigError, RetrievalError

log = logging.getLogger(__name__)


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


def check_joint_config(cfg: JointConfig, top_k: int) -> None:
    from ragdist.joint.losses import LOSSES

    if cfg.loss not in LOSSES:
        raise ConfigError(f"joint.loss={cfg.loss!r}: expected none or one of {', '.join(LOSSES)}")
    if cfg.side not in ("query", "both"):
        raise ConfigError(f"joint.side={cfg.side!r}: expected 'query' or 'both'")
    if top_k < 2:
        raise ConfigError(f"joint.top_k={top_k}: the retriever's distribution needs at least 2 passages per question")
    if cfg.candidates and cfg.candidates < top_k:
        raise ConfigError(f"joint.candidates={cfg.candidates}: must be 0 or at least joint.top_k={top_k}")
    for key in ("retriever_temperature", "lm_temperature"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"joint.{key}={getattr(cfg, key)}: must be positive")
    for key in ("generator_weight", "retriever_weight", "lr", "query_noise", "refresh_drift", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"joint.{key}={getattr(cfg, key)}: must not be negative")
    if cfg.schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"joint.schedule={cfg.schedule!r}: expected constant, linear or cosine")
    if not cfg.recall_ks or any(k < 1 for k in cfg.recall_ks):
        raise ConfigError(f"joint.recall_ks={list(cfg.recall_ks)}: positive integers, at least one")
    for key in ("refresh_every", "refresh_max_staleness", "refresh_max_retries", "refresh_probe", "retriever_start_step",
                "refresh_wait_staleness"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"joint.{key}={getattr(cfg, key)}: must not be negative")
    for key in ("refresh_workers", "refresh_threads", "refresh_batch_size", "refresh_drift_every", "refresh_keep_versions"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"joint.{key}={getattr(cfg, key)}: must be at least 1")
    if cfg.refresh_timeout_s <= 0 or cfg.refresh_backoff_s < 0:
        raise ConfigError("joint.refresh_timeout_s must be positive and joint.refresh_backoff_s not negative")
    if cfg.side == "query" and (cfg.refresh_every or cfg.refresh_max_staleness or cfg.refresh_drift
                                or cfg.refresh_wait_staleness):
        raise ConfigError("joint.refresh_* triggers need joint.side=both: with side=query the index never goes stale")


def rank_batches(n: int, rank: int, world: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's question indices for one epoch: a seeded shuffle split evenly, so ranks step together."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = (n // world) // batch * batch
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + batch] for i in range(0, per_rank, batch)]


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


def _broadcast_version(new: Any, rank: int, world: int) -> Any:
    """Rank 0's decision (a version or None) on every rank: one small broadcast a step, a second on a change."""
    from ragdist.joint.refresh import ServedVersion

    if world == 1:
        return new
    flag = torch.tensor([1 if (rank == 0 and new is not None) else 0], dtype=torch.int64)
    dist.broadcast(flag, src=0)
    if not int(flag.item()):
        return None
    box = [asdict(new) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return ServedVersion(**box[0])


def _on_rank0(rank: int, world: int, fn: Any) -> None:
    """Run `fn` on rank 0; every rank raises its error (a bare barrier would leave the others hanging)."""
    err = [None]
    if rank == 0:
        try:
            fn()
        except Exception as e:
            err[0] = f"{type(e).__name__}: {e}"
    if world > 1:
        dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise RetrievalError(f"rank 0 could not start the joint retrieval service: {err[0]}")


class _Recorder:
    """Per rank: which index version (and staleness) every training example was built from."""

    def __init__(self, path: Path | None):
        self.fh = open(path, "a", encoding="utf-8") if path else None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.fh:
            self.fh.writelines(json.dumps(r) + "\n" for r in rows)

    def close(self) -> None:
        if self.fh:
            self.fh.close()


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
) -> dict[str, Any]:
    """Train generator and retriever together; every rank calls this (the process group is up)."""
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.index.snapshot import read_manifest
    from ragdist.joint.generator import JointLM
    from ragdist.joint.refresh import IndexView, RefreshManager, ServedVersion, joint_service, load_chunks
    from ragdist.joint.retriever import JointRetriever, RetrieverOptimizer, encoder_dir
    from ragdist.retrieval.client import start_service, stop_service
    from ragdist.train.engine import build_engine, lr_lambda
    from ragdist.train.examples import collate_train, encode_train
    from ragdist.train.model import build_generator

    run_dir = Path(run_dir)
    top_k = joint.top_k or retrieval.top_k
    check_joint_config(joint, top_k)
    fetch = max(joint.candidates, top_k)
    manifest = read_manifest(snapshot)
    if fetch > int(manifest["num_chunks"]):
        raise ConfigError(f"joint: {fetch} passages per question but the index holds only {manifest['num_chunks']}")
    enc_path = encoder_dir(resolve_model_path(embedder_cfg.name))
    fmt = getattr(trainer, "examples", None)
    if peft_cfg is not None and peft_cfg.method != "none":
        raise ConfigError(f"peft.method={peft_cfg.method}: joint training trains the full generator (or a frozen "
                          "part of it via peft.freeze / peft.train_last_n_blocks); adapters are not supported with joint.loss")

    # Same seed on every rank: the retriever replicas start identical and stay so (averaged gradients).
    torch.manual_seed(trainer.seed)
    retriever = JointRetriever(enc_path, joint.side, max_length=joint.encoder_max_length)
    retriever.perturb_query(joint.query_noise, trainer.seed + 1)

    def build() -> torch.nn.Module:
        lm = build_generator(model_cfg, tokenizer)
        if peft_cfg is not None:
            from ragdist.train.peft import apply_freezing

            apply_freezing(lm, peft_cfg)
        return JointLM(lm, loss=joint.loss, generator_weight=joint.generator_weight,
                       retriever_weight=joint.retriever_weight, retriever_temperature=joint.retriever_temperature,
                       lm_temperature=joint.lm_temperature)

    engine = build_engine(trainer, build, run_dir)
    rank, world = engine.rank, engine.world_size
    if len(train) // world < trainer.micro_batch_size:
        raise ConfigError(f"{len(train)} training questions cannot fill micro-batches of {trainer.micro_batch_size} on {world} ranks")
    sched = lr_lambda(replace(trainer, warmup_steps=joint.warmup_steps, schedule=joint.schedule,
                              min_lr_ratio=joint.min_lr_ratio))
    ropt = RetrieverOptimizer(retriever.trainable(), lr=joint.lr, weight_decay=joint.weight_decay,
                              grad_clip=joint.grad_clip, schedule=sched)

    served = ServedVersion(0, str(manifest["version"]), str(snapshot), 0)
    service = retrieval
    if joint.side == "both":
        # Refreshed versions go to a service of the run's own; the main one keeps the original index.
        service = joint_service(retrieval)
        _on_rank0(rank, world, lambda: start_service(str(snapshot), service))
    view = IndexView(service, served)
    manager = None
    if rank == 0 and joint.side == "both":
        probe = []
        if joint.refresh_drift:
            chunks, _ = load_chunks(snapshot)
            pick = np.random.default_rng(trainer.seed).choice(len(chunks), min(joint.refresh_probe, len(chunks)), replace=False)
            probe = [chunks[int(i)].text for i in sorted(pick)]
        manager = RefreshManager(joint, source_snapshot=str(snapshot), served=served, service=service,
                                 encoder_path=enc_path, run_dir=run_dir, probe_texts=probe, faults=faults)
        if probe:
            manager.probe_ref = retriever.passage.encode(probe)
    before = retrieval_recall(view, retriever.query, evals, list(joint.recall_ks)) if rank == 0 else {}
    if rank == 0:
        log.info("[joint %s/%s] recall before: %s", joint.loss, joint.side, _fmt_recall(before))

    rec_dir = run_dir / "joint"
    rec_dir.mkdir(parents=True, exist_ok=True)
    recorder = _Recorder(rec_dir / f"examples.rank{rank}.jsonl" if joint.record_examples else None)
    history: list[dict[str, Any]] = []
    micro = step = epoch = 0
    t_start = time.perf_counter()
    t_step = time.perf_counter()
    wait_s = 0.0
    try:
        while step < trainer.max_steps:
            for idx in rank_batches(len(train), rank, world, trainer.micro_batch_size, trainer.seed, epoch):
                batch = [train[int(i)] for i in idx]
                questions = [ex.question for ex in batch]
                used = view.served
                t0 = time.perf_counter()
                # One query forward, with gradient: its detached values search, the same tensor is scored.
                q = retriever.query(questions)
                candidates = view.retrieve(questions, fetch, vectors=q.detach().numpy())
                wait_s += time.perf_counter() - t0
                chosen = _rerank(retriever, q.detach(), candidates, top_k) if fetch > top_k else [ps[:top_k] for ps in candidates]
                scores = retriever.scores(questions, chosen, q=q)
                rows = [encode_train(tokenizer, ex.question, [p], ex.answers[0], trainer.max_seq_len, fmt)
                        for ex, ps in zip(batch, chosen) for p in ps]
                tensors = collate_train(rows, tokenizer.pad_token_id)
                tensors["retriever_scores"] = scores
                loss = float(engine.train_step(tensors))
                micro += 1
                staleness = step - used.encoder_step if joint.side == "both" else 0
                recorder.write([{"step": step, "example": ex.id, "index_version": used.version, "index_seq": used.seq,
                                 "staleness": staleness, "passages": [str(p.get("id")) for p in ps]}
                                for ex, ps in zip(batch, chosen)])
                if micro % trainer.grad_accum:
                    continue
                if step >= joint.retriever_start_step:
                    gnorm = ropt.step()
                else:  # the generator learns to read first; the retriever's gradients are dropped
                    gnorm = 0.0
                    for p in ropt.params:
                        p.grad = None
                step += 1
                new = None
                inflight = 0
                drift = None
                if manager is not None:
                    new = manager.poll(step)
                    if joint.refresh_drift and step % joint.refresh_drift_every == 0:
                        drift = manager.drift(retriever.passage)
                    manager.maybe_start(step, retriever.passage, drift)
                    inflight = manager.inflight()
                    if new is None and joint.refresh_wait_staleness and manager.staleness(step) >= joint.refresh_wait_staleness:
                        new = manager.wait(step)
                new = _broadcast_version(new, rank, world)
                if new is not None:
                    view.switch(new)
                    if manager is not None:
                        manager.promote(new)
                now = time.perf_counter()
                parts = engine.module.last if hasattr(engine.module, "last") else {}
                h = {"step": step, "loss": loss, "gen_loss": parts.get("gen_loss"), "retriever_loss": parts.get("retriever_loss"),
                     "agree": parts.get("agree"), "step_s": now - t_step, "retriever_grad_norm": gnorm,
                     "index_seq": used.seq, "staleness": staleness, "refresh_inflight": inflight}
                if drift is not None:
                    h["drift"] = drift
                t_step = now
                history.append(h)
                if step % trainer.log_every == 0 or step == 1 or step == trainer.max_steps:
                    logger.log({f"train/joint/{k}": v for k, v in h.items() if k != "step" and v is not None}
                               | {"train/joint/lr": engine.lr(), "train/joint/retriever_lr": ropt.lr(),
                                  "train/joint/retrieval_wait_s": wait_s / micro}, step=step)
                    if rank == 0:
                        log.info("[joint %s] step %d/%d loss %.4f (gen %.4f, retriever %.4f) index r%d staleness %d%s",
                                 joint.loss, step, trainer.max_steps, loss, h["gen_loss"] or 0.0, h["retriever_loss"] or 0.0,
                                 used.seq, staleness, f" refreshing ({inflight})" if inflight else "")
                if step >= trainer.max_steps:
                    break
            epoch += 1
        elapsed = time.perf_counter() - t_start
        final = manager.finish(step, retriever.passage, joint.refresh_final) if manager is not None else None
        final = _broadcast_version(final, rank, world)
        if final is not None and view.served.seq != final.seq:
            view.switch(final)
        after = retrieval_recall(view, retriever.query, evals, list(joint.recall_ks)) if rank == 0 else {}
        state = engine.full_state_dict()
        summary = _summary(variant, joint, history, step, epoch, elapsed, world, wait_s, micro, before, after,
                           manager, view.served, run_dir)
        if rank == 0:
            _save(run_dir, variant, engine, state, tokenizer, retriever, joint, summary)
            log.info("[joint %s/%s] recall after: %s", joint.loss, joint.side, _fmt_recall(after))
        if world > 1:
            dist.barrier()
    finally:
        recorder.close()
        if manager is not None:
            manager.close()
        if rank == 0 and joint.side == "both":
            stop_service(service)
    engine.close()
    return summary


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


def _fmt_recall(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("recall@")) or "no gold ids"


def _summary(variant: str, joint: JointConfig, history: list[dict[str, Any]], step: int, epoch: int, elapsed: float,
             world: int, wait_s: float, micro: int, before: dict[str, Any], after: dict[str, Any], manager: Any,
             served: Any, run_dir: Path) -> dict[str, Any]:
    n = max(1, len(history) // 10)
    losses = [h["loss"] for h in history] or [float("nan")]
    step_s = [h["step_s"] for h in history[1:]] or [0.0]
    during = [h["step_s"] for h in history[1:] if h["refresh_inflight"]]
    return {
        "variant": variant,
        "steps": step,
        "epochs": epoch,
        "elapsed_s": elapsed,
        "world_size": world,
        "retrieval_wait_s_per_step": wait_s / max(micro, 1),
        "first_loss": float(np.mean(losses[:n])),
        "last_loss": float(np.mean(losses[-n:])),
        "history": history,
        "checkpoint": str(run_dir / "checkpoints" / variant),
        "joint": {
            "loss": joint.loss,
            "side": joint.side,
            "config": asdict(joint),
            "recall_before": before,
            "recall_after": after,
            "median_step_s": float(np.median(step_s)),
            "max_step_during_refresh_s": float(max(during)) if during else None,
            "max_staleness": max((h["staleness"] for h in history), default=0),
            "final_index": asdict(served),
            "refresh": manager.summary() if manager is not None else None,
            "retriever_dir": str(run_dir / "retriever"),
        },
    }


def _save(run_dir: Path, variant: str, engine: Any, state: Any, tokenizer: Any, retriever: Any,
          joint: JointConfig, summary: dict[str, Any]) -> None:
    from ragdist.index.snapshot import atomic_write_text
    from ragdist.joint.report import write_joint_report
    from ragdist.train.model import save_pretrained_atomic

    out = run_dir / "checkpoints" / variant
    lm_state = {k.removeprefix("lm."): v for k, v in state.items()} if state is not None else None
    save_pretrained_atomic(engine.module.lm, tokenizer, out, state_dict=lm_state)
    # The query encoder as a plain HF encoder dir (mean pooling): what `ragdist-eval eval.joint_run=` reads.
    save_pretrained_atomic(retriever.query.model, retriever.query.tokenizer, run_dir / "retriever")
    if joint.side == "both":
        save_pretrained_atomic(retriever.passage.model, retriever.passage.tokenizer, run_dir / "passage_encoder")
    j = summary["joint"]
    final = {"snapshot": j["final_index"]["snapshot"], "version": j["final_index"]["version"],
             "encoder_step": j["final_index"]["encoder_step"], "query_encoder": str(run_dir / "retriever"),
             "passage_encoder": str(run_dir / "passage_encoder") if joint.side == "both" else ""}
    atomic_write_text(run_dir / "joint" / "final.json", json.dumps(final, indent=1))
    atomic_write_text(run_dir / f"train_{variant}.json", json.dumps(summary, indent=1, default=str))
    write_joint_report(run_dir, summary)


def train_joint_from_config(cfg: Any, train: list[Any], tokenizer: Any, logger: Any,
                            faults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `rag` variant of ragdist-train when `joint.loss` is set (see recipes/finetune.train_all)."""
    from ragdist.config import as_object
    from ragdist.recipes.common import load_qa_splits

    _, evals = load_qa_splits(cfg)
    return train_joint(
        "rag", train, evals,
        joint=as_object(cfg.joint), trainer=as_object(cfg.trainer), model_cfg=as_object(cfg.model),
        retrieval=as_object(cfg.retrieval), embedder_cfg=as_object(cfg.embedder), snapshot=str(cfg.index.snapshot),
        tokenizer=tokenizer, run_dir=cfg.run_dir, logger=logger, faults=faults,
        peft_cfg=as_object(cfg.peft) if "peft" in cfg else None,
    )  # fmt: skip
