"""ragdist-train: start (or attach to) the retrieval service, fine-tune every variant, evaluate.

    ragdist-train                                   # spawns trainer.nproc ranks with torchrun
    ragdist-train retrieval.top_k=5 trainer.zero_stage=3 index.num_shards=4
    deepspeed --num_gpus 2 --no_local_rank -m ragdist.recipes.finetune ...   # under a launcher
    torchrun --nproc_per_node 2 -m ragdist.recipes.finetune ...

Without a launcher this process is the driver: it prepares data, index and service, spawns the
ranks, and evaluates when they finish. Under a launcher, rank 0 does the driver's work and every
rank trains.
"""

from __future__ import annotations

import json
import os
import subprocess
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
    cfg.index.snapshot = str(snapshot)
    if any(v != "closed_book" for v in cfg.trainer.variants):
        start_service(str(snapshot), as_object(cfg.retrieval))
        cfg.retrieval.address = os.environ["RAY_ADDRESS"]
    return embedder


def train_all(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every rank: train each variant in turn. Assumes the process group is up."""
    import torch

    from ragdist.embed import build_embedder
    from ragdist.retrieval.client import RetrievalClient
    from ragdist.train.loop import train_variant
    from ragdist.train.model import load_tokenizer
    from ragdist.utils.logger import RunLogger

    rank = rdist.rank()
    torch.set_num_threads(max(1, cfg.trainer.omp_threads))
    tokenizer = load_tokenizer(as_object(cfg.model))
    train, _ = load_qa_splits(cfg)
    retrieve = None
    if any(v != "closed_book" for v in cfg.trainer.variants):
        emb_cfg = as_object(cfg.embedder)
        emb_cfg.progress = False
        client = RetrievalClient(as_object(cfg.retrieval), embedder=build_embedder(emb_cfg))
        retrieve = client.retrieve
    logger = RunLogger(as_object(cfg.logger), cfg.run_dir, enabled=rank == 0, config=None)
    out = []
    for variant in cfg.trainer.variants:
        if variant not in ("rag", "closed_book"):
            raise RagdistError(f"trainer.variants: unknown variant {variant!r} (rag | closed_book)")
        out.append(
            train_variant(
                variant,
                train,
                trainer=as_object(cfg.trainer),
                model_cfg=as_object(cfg.model),
                tokenizer=tokenizer,
                top_k=cfg.retrieval.top_k if variant == "rag" else 0,
                retrieve=retrieve,
                run_dir=cfg.run_dir,
                logger=logger,
            )
        )
    logger.finish()
    return out


def spawn_ranks(cfg: DictConfig) -> None:
    """Run trainer.nproc ranks of `train_worker` with torchrun on this node, on loopback."""
    run_dir = Path(cfg.run_dir)
    cfg_path = run_dir / "resolved.yaml"
    dump_config(cfg, cfg_path)
    port = cfg.trainer.master_port or rdist.free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(cfg.trainer.nproc),
        "--nnodes", "1",
        "--master_addr", "127.0.0.1",
        "--master_port", str(port),
        "-m", "ragdist.recipes.train_worker", str(cfg_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.trainer.omp_threads), PYTHONUNBUFFERED="1")
    log.info("train: %d ranks (%s, ZeRO-%d)", cfg.trainer.nproc, cfg.trainer.engine, cfg.trainer.zero_stage)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RagdistError(f"training ranks failed (exit status {rc}); see the log above")


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
    rdist.from_slurm_env()
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if not rdist.launched_by_launcher():
        setup_logging()
        embedder = prepare(cfg)
        try:
            spawn_ranks(cfg)
            return evaluate_and_report(cfg, embedder)
        finally:
            stop_owned_service(cfg)
    # Under a launcher: rank 0 prepares and shares the prepared config; all ranks train.
    import torch.distributed as dist

    rank, _ = rdist.init_process_group()
    setup_logging(rank)
    shared: list[Any] = [None]
    embedder = None
    if rank == 0:
        try:
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
        train_all(cfg)
        report = evaluate_and_report(cfg, embedder) if rank == 0 else None
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
    for i, a in enumerate(list(sys.argv)):
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
