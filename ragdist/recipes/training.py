"""The training half of the recipes: prepare once, then every rank runs `train_ranks(cfg)`.

However the ranks come up — ragdist's own local launch (`launch_training`, PyTorch's elastic agent),
`torchrun`, `deepspeed`, `srun` or Ray Train — each enters `train_ranks` with the same prepared config
(data paths, index snapshot and service address filled in by `prepare`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ragdist import distributed as rdist
from ragdist.config import as_object, typed_config
from ragdist.errors import RagdistError
from ragdist.index.snapshot import read_manifest
from ragdist.recipes.common import (
    build_or_reuse_index,
    check_embedder_matches,
    dump_config,
    load_qa_splits,
    log,
    resolve_data_paths,
    setup_logging,
    tokenizer_data,
)

VARIANTS = ("rag", "closed_book", "retriever")  # retriever: the supervised stage alone (joint.supervised)


def prepare(cfg: DictConfig) -> Any:
    """Data, index snapshot and a running service, filled into `cfg`; returns the query embedder."""
    from ragdist.embed import build_embedder
    from ragdist.retrieval.client import start_service
    from ragdist.retrieval.select import resolve_mode
    from ragdist.train.model import load_tokenizer

    for variant in cfg.trainer.variants:
        if variant not in VARIANTS:
            raise RagdistError(f"trainer.variants: unknown variant {variant!r} (rag | closed_book | retriever)")
    if "retriever" in cfg.trainer.variants or cfg.joint.supervised.steps:
        from ragdist.joint.config import check_supervised_config

        check_supervised_config(as_object(cfg.joint))
        if cfg.joint.supervised.steps < 1:
            raise RagdistError("trainer.variants=[retriever] trains the retriever alone: set joint.supervised.steps "
                               "(or joint=dpr)")
    rc = cfg.retrieval
    if any(v != "closed_book" for v in cfg.trainer.variants) and (rc.address or os.environ.get("RAY_ADDRESS")):
        from ragdist.retrieval.cluster import init_ray

        # An unreachable cluster fails here, naming its address, before anything expensive starts.
        init_ray(rc.address or None, num_cpus=rc.ray_num_cpus, namespace=rc.namespace,
                 connect_timeout_s=rc.connect_timeout_s)  # fmt: skip
    resolve_data_paths(cfg)
    # Fail on bad QA files or a missing model before anything expensive starts.
    train, _ = load_qa_splits(cfg)
    load_tokenizer(as_object(cfg.model), tokenizer_data(cfg))  # a BPE is trained (and cached) here, once
    embedder = build_embedder(as_object(cfg.embedder))
    snapshot = build_or_reuse_index(cfg, embedder)
    check_embedder_matches(read_manifest(snapshot), embedder)
    cfg.index.snapshot = str(Path(snapshot).resolve())
    if any(v != "closed_book" for v in cfg.trainer.variants):
        start_service(cfg.index.snapshot, as_object(cfg.retrieval))
        cfg.retrieval.address = os.environ["RAY_ADDRESS"]
        # mode=auto: measured once here, so every rank (and the resolved.yaml) gets the same choice.
        resolve_mode(cfg.retrieval, embedder, train, out=Path(cfg.run_dir) / "retrieval_mode.json")
    return embedder


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


def train_ranks(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every rank: train each variant in turn. The process group is up and `cfg` is prepared.

    Raises `Preempted` after a preemption signal, once the running variant has checkpointed.
    """
    import torch

    from ragdist.embed import build_embedder
    from ragdist.joint.supervised import TrainedRetrieval, supervised_result, train_supervised
    from ragdist.joint.train import train_joint
    from ragdist.retrieval.client import RetrievalClient
    from ragdist.train.examples import PassageStore
    from ragdist.train.loop import train_variant
    from ragdist.train.model import load_tokenizer
    from ragdist.train.preempt import Preempted, PreemptionHandler
    from ragdist.utils.logger import RunLogger

    rank = rdist.rank()
    torch.set_num_threads(max(1, cfg.trainer.omp_threads))
    tokenizer = load_tokenizer(as_object(cfg.model), tokenizer_data(cfg))
    train, evals = load_qa_splits(cfg)
    trainer = as_object(cfg.trainer)
    joint = as_object(cfg.joint)
    client = store = None
    # The supervised retriever stage: alone (variant `retriever`) or before the rag variant's generator.
    supervised = "retriever" in cfg.trainer.variants or ("rag" in cfg.trainer.variants and joint.supervised.steps > 0)
    sup_done = False
    # The reader's pretext stage runs before `rag` (after a supervised retriever stage, reading what
    # that retriever finds), and `rag` then starts from its weights.
    pretext = "rag" in cfg.trainer.variants and trainer.pretext.steps > 0
    mix = "rag" in cfg.trainer.variants and joint.loss == "none" and trainer.pretext.mix > 0
    if ("rag" in cfg.trainer.variants and joint.loss == "none") or pretext:
        if not supervised:  # after a supervised stage the generator reads the trained retriever instead
            emb_cfg = as_object(cfg.embedder)
            emb_cfg.progress = False
            client = RetrievalClient(as_object(cfg.retrieval), embedder=build_embedder(emb_cfg))
        fmt = trainer.examples
        if pretext or mix or fmt.inject_gold_p > 0 or (fmt.distractor_p > 0 and fmt.distractor_source == "random"):
            store = PassageStore.from_snapshot(cfg.index.snapshot)
    logger = RunLogger(as_object(cfg.logger), cfg.run_dir, enabled=rank == 0, config=None)
    if "rag" in cfg.trainer.variants or supervised:
        from ragdist.retrieval.cluster import init_ray

        # Before the preemption handler: attaching to Ray installs Ray's own SIGTERM handler, which
        # would otherwise replace ours and abort the rank instead of checkpointing it.
        rc = cfg.retrieval
        init_ray(rc.address or None, num_cpus=rc.ray_num_cpus, namespace=rc.namespace,
                 connect_timeout_s=rc.connect_timeout_s)  # fmt: skip
    out = []
    with PreemptionHandler() as preempt:
        for variant in cfg.trainer.variants:
            if preempt.requested:  # between variants: the finished ones are saved, nothing else to keep
                raise Preempted(None, 0)
            rag = variant == "rag"
            snapshot = str(cfg.index.snapshot)
            if (rag or variant == "retriever") and supervised and not sup_done:
                # the retriever on gold ids first: a source and hook of the same loop
                out.append(train_supervised(
                    train, evals, joint=joint, trainer=trainer, retrieval=as_object(cfg.retrieval),
                    embedder_cfg=as_object(cfg.embedder), snapshot=snapshot, run_dir=cfg.run_dir, logger=logger,
                    stop_requested=lambda: preempt.requested,
                ))  # fmt: skip
                sup_done = True
            if variant == "retriever":
                continue
            if rag and supervised:
                snapshot = supervised_result(cfg.run_dir)["snapshot"]
            model_cfg = as_object(cfg.model)
            if rag and pretext:
                assert store is not None
                done = _pretext_stage(cfg, store, tokenizer, logger, rank, supervised, client, preempt)
                out.append(done)
                model_cfg = dataclasses.replace(model_cfg, name_or_path=done["checkpoint"])
            if rag and joint.loss != "none":  # the retriever trains too: a source and hook of the same loop
                out.append(train_joint(
                    "rag", train, evals, joint=joint, trainer=trainer, model_cfg=model_cfg,
                    retrieval=as_object(cfg.retrieval), embedder_cfg=as_object(cfg.embedder),
                    snapshot=snapshot, tokenizer=tokenizer, run_dir=cfg.run_dir, logger=logger,
                    peft_cfg=as_object(cfg.peft), stop_requested=lambda: preempt.requested,
                    init_dir=cfg.run_dir if supervised else None,
                ))  # fmt: skip
                continue
            trained = TrainedRetrieval(cfg.run_dir, joint, as_object(cfg.retrieval), rank) if rag and supervised else None
            source = trained or client
            try:
                out.append(train_variant(
                    variant, train, trainer=trainer, model_cfg=model_cfg, tokenizer=tokenizer,
                    top_k=cfg.retrieval.top_k if rag else 0, retrieve=source.retrieve if (rag and source) else None,
                    run_dir=cfg.run_dir, logger=logger, peft_cfg=as_object(cfg.peft), store=store if rag else None,
                    index_version=(trained.version if trained else (lambda: client.version)) if (rag and source) else None,
                    stop_requested=lambda: preempt.requested,
                    source_factory=_mixed_source(train, store, trainer) if (rag and mix) else None,
                ))  # fmt: skip
            finally:
                if trained is not None:
                    trained.close()
    logger.finish()
    return out


def _pretext_stage(cfg: DictConfig, store: Any, tokenizer: Any, logger: Any, rank: int, supervised: bool,
                   client: Any, preempt: Any) -> dict[str, Any]:  # fmt: skip
    """`trainer.pretext`: reading tasks from the corpus, with passages from the retriever `rag` will use."""
    from ragdist.joint.supervised import TrainedRetrieval
    from ragdist.train.loop import train_pretext

    trained = TrainedRetrieval(cfg.run_dir, as_object(cfg.joint), as_object(cfg.retrieval), rank) if supervised else None
    source = trained or client
    try:
        return train_pretext(
            store, trainer=as_object(cfg.trainer), model_cfg=as_object(cfg.model), tokenizer=tokenizer,
            top_k=cfg.retrieval.top_k, retrieve=source.retrieve, run_dir=cfg.run_dir, logger=logger,
            peft_cfg=as_object(cfg.peft), index_version=trained.version if trained else (lambda: client.version),
            stop_requested=lambda: preempt.requested,
        )  # fmt: skip
    finally:
        if trained is not None:
            trained.close()


def _mixed_source(train: list[Any], store: Any, trainer: Any) -> Any:
    """`rag`'s batch source when `trainer.pretext.mix` > 0: its questions with a share of reading tasks."""
    from ragdist.train.pretext import MixedSource, ReadingTasks

    tasks = ReadingTasks(store, trainer.pretext, seed=trainer.seed)
    return lambda builder: MixedSource(train, builder, tasks, trainer.pretext.mix, seed=trainer.seed,
                                       lookahead=trainer.retrieval_lookahead)  # fmt: skip


def rank_entry(plain: dict[str, Any]) -> int:
    """One rank of `launch_training` (PyTorch's elastic agent calls it in a fresh process).

    Returns 0 when done and 75 (REQUEUE_EXIT_CODE) when preempted after a checkpoint; exits with
    status 2 on bad input.
    """
    from ragdist.train.preempt import REQUEUE_EXIT_CODE, Preempted

    cfg = typed_config(plain)
    rank, _ = rdist.init_process_group()
    setup_logging(rank)
    code = 0
    try:
        train_ranks(cfg)
    except Preempted as e:
        print(f"ragdist: rank {rank}: {e}", file=sys.stderr, flush=True)
        code = REQUEUE_EXIT_CODE
    except RagdistError as e:
        print(f"ragdist: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        rdist.shutdown()
    if code == 2:
        sys.exit(code)
    return code


def launch_training(cfg: DictConfig) -> None:
    """Run `trainer.nproc` ranks of `train_ranks` on this node (PyTorch's elastic agent, loopback).

    A preemption signal reaching this process goes to the ranks; after they checkpoint it exits
    with REQUEUE_EXIT_CODE too. The prepared config is written to <run_dir>/resolved.yaml as the
    run's record (`ragdist-eval eval.run_dir=` reads it).
    """
    from ragdist.train.preempt import REQUEUE_EXIT_CODE

    run_dir = Path(cfg.run_dir)
    dump_config(cfg, run_dir / "resolved.yaml")
    env = {"OMP_NUM_THREADS": str(cfg.trainer.omp_threads), "PYTHONUNBUFFERED": "1"}
    engine = cfg.trainer.engine + (f", ZeRO-{cfg.trainer.zero_stage}" if cfg.trainer.engine == "deepspeed" else "")
    log.info("train: %d ranks (%s)", cfg.trainer.nproc, engine)
    plain = OmegaConf.to_container(cfg, resolve=True)
    rc = rdist.launch_local(rank_entry, cfg.trainer.nproc, args=(plain,), env=env, master_port=cfg.trainer.master_port)
    if rc == REQUEUE_EXIT_CODE:
        log.warning("train: preempted; the ranks checkpointed under %s/train_state — rerun with "
                    "trainer.resume=auto to continue", run_dir)  # fmt: skip
        sys.exit(REQUEUE_EXIT_CODE)
    if rc != 0:
        raise RagdistError(f"training ranks failed (exit status {rc}); see the log above")


def stop_owned_service(cfg: DictConfig) -> None:
    import ray

    from ragdist.retrieval.client import stop_service

    if ray.is_initialized() and not cfg.retrieval.detached:
        stop_service(as_object(cfg.retrieval))
