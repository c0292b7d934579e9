"""Supervised retriever training (DPR): a batch source and a hook of the one training loop.

    ragdist-train +experiment=tiny joint=dpr                                 # the retriever on gold ids only
    ragdist-train +experiment=tiny joint=dpr joint.side=both joint.refresh_every=50
    ragdist-train +experiment=tiny joint=lsr joint.supervised.steps=200       # then joint training from it

Each micro-batch (`ContrastiveSource.build`, built ahead in the prefetch thread) holds B training
questions, the passage of each one's first gold id, and `hard_negatives` more per question: the
best-ranked passages that are not gold among the `mine_depth` the retrieval service returns for it
(mined with the index's own embedder, DPR's fixed hard negatives). The engine wraps
`ContrastiveRetriever`, whose forward returns InfoNCE over every passage of the batch: each question's
gold against the other questions' golds (in-batch negatives) and all mined negatives; a passage that
is gold for the question too is masked, never counted as a negative.

With side=query only the query encoder trains: the passages' vectors come from the frozen encoder the
index was built with, so the index stays valid. With side=both the passage encoder trains too and rank 0
refreshes the index in the background, as joint training does (`ragdist.joint.refresh`). The result is
saved exactly as joint runs save theirs: `<run>/retriever` (query encoder), `<run>/passage_encoder`
(side=both), `<run>/joint/final.json` and `joint_report.{json,md}`, so evaluation reads it unchanged.

Retrieval imports: `RetrievalClient.retrieve` (mining), `start_service`/`stop_service`, and
`ragdist.joint.refresh.IndexView` / `RefreshManager` / `joint_service` (recall, refresh).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ragdist.distributed import broadcast_object, on_rank0
from ragdist.errors import ConfigError, DataError
from ragdist.joint.config import JointConfig, check_supervised_config
from ragdist.joint.refresh import ServedVersion
from ragdist.joint.retriever import PASSAGE_FORMAT, MeanPoolEncoder
from ragdist.joint.train import _broadcast_version, _fmt_recall, is_gold, retrieval_recall, retriever_summary
from ragdist.train.trainer import Hook, Position, Trainer, finished_summary

log = logging.getLogger(__name__)

VARIANT = "retriever"  # the stage's name: train_state/retriever, train_retriever.json


class ContrastiveRetriever(nn.Module):
    """What the engine wraps: the query encoder (and with side=both the passage encoder); forward → InfoNCE.

    Parameter names are those of `JointRetriever` (`query.model.*`, `passage.model.*`), so either
    loads the other's weights."""

    def __init__(self, query: MeanPoolEncoder, passage: MeanPoolEncoder | None, temperature: float):
        super().__init__()
        self.query = query
        self.passage = passage
        self.temperature = temperature
        self.last: dict[str, float] = {}

    def forward(self, q_input_ids: torch.Tensor, q_attention_mask: torch.Tensor, labels: torch.Tensor,
                exclude: torch.Tensor, p_vectors: torch.Tensor | None = None, p_input_ids: torch.Tensor | None = None,
                p_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.query.embed(q_input_ids, q_attention_mask)
        if self.passage is not None:
            if p_input_ids is None or p_attention_mask is None:
                raise ValueError("side=both: the batch must hold the passages' tokens")
            p = self.passage.embed(p_input_ids, p_attention_mask)
        elif p_vectors is None:
            raise ValueError("side=query: the batch must hold the passages' vectors")
        else:
            p = p_vectors.to(q.dtype)
        logits = (q @ p.T) / self.temperature
        logits = logits.masked_fill(exclude.bool(), float("-inf"))
        loss = F.cross_entropy(logits.float(), labels.long())
        with torch.no_grad():
            self.last = {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
                         "candidates": float(p.shape[0])}  # fmt: skip
        return loss


@dataclass
class ContrastiveBatch:
    tensors: dict[str, torch.Tensor]
    tokens: int
    examples: list[Any]
    passages: list[dict[str, Any]]


class PassageVectors:
    """The frozen passage encoder's vectors, by passage id, for side=query.

    Each passage is encoded alone, so its vector is the same bits whichever batch first asked for it:
    a resumed run rebuilds the batches of an uninterrupted one exactly, with no cache in the checkpoint."""

    def __init__(self, encoder: MeanPoolEncoder, cache_size: int = 200_000):
        self.encoder = encoder
        self.cache: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    def __call__(self, passages: list[dict[str, Any]]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for p in passages:
                key = str(p["id"])
                v = self.cache.get(key)
                if v is None:
                    v = self.encoder([PASSAGE_FORMAT.format(**p)])[0]
                    if len(self.cache) < self.cache_size:
                        self.cache[key] = v
                out.append(v)
        return torch.stack(out)


class ContrastiveSource:
    """B questions with their gold passages and mined hard negatives; see the module docstring.

    `passage_of(id)`: the passage row for a gold id (chunk or document id). `mine(questions, k)`: the
    retrieval service's top-k passages per question. Batches depend only on their position: built ahead.
    """

    prefetch = True

    def __init__(self, examples: list[Any], *, passage_of: Callable[[str], dict[str, Any] | None],
                 mine: Callable[[list[str], int], list[list[dict[str, Any]]]] | None, tokenizer: Any,
                 max_length: int, hard_negatives: int, mine_depth: int, vectors: PassageVectors | None,
                 lookahead: int = 1):
        self.examples = [ex for ex in examples if ex.gold_ids]
        if not self.examples:
            raise DataError("joint.supervised: the training QA has no gold_ids; supervised retriever training needs them")
        self.num_examples = len(self.examples)
        self.passage_of, self.mine, self.tokenizer = passage_of, mine, tokenizer
        self.max_length, self.hard_negatives, self.mine_depth = max_length, hard_negatives, mine_depth
        self.vectors = vectors
        self.lookahead = lookahead
        self.missing_gold = 0

    def stream(self, positions: Iterator[Position]) -> Iterator[Position]:
        if self.mine is None or self.hard_negatives == 0 or self.lookahead <= 1:
            return positions
        from ragdist.train.prefetch import Lookahead

        la = Lookahead(self.mine, positions, lambda p: [self.examples[i].question for i in p.ids], self.lookahead)
        self.mine = la
        return la.positions()

    def _gold(self, ex: Any) -> dict[str, Any]:
        for gid in ex.gold_ids:
            p = self.passage_of(str(gid))
            if p is not None:
                return p
        raise DataError(f"joint.supervised: example {ex.id!r}: none of its gold ids {list(ex.gold_ids)} is in the index")

    def fetch(self, pos: Position) -> list[list[dict[str, Any]]] | None:
        """The mined passages (the service's top `mine_depth` per question): run ahead."""
        if self.mine is None or not self.hard_negatives:
            return None
        return self.mine([self.examples[i].question for i in pos.ids], self.mine_depth)

    def build(self, pos: Position, mined: list[list[dict[str, Any]]] | None = None) -> ContrastiveBatch:
        batch = [self.examples[i] for i in pos.ids]
        questions = [ex.question for ex in batch]
        # One column per distinct passage: golds first, then mined negatives.
        columns: list[dict[str, Any]] = []
        where: dict[str, int] = {}

        def column(p: dict[str, Any]) -> int:
            key = str(p["id"])
            if key not in where:
                where[key] = len(columns)
                columns.append(p)
            return where[key]

        labels = [column(self._gold(ex)) for ex in batch]
        if mined is None and self.mine is not None and self.hard_negatives:
            mined = self.fetch(pos)
        if mined is not None:
            for ex, ps in zip(batch, mined):
                gold = set(map(str, ex.gold_ids))
                for p in [p for p in ps if not is_gold(p, gold)][: self.hard_negatives]:
                    column(p)
        exclude = torch.zeros(len(batch), len(columns), dtype=torch.bool)
        for i, ex in enumerate(batch):
            gold = set(map(str, ex.gold_ids))
            for j, p in enumerate(columns):
                if j != labels[i] and is_gold(p, gold):
                    exclude[i, j] = True  # another question's gold that answers this one too
        q = self.tokenizer(questions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tensors = {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
                   "labels": torch.tensor(labels), "exclude": exclude}  # fmt: skip
        tokens = int(q["attention_mask"].sum())
        if self.vectors is not None:
            tensors["p_vectors"] = self.vectors(columns)
        else:
            p = self.tokenizer([PASSAGE_FORMAT.format(**c) for c in columns], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")  # fmt: skip
            tensors["p_input_ids"], tensors["p_attention_mask"] = p["input_ids"], p["attention_mask"]
            tokens += int(p["attention_mask"].sum())
        return ContrastiveBatch(tensors, tokens, batch, columns)


class SupervisedHook(Hook):
    """Recall before/after (rank 0), the side=both index refresh, and the stage's summary.

    The encoders live in the engine (possibly sharded); rank 0 keeps `mirror`, a plain copy refreshed from
    the engine's full weights (a collective every rank joins) whenever it must encode or snapshot."""

    name = "supervised"

    def __init__(self, cfg: JointConfig, mirror: Any, view: Any, manager: Any, evals: list[Any]):
        self.cfg, self.mirror, self.view, self.manager, self.evals = cfg, mirror, view, manager, evals
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"recall_before": self.before, "served": asdict(self.view.served)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("recall_before")

    def _sync(self, trainer: Trainer) -> None:
        """Collective: rank 0's mirror takes the engine's current weights."""
        state = trainer.engine.full_state_dict()
        if trainer.rank == 0:
            assert state is not None
            missing, unexpected = self.mirror.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
            if unexpected or [k for k in missing if k.startswith("query.")]:
                raise RuntimeError(f"retriever weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def on_start(self, trainer: Trainer) -> None:
        if trainer.resumed_from is None:
            self._sync(trainer)  # the starting weights (query_noise included)
            if trainer.rank == 0:
                self.before = retrieval_recall(self.view, self.mirror.query, self.evals, list(self.cfg.recall_ks))
                log.info("[supervised %s] recall before: %s", self.cfg.side, _fmt_recall(self.before))

    def after_step(self, trainer: Trainer, step: int) -> dict[str, Any]:
        parts = getattr(trainer.engine.module, "last", {}) or {}
        rec: dict[str, Any] = {"accuracy": parts.get("accuracy"), "candidates": parts.get("candidates")}
        if self.cfg.side != "both":
            return rec
        cfg, manager, used = self.cfg, self.manager, self.view.served
        new, drift = None, None
        want = None
        if manager is not None:
            new = manager.poll(step)
            busy = manager.inflight() and not (cfg.refresh_supersede and manager.inflight() < 2)
            drift_due = bool(cfg.refresh_drift) and step % cfg.refresh_drift_every == 0
            want = bool(drift_due or (manager.due(step, None) and not busy))
        if broadcast_object(want):  # the snapshot needs the passage encoder's current weights on rank 0
            self._sync(trainer)
            if manager is not None:
                if cfg.refresh_drift and step % cfg.refresh_drift_every == 0:
                    drift = manager.drift(self.mirror.passage)
                manager.maybe_start(step, self.mirror.passage, drift)
        if manager is not None and new is None and cfg.refresh_wait_staleness and \
                manager.staleness(step) >= cfg.refresh_wait_staleness:
            new = manager.wait(step)
        new = _broadcast_version(new, trainer.rank, trainer.world)
        if new is not None:
            self.view.switch(new)
            if manager is not None:
                manager.promote(new)
        inflight = manager.inflight() if manager is not None else 0
        rec.update(index_seq=used.seq, staleness=step - used.encoder_step, refresh_inflight=inflight)
        if drift is not None:
            rec["drift"] = drift
        if inflight:
            rec["note"] = f" index r{used.seq}, refreshing ({inflight})"
        return rec

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._sync(trainer)
        final = None
        if self.manager is not None:
            final = self.manager.finish(trainer.step, self.mirror.passage, self.cfg.refresh_final)
        final = _broadcast_version(final, trainer.rank, trainer.world)
        if final is not None and self.view.served.seq != final.seq:
            self.view.switch(final)
        if trainer.rank == 0:
            self.after = retrieval_recall(self.view, self.mirror.query, self.evals, list(self.cfg.recall_ks))
            log.info("[supervised %s] recall after: %s", self.cfg.side, _fmt_recall(self.after))
        summary["joint"] = retriever_summary(summary["history"], loss="dpr", stage="supervised", cfg=self.cfg,
                                             before=self.before, after=self.after, view=self.view,
                                             manager=self.manager, run_dir=trainer.run_dir)  # fmt: skip

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def stage_config(trainer: Any, joint: JointConfig) -> Any:
    """The trainer config of the supervised stage: the run's engine, checkpointing and seed with the
    stage's own steps, batch, learning rate and schedule."""
    sup = joint.supervised
    return replace(trainer, max_steps=sup.steps, micro_batch_size=sup.batch_size, grad_accum=1, lr=sup.lr,
                   weight_decay=sup.weight_decay, warmup_steps=sup.warmup_steps, schedule=sup.schedule,
                   grad_clip=joint.grad_clip)  # fmt: skip


def finished(run_dir: Path, trainer: Any) -> dict[str, Any] | None:
    """On resume: a stage whose retriever and summary exist for its steps needs nothing more."""
    return finished_summary(run_dir, VARIANT, trainer, artifact=run_dir / "retriever" / "config.json")


def train_supervised(
    train: list[Any],
    evals: list[Any],
    *,
    joint: JointConfig,
    trainer: Any,
    retrieval: Any,
    embedder_cfg: Any,
    snapshot: str,
    run_dir: str | Path,
    logger: Any,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train the retriever on the training QA's gold ids; every rank calls this (the process group is up).

    The run's retrieval service must be serving `snapshot` (it mines the hard negatives). Raises
    `Preempted` (after checkpointing) when `stop_requested()` turned true on any rank.
    """
    from ragdist.embed import build_embedder
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.index.snapshot import read_manifest
    from ragdist.joint.refresh import IndexView, RefreshManager, joint_service, load_chunks
    from ragdist.joint.retriever import JointRetriever, encoder_dir
    from ragdist.retrieval.client import RetrievalClient, start_service, stop_service
    from ragdist.train.engines import build_engine
    from ragdist.train.examples import PassageStore
    from ragdist.train.trainer import Trainer

    run_dir = Path(run_dir)
    check_supervised_config(joint)
    sup = joint.supervised
    if sup.steps < 1:
        raise ConfigError("joint.supervised.steps=0: no supervised stage to run")
    cfg = stage_config(trainer, joint)
    done = finished(run_dir, cfg)
    if done is not None:
        log.info("[%s] already trained to step %d in %s; skipping", VARIANT, done["steps"], run_dir)
        return done
    manifest = read_manifest(snapshot)
    if sup.mine_depth > int(manifest["num_chunks"]):
        raise ConfigError(f"joint.supervised.mine_depth={sup.mine_depth}: the index holds only {manifest['num_chunks']} passages")
    enc_path = encoder_dir(resolve_model_path(embedder_cfg.name))

    def build() -> nn.Module:
        # Same seed on every rank: identical starting weights (FSDP does not broadcast them).
        torch.manual_seed(trainer.seed)
        start = JointRetriever(enc_path, joint.side, max_length=joint.encoder_max_length)
        start.perturb_query(joint.query_noise, trainer.seed + 1)
        return ContrastiveRetriever(start.query, start.passage if joint.side == "both" else None, sup.temperature)

    store = PassageStore.from_snapshot(snapshot)
    emb_cfg = replace(embedder_cfg, progress=False)
    miner = RetrievalClient(retrieval, embedder=build_embedder(emb_cfg)) if sup.hard_negatives else None
    engine = build_engine(cfg, build, run_dir)
    rank = engine.rank
    served = ServedVersion(0, str(manifest["version"]), str(snapshot), 0)
    service = retrieval
    hook: SupervisedHook | None = None
    try:
        if joint.side == "both":
            served = _resumed_served(cfg, run_dir) or served
            service = joint_service(retrieval)
            on_rank0(lambda: start_service(served.snapshot, service), what="start the joint retrieval service")
        view = IndexView(service, served)
        mirror = JointRetriever(enc_path, joint.side, max_length=joint.encoder_max_length) if rank == 0 else None
        manager = None
        if rank == 0 and joint.side == "both":
            probe = []
            if joint.refresh_drift:
                chunks, _ = load_chunks(snapshot)
                pick = np.random.default_rng(trainer.seed).choice(len(chunks), min(joint.refresh_probe, len(chunks)),
                                                                  replace=False)  # fmt: skip
                probe = [chunks[int(i)].text for i in sorted(pick)]
            manager = RefreshManager(joint, source_snapshot=str(snapshot), served=served, service=service,
                                     encoder_path=enc_path, run_dir=run_dir, probe_texts=probe)  # fmt: skip
            if probe:
                manager.probe_ref = mirror.passage.encode(probe)
        # side=query: the frozen passage encoder (the index's) gives the passages' vectors, rank-locally.
        vectors = PassageVectors(MeanPoolEncoder(enc_path, joint.encoder_max_length)) if joint.side == "query" else None
        tok = engine.module.query.tokenizer
        source = ContrastiveSource(train, passage_of=store.get, mine=miner.retrieve if miner else None, tokenizer=tok,
                                   max_length=joint.encoder_max_length, hard_negatives=sup.hard_negatives,
                                   mine_depth=sup.mine_depth, vectors=vectors,
                                   lookahead=cfg.retrieval_lookahead)  # fmt: skip
        hook = SupervisedHook(joint, mirror, view, manager, evals)
        summary = Trainer(VARIANT, engine, source, cfg=cfg, run_dir=run_dir, logger=logger, hooks=[hook],
                          identity={"joint_stage": "supervised", "joint_side": joint.side},
                          stop_requested=stop_requested, index_version=lambda: view.served.version,
                          log_prefix="supervised").fit()  # fmt: skip
        summary["checkpoint"] = str(run_dir / "retriever")
        if rank == 0:
            _save(run_dir, mirror, joint, summary)
        if engine.world_size > 1:
            dist.barrier()
    finally:
        if hook is not None:
            hook.close()
        if rank == 0 and joint.side == "both":
            stop_service(service)
        engine.close()
    return summary


def _resumed_served(cfg: Any, run_dir: Path) -> ServedVersion | None:
    from ragdist.train import checkpoint as ckpt
    from ragdist.train.trainer import _resume_spec

    found = ckpt.find_checkpoint(_resume_spec(cfg.resume, VARIANT), run_dir / "train_state" / VARIANT)
    if found is None:
        return None
    served = ckpt.read_state(found).get("hooks", {}).get(SupervisedHook.name, {}).get("served")
    if served and Path(served["snapshot"]).is_dir():
        return ServedVersion(**served)
    return None


def _save(run_dir: Path, mirror: Any, joint: JointConfig, summary: dict[str, Any]) -> None:
    """Rank 0: the same layout joint runs leave (see `ragdist.joint.train._save`), without a generator."""
    from ragdist.index.snapshot import atomic_write_text
    from ragdist.joint.report import write_joint_report
    from ragdist.train.model import save_pretrained_atomic

    save_pretrained_atomic(mirror.query.model, mirror.query.tokenizer, run_dir / "retriever")
    if joint.side == "both":
        save_pretrained_atomic(mirror.passage.model, mirror.passage.tokenizer, run_dir / "passage_encoder")
    fi = summary["joint"]["final_index"]
    final = {"snapshot": fi["snapshot"], "version": fi["version"], "encoder_step": fi["encoder_step"],
             "query_encoder": str(run_dir / "retriever"),
             "passage_encoder": str(run_dir / "passage_encoder") if joint.side == "both" else "",
             "stage": "supervised"}  # fmt: skip
    (run_dir / "joint").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "joint" / "final.json", json.dumps(final, indent=1))
    atomic_write_text(run_dir / f"train_{VARIANT}.json", json.dumps(summary, indent=1, default=str))
    write_joint_report(run_dir, summary)


# --------------------------------------------------------------------------- after the stage


def supervised_result(run_dir: str | Path) -> dict[str, Any]:
    """What the stage left: its final index snapshot and encoder dirs (`<run>/joint/final.json`)."""
    f = Path(run_dir) / "joint" / "final.json"
    if not f.is_file():
        raise ConfigError(f"{f}: the supervised stage left no final.json (did it finish?)")
    return json.loads(f.read_text())


class TrainedRetrieval:
    """`retrieve(questions, k)` with the supervised stage's query encoder over its final index: what plain
    RAG fine-tuning reads after `joint=dpr` (no joint loss). side=both serves the refreshed index from a
    service of the run's own (`<retrieval.service_name>-joint`), started by rank 0 and stopped by `close`."""

    def __init__(self, run_dir: str | Path, joint: JointConfig, retrieval: Any, rank: int):
        from ragdist.index.snapshot import read_manifest
        from ragdist.joint.refresh import IndexView, joint_service
        from ragdist.retrieval.client import start_service

        final = supervised_result(run_dir)
        self.encoder = MeanPoolEncoder(final["query_encoder"], joint.encoder_max_length)
        self.rank = rank
        self.service = joint_service(retrieval) if joint.side == "both" else None
        service = self.service or retrieval
        if self.service is not None:
            on_rank0(lambda: start_service(final["snapshot"], service), what="start the joint retrieval service")
        version = str(read_manifest(final["snapshot"])["version"])
        self.view = IndexView(service, ServedVersion(0, version, final["snapshot"], int(final["encoder_step"])))

    def retrieve(self, questions: list[str], k: int) -> list[list[dict[str, Any]]]:
        return self.view.search(self.encoder.encode(list(questions)), k).passages

    def version(self) -> str:
        return self.view.served.version

    def close(self) -> None:
        from ragdist.retrieval.client import stop_service

        if self.service is not None and self.rank == 0:
            stop_service(self.service)
