"""The one training loop: an engine, a batch source and hooks.

    trainer = Trainer("rag", engine, ExampleSource(...), cfg=trainer_cfg, run_dir=run_dir, logger=logger)
    summary = trainer.fit()          # raises Preempted after checkpointing when a stop was requested

Plain RAG fine-tuning, closed book and joint retriever training differ only in their batch source
(what a micro-batch holds) and hooks (what happens after a micro-batch or an optimizer step); the
loop owns data order, prefetch, checkpoint/resume, preemption and logging for all of them.

Each rank walks its own seeded share of the examples; the batch for a position is the same whether
its inputs were fetched ahead in the prefetch thread or inline, and whether or not the run was
resumed there. Only a source's `fetch` (retrieval: waiting on the service, which frees the GIL) runs
ahead; its `build` (prompts, collation: pure Python) runs on the training thread, since Python in a
second thread holds the GIL against the step's own Python (on 2 CPU ranks, building the batches in
the thread cost ~5% of the step; inline, under 1%).
The all-reduce that averages the losses also carries the preemption flag, so all ranks agree on the
step at which to checkpoint without an extra collective; it runs about once a second
(`trainer.sync_every_s`) and at every log and checkpoint step, not once per step (see `_sync`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ragdist.errors import DataError
from ragdist.train import checkpoint as ckpt
from ragdist.train.engine import TrainEngine, TrainerConfig
from ragdist.train.preempt import Preempted
from ragdist.train.prefetch import Prefetcher

log = logging.getLogger(__name__)


def rank_batches(n: int, rank: int, world: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's micro-batches for one epoch: a seeded shuffle, split evenly so ranks step together."""
    order = np.random.default_rng(seed + epoch).permutation(n)
    per_rank = (n // world) // batch * batch
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + batch] for i in range(0, per_rank, batch)]


@dataclass(frozen=True)
class Position:
    """A micro-batch's place in the data stream: epoch, index within this rank's epoch, example ids."""

    epoch: int
    index: int
    ids: tuple[int, ...]


def positions(n: int, rank: int, world: int, batch: int, seed: int, epoch: int, index: int) -> Iterator[Position]:
    """This rank's micro-batches from (epoch, index) on, across epochs, forever."""
    while True:
        for j, ids in enumerate(rank_batches(n, rank, world, batch, seed, epoch)):
            if j >= index:
                yield Position(epoch, j, tuple(int(i) for i in ids))
        epoch, index = epoch + 1, 0


def take(it: Iterator[Position], n: int) -> Iterator[Position]:
    for _ in range(n):
        yield next(it)


class Batch(Protocol):
    tensors: dict[str, torch.Tensor]
    tokens: int


class BatchSource(Protocol):
    """What one training mode feeds the loop.

    `fetch(pos)`: what the batch needs from outside the process (retrieved passages); `build(pos,
    fetched)`: the batch, on the training thread. `prefetch`: whether `fetch` may run ahead in a
    background thread (it must then depend only on the position, never on the model's current
    weights — joint training's candidates are scored with gradient at step time, so it fetches inline).
    """

    num_examples: int
    prefetch: bool

    def stream(self, positions: Iterator[Position]) -> Iterator[Position]:
        """The positions the loop will build, possibly re-yielded by a lookahead that reads ahead."""
        ...

    def fetch(self, pos: Position) -> Any: ...

    def build(self, pos: Position, fetched: Any) -> Batch: ...


class Hook:
    """Called by the loop; every method is optional. Hooks that carry state across a resume return
    it from `state_dict` (JSON) and write/read tensors in `save`/`load` (every rank calls them; the
    directory is the checkpoint's own, renamed into place with it)."""

    name = "hook"

    def on_start(self, trainer: Trainer) -> None: ...

    def after_micro(self, trainer: Trainer, pos: Position, batch: Any, loss: torch.Tensor) -> None: ...

    def after_step(self, trainer: Trainer, step: int) -> dict[str, Any] | None:
        """Collective when the hook says so; returns extra fields for the step's record."""
        return None

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save(self, path: Path, rank: int) -> None: ...

    def load(self, path: Path, rank: int) -> None: ...


class Trainer:
    """Drives `engine` over `source` for `cfg.max_steps` optimizer steps; see the module docstring."""

    def __init__(
        self,
        name: str,
        engine: TrainEngine,
        source: BatchSource,
        *,
        cfg: TrainerConfig,
        run_dir: str | Path,
        logger: Any,
        hooks: Sequence[Hook] = (),
        identity: dict[str, Any] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        index_version: Callable[[], str | None] | None = None,
        log_prefix: str = "",
    ):
        self.name = name
        self.log_prefix = log_prefix or name
        self.engine = engine
        self.source = source
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.hooks = list(hooks)
        self.rank, self.world = engine.rank, engine.world_size
        self.identity = {"variant": name, "world_size": self.world, "engine": cfg.engine,
                         "num_examples": source.num_examples, **(identity or {})}  # fmt: skip
        self.stop_requested = stop_requested or (lambda: False)
        self.index_version = index_version or (lambda: None)
        self.state_root = self.run_dir / "train_state" / name
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: Path | None = None
        if source.num_examples // self.world < cfg.micro_batch_size:
            raise DataError(
                f"{source.num_examples} training examples cannot fill micro-batches of {cfg.micro_batch_size} "
                f"on {self.world} ranks"
            )

    # -- checkpoints ------------------------------------------------------------------------------

    def _resume(self) -> dict[str, Any]:
        st: dict[str, Any] = {"step": 0, "epoch": 0, "index": 0, "history": [], "elapsed_s": 0.0, "tokens": 0}
        self.resumed_from = ckpt.find_checkpoint(_resume_spec(self.cfg.resume, self.name), self.state_root)
        if self.resumed_from is None:
            return st
        st = ckpt.load_checkpoint(self.engine, self.resumed_from, self.identity)
        hooks_state = st.get("hooks", {})
        for h in self.hooks:
            h.load_state_dict(hooks_state.get(h.name, {}))
            h.load(self.resumed_from / "hooks", self.rank)
        if self.rank == 0:
            log.info("[%s] resumed from %s at step %d", self.name, self.resumed_from, st["step"])
        _check_index_version(st.get("index_version"), self.index_version(), self.resumed_from)
        return st

    def _state(self, pos: Position | None, st: dict[str, Any], elapsed: float, tokens: float) -> dict[str, Any]:
        epoch, index = (pos.epoch, pos.index + 1) if pos else (st["epoch"], st["index"])
        return {
            **self.identity,
            "step": self.step,
            "epoch": epoch,
            "index": index,
            "history": self.history,
            "index_version": self.index_version(),
            "elapsed_s": st["elapsed_s"] + elapsed,
            "tokens": tokens,
            "hooks": {h.name: h.state_dict() for h in self.hooks},
        }

    def _save(self, state: dict[str, Any]) -> Path:
        def extra(tmp: Path) -> None:
            for h in self.hooks:
                h.save(tmp / "hooks", self.rank)

        return ckpt.save_checkpoint(self.engine, self.state_root, state, keep=self.cfg.keep_checkpoints, extra=extra)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to `cfg.max_steps`; returns the summary (the engine stays open for the caller's export).

        Raises `Preempted` (after checkpointing) when `stop_requested()` turned true on any rank.
        """
        cfg, engine = self.cfg, self.engine
        st = self._resume()
        self.step, self.history = int(st["step"]), list(st["history"])
        remaining = max(0, cfg.max_steps - self.step) * cfg.grad_accum
        stream = self.source.stream(
            take(positions(self.source.num_examples, self.rank, self.world, cfg.micro_batch_size, cfg.seed,
                           st["epoch"], st["index"]), remaining)
        )  # fmt: skip
        for h in self.hooks:
            h.on_start(self)
        # A run resumed from its final checkpoint only needs the export.
        last_saved: Path | None = self.resumed_from if remaining == 0 else None
        t_start = time.perf_counter()
        self._tokens = float(st["tokens"])
        pos: Position | None = None
        micro = 0
        loss_acc: torch.Tensor | None = None  # this step's loss sum, left on the loss's device
        tokens = wait = 0.0
        self._pending: list[tuple[dict[str, Any], torch.Tensor, float, float]] = []
        self._every, self._synced_at = 1, self.step  # the first step syncs; then about every sync_every_s
        t_step, cpu_step = time.perf_counter(), time.process_time()
        preempted = False
        depth = cfg.prefetch_depth if self.source.prefetch else 0
        with Prefetcher(lambda p: (p, self.source.fetch(p)), stream, depth) as pf:
            for (pos, fetched), w in pf:
                batch = self.source.build(pos, fetched)
                loss = engine.train_step(batch.tensors)
                for h in self.hooks:
                    h.after_micro(self, pos, batch, loss)
                micro += 1
                loss_acc = loss.detach().float() if loss_acc is None else loss_acc + loss.detach().float()
                tokens += float(batch.tokens)
                wait += w
                if micro % cfg.grad_accum:
                    continue
                self.step += 1
                now, cpu_now = time.perf_counter(), time.process_time()
                rec = {"step": self.step, "lr": engine.lr(), "step_s": now - t_step, "cpu_s": cpu_now - cpu_step}
                for h in self.hooks:
                    rec.update(h.after_step(self, self.step) or {})
                assert loss_acc is not None
                self._pending.append((rec, loss_acc, tokens, wait))
                loss_acc, tokens, wait = None, 0.0, 0.0
                t_step, cpu_step = now, cpu_now
                save = bool(cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps)
                if save or self._log_step(self.step) or self.step - self._synced_at >= self._every:
                    preempted = self._sync()
                if preempted or save:
                    last_saved = self._save(self._state(pos, st, time.perf_counter() - t_start, self._tokens))
                if preempted:
                    break
        if self._pending:
            self._sync()
        if preempted:
            raise Preempted(last_saved, self.step)
        final = self._state(pos, st, time.perf_counter() - t_start, self._tokens)
        if last_saved is None or last_saved.name != f"step_{self.step:08d}":
            self._save(final)
        summary = _summary(self.name, self.history, self.step, final, self.world, self.run_dir, self.resumed_from)
        for h in self.hooks:
            h.on_end(self, summary)
        return summary

    def _log_step(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == 1 or step == self.cfg.max_steps

    def _sync(self) -> bool:
        """One all-reduce for every step since the last: the losses averaged over ranks, tokens,
        retrieval waits, whether any rank was asked to stop, and how many steps to the next sync.

        Steps until then keep their loss on its device (no host sync per step, which on a GPU would
        drain the launch queue every step) and their records pending. Rank 0 picks the interval from
        the step time so that the ranks meet about every `trainer.sync_every_s` seconds, bounding how
        late a preemption request is seen; every rank reads the same interval from the sum.
        """
        pending, self._pending = self._pending, []
        n = len(pending)
        dev = pending[0][1].device
        step_s = sum(r["step_s"] for r, *_ in pending) / n
        every = max(1, int(self.cfg.sync_every_s / max(step_s, 1e-9))) if self.rank == 0 else 0
        host = [x for _, _, t, w in pending for x in (t, w)] + [1.0 if self.stop_requested() else 0.0, every]
        # float32, as the losses are summed over ranks: tokens are exact to 2^24 per step
        losses = torch.stack([loss.float() for _, loss, _, _ in pending]).flatten()
        flat = torch.cat([losses, torch.tensor(host, dtype=torch.float32).to(dev)])
        dist.all_reduce(flat)
        vals = flat.tolist()
        sums, rest = vals[:n], vals[n:]
        for i, (rec, _, _, _) in enumerate(pending):
            tok, wt = rest[2 * i], rest[2 * i + 1]
            rec.update(loss=sums[i] / (self.cfg.grad_accum * self.world), tokens=tok,
                       tokens_per_s=tok / max(rec["step_s"], 1e-9), retrieval_wait_s=wt / self.world)
            rec = {k: rec[k] for k in RECORD_KEYS if k in rec} | {k: v for k, v in rec.items() if k not in RECORD_KEYS}
            self.history.append(rec)
            self._tokens += tok
            self._log(rec)
        self._every, self._synced_at = int(rest[-1]), self.step
        return rest[-2] > 0

    def _log(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        cfg = self.cfg
        if not self._log_step(step):
            return
        self.logger.log({f"train/{self.log_prefix}/{k}": v for k, v in rec.items() if k != "step" and v is not None}, step=step)
        if self.rank == 0:
            log.info(
                "[%s] step %d/%d loss %.4f lr %.2e %.0f tok/s retrieval wait %.1f ms%s",
                self.log_prefix, step, cfg.max_steps, rec["loss"], rec["lr"], rec["tokens_per_s"],
                1e3 * rec["retrieval_wait_s"], rec.get("note", ""),
            )  # fmt: skip


def finished_summary(
    run_dir: Path, variant: str, trainer: TrainerConfig, artifact: Path | None = None
) -> dict[str, Any] | None:
    """On resume, a variant whose export (`artifact`, default its generator's config.json) and summary
    already exist for max_steps needs nothing more."""
    import json

    if not trainer.resume:
        return None
    f = run_dir / f"train_{variant}.json"
    artifact = artifact or run_dir / "checkpoints" / variant / "config.json"
    if not f.is_file() or not artifact.is_file():
        return None
    try:
        summary = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return summary if summary.get("steps", 0) >= trainer.max_steps else None


def _resume_spec(spec: str, variant: str) -> str:
    """A resume path may name a checkpoint, a variant's checkpoint root, or a whole run directory."""
    if spec and spec != "auto" and (Path(spec) / "train_state" / variant).is_dir():
        return str(Path(spec) / "train_state" / variant)
    return spec


# The order of a step's record (hooks' fields follow). cpu_s is this rank's CPU time (all its threads,
# prefetch included): on a shared machine it shows the work a step costs where wall time also shows
# everyone else's.
RECORD_KEYS = ("step", "loss", "lr", "tokens", "tokens_per_s", "retrieval_wait_s", "step_s", "cpu_s")


def _check_index_version(saved: str | None, current: str | None, path: Path) -> None:
    if saved and current and saved != current:
        log.warning(
            "%s was trained against index version %s but the service now serves %s; retrieval from here on "
            "differs from the interrupted run's (start the service on that snapshot to reproduce it)",
            path, saved, current,
        )  # fmt: skip


def _summary(
    name: str,
    history: list[dict[str, Any]],
    step: int,
    st: dict[str, Any],
    world: int,
    run_dir: Path,
    resumed_from: Path | None,
) -> dict[str, Any]:
    n = max(1, len(history) // 10)
    waits = [h.get("retrieval_wait_s", 0.0) for h in history]
    return {
        "variant": name,
        "steps": step,
        "epochs": st["epoch"] + (1 if st["index"] else 0),
        "elapsed_s": st["elapsed_s"],
        "world_size": world,
        "tokens": st["tokens"],
        "retrieval_wait_s_per_step": float(np.mean(waits)) if waits else 0.0,
        "first_loss": float(np.mean([h["loss"] for h in history[:n]])) if history else float("nan"),
        "last_loss": float(np.mean([h["loss"] for h in history[-n:]])) if history else float("nan"),
        "index_version": st.get("index_version"),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "history": history,
        "checkpoint": str(run_dir / "checkpoints" / name),
    }

