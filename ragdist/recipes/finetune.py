"""ragdist-train: start (or attach to) the retrieval service, fine-tune every variant, evaluate.

    ragdist-train                                   # spawns trainer.nproc ranks on this node
    ragdist-train retrieval.top_k=5 trainer.zero_stage=3 index.num_shards=4
    ragdist-train trainer=fsdp peft=lora trainer.save_every=100 trainer.resume=auto hydra.run.dir=runs/x
    deepspeed --num_gpus 2 --no_local_rank -m ragdist.recipes.finetune ...   # under a launcher
    torchrun --nproc_per_node 2 -m ragdist.recipes.finetune ...

Without a launcher this process is the driver: it prepares data, index and service, spawns the
ranks, and evaluates when they finish (on eval.nproc ranks). Under a launcher, rank 0 does the
driver's work, every rank trains and generates its share of the evaluation. On SIGTERM / SIGUSR1 the ranks checkpoint at the next step boundary and everything
exits with status 75 (REQUEUE_EXIT_CODE); `trainer.resume=auto` with the same run dir continues.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ragdist.config import as_object, conf_dir, load_resolved, register_configs
from ragdist.errors import RagdistError
from ragdist.index.snapshot import read_manifest
from ragdist.recipes.common import (
    build_or_reuse_index,
    check_embedder_matches,
    cli,
    dump_config,
    load_qa_splits,
    log,
    resolve_data_paths,
    setup_logging,
)
from ragdist.utils import dist as rdist


def prepare(cfg: DictConfig) -> Any:
    """Data, index snapshot and a running service; returns the query embedder."""
    from ragdist.embed import build_embedder
    from ragdist.retrieval.client import start_service
    from ragdist.train.model import load_tokenizer

    resolve_data_paths(cfg)
    # Fail on bad QA files or a missing model before anything expensive starts.
    load_qa_splits(cfg)
    load_tokenizer(as_object(cfg.model))
    embedder = build_embedder(as_object(cfg.embedder))
    snapshot = build_or_reuse_index(cfg, embedder)
    check_embedder_matches(read_manifest(snapshot), embedder)
    cfg.index.snapshot = str(Path(snapshot).resolve())
    if any(v != "closed_book" for v in cfg.trainer.variants):
        start_service(cfg.index.snapshot, as_object(cfg.retrieval))
        cfg.retrieval.address = os.environ["RAY_ADDRESS"]
    return embedder


def train_all(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every rank: train each variant in turn. Assumes the process group is up.

    Raises `Preempted` after a preemption signal, once the running variant has checkpointed.
    """
    import torch

    from ragdist.embed import build_embedder
    from ragdist.retrieval.client import RetrievalClient
    from ragdist.train.examples import PassageStore
    from ragdist.train.loop import train_variant
    from ragdist.train.model import load_tokenizer
    from ragdist.train.preempt import Preempted, PreemptionHandler
    from ragdist.utils.logger import RunLogger

    rank = rdist.rank()
    torch.set_num_threads(max(1, cfg.trainer.omp_threads))
    for variant in cfg.trainer.variants:
        if variant not in ("rag", "closed_book"):
            raise RagdistError(f"trainer.variants: unknown variant {variant!r} (rag | closed_book)")
    tokenizer = load_tokenizer(as_object(cfg.model))
    train, _ = load_qa_splits(cfg)
    trainer = as_object(cfg.trainer)
    client = store = None
    if any(v != "closed_book" for v in cfg.trainer.variants):
        emb_cfg = as_object(cfg.embedder)
        emb_cfg.progress = False
        client = RetrievalClient(as_object(cfg.retrieval), embedder=build_embedder(emb_cfg))
        fmt = trainer.examples
        if fmt.inject_gold_p > 0 or (fmt.distractor_p > 0 and fmt.distractor_source == "random"):
            store = PassageStore.from_snapshot(cfg.index.snapshot)
    logger = RunLogger(as_object(cfg.logger), cfg.run_dir, enabled=rank == 0, config=None)
    out = []
    with PreemptionHandler() as preempt:
        for variant in cfg.trainer.variants:
            if preempt.requested:  # between variants: the finished ones are saved, nothing else to keep
                raise Preempted(None, 0)
            rag = variant == "rag"
            if rag and cfg.joint.loss != "none":  # the retriever trains too: ragdist/joint/loop.py
                from ragdist.joint.loop import train_joint_from_config

                out.append(train_joint_from_config(cfg, train, tokenizer, logger))
                continue
            out.append(
                train_variant(
                    variant,
                    train,
                    trainer=trainer,
                    model_cfg=as_object(cfg.model),
                    tokenizer=tokenizer,
                    top_k=cfg.retrieval.top_k if rag else 0,
                    retrieve=client.retrieve if (rag and client) else None,
                    run_dir=cfg.run_dir,
                    logger=logger,
                    peft_cfg=as_object(cfg.peft),
                    store=store if rag else None,
                    index_version=(lambda: client.version) if (rag and client) else None,
                    stop_requested=lambda: preempt.requested,
                )
            )
    logger.finish()
    return out


def spawn_ranks(cfg: DictConfig) -> None:
    """Run trainer.nproc ranks of `train_worker` on this node, on loopback.

    The ranks are this process's children (not torchrun's), so a preemption signal reaching this
    driver goes straight to them; after they checkpoint it exits with REQUEUE_EXIT_CODE too.
    """
    from ragdist.train.preempt import REQUEUE_EXIT_CODE

    run_dir = Path(cfg.run_dir)
    cfg_path = run_dir / "resolved.yaml"
    dump_config(cfg, cfg_path)
    cmd = [sys.executable, "-m", "ragdist.recipes.train_worker", str(cfg_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.trainer.omp_threads), PYTHONUNBUFFERED="1")
    engine = cfg.trainer.engine + (f", ZeRO-{cfg.trainer.zero_stage}" if cfg.trainer.engine == "deepspeed" else "")
    log.info("train: %d ranks (%s)", cfg.trainer.nproc, engine)
    rc = rdist.launch_local(cmd, cfg.trainer.nproc, env=env, master_port=cfg.trainer.master_port)
    if rc == REQUEUE_EXIT_CODE:
        log.warning("train: preempted; the ranks checkpointed under %s/train_state — rerun with "
                    "trainer.resume=auto to continue", run_dir)
        sys.exit(REQUEUE_EXIT_CODE)
    if rc != 0:
        raise RagdistError(f"training ranks failed (exit status {rc}); see the log above")


def pin_resumed_index(cfg: DictConfig) -> None:
    """Resuming: serve the index snapshot the checkpoint was trained against, if it still exists."""
    from ragdist.train import checkpoint as ckpt

    if not cfg.trainer.resume or cfg.index.snapshot or "rag" not in cfg.trainer.variants:
        return
    found = ckpt.find_checkpoint(cfg.trainer.resume, Path(cfg.run_dir) / "train_state" / "rag")
    if found is None:
        return
    version = ckpt.read_state(found).get("index_version")
    if version and (Path(cfg.index.root) / version).is_dir():
        cfg.index.snapshot = str(Path(cfg.index.root) / version)
        log.info("resume: serving index version %s, as at %s", version, found)


def evaluate_and_report(cfg: DictConfig, embedder: Any) -> dict[str, Any]:
    from ragdist.recipes.evaluate import evaluate_checkpoints

    ckpts = {v: str(Path(cfg.run_dir) / "checkpoints" / v) for v in cfg.trainer.variants}
    return evaluate_checkpoints(cfg, ckpts, embedder)


def stop_owned_service(cfg: DictConfig) -> None:
    import ray

    from ragdist.retrieval.client import stop_service

    if ray.is_initialized() and not cfg.retrieval.detached:
        stop_service(as_object(cfg.retrieval))


@cli
def run(cfg: DictConfig) -> dict[str, Any] | None:
    # srun with several tasks: each task is a rank. A one-task step (a submitit sweep job) stays the driver.
    from ragdist.launch.slurm import adopt_slurm_ranks

    adopt_slurm_ranks()
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if not rdist.launched_by_launcher():
        setup_logging()
        pin_resumed_index(cfg)
        embedder = prepare(cfg)
        try:
            spawn_ranks(cfg)
            return evaluate_and_report(cfg, embedder)
        finally:
            stop_owned_service(cfg)
    # Under a launcher: rank 0 prepares and shares the prepared config; all ranks train.
    import torch.distributed as dist

    from ragdist.train.preempt import REQUEUE_EXIT_CODE, Preempted

    rank, _ = rdist.init_process_group()
    setup_logging(rank)
    shared: list[Any] = [None]
    embedder = None
    if rank == 0:
        try:
            pin_resumed_index(cfg)
            embedder = prepare(cfg)
            shared[0] = json.dumps({"ok": True, "cfg": _plain(cfg)})
        except RagdistError as e:
            shared[0] = json.dumps({"ok": False, "error": str(e)})
    dist.broadcast_object_list(shared, src=0)
    msg = json.loads(shared[0])
    if not msg["ok"]:
        raise RagdistError(msg["error"])
    cfg = _typed(msg["cfg"])
    try:
        try:
            train_all(cfg)
        except Preempted as e:
            log.warning("rank %d: %s; exiting with %d for a requeue", rank, e, REQUEUE_EXIT_CODE)
            preempted = True
        else:
            preempted = False
        if preempted:
            sys.exit(REQUEUE_EXIT_CODE)  # the finally below still tears down cleanly
        # every rank generates its share of the answers; rank 0 writes the report
        report = evaluate_and_report(cfg, embedder) or None
        dist.barrier()
        return report
    finally:
        if rank == 0:
            stop_owned_service(cfg)
        rdist.shutdown()


def _plain(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _typed(d: dict[str, Any]) -> DictConfig:
    import tempfile

    from omegaconf import OmegaConf

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(OmegaConf.to_yaml(OmegaConf.create(d)))
    try:
        return load_resolved(fh.name)
    finally:
        os.unlink(fh.name)


def _strip_launcher_args() -> None:
    # The deepspeed launcher appends --local_rank=N, which Hydra would reject as an override.
    for a in list(sys.argv):
        if a.startswith("--local_rank") or a.startswith("--local-rank"):
            value = a.split("=", 1)[1] if "=" in a else None
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)
            sys.argv.remove(a)
            break


register_configs()
_hydra_main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run)


def main() -> None:
    _strip_launcher_args()
    _hydra_main()


if __name__ == "__main__":
    main()
