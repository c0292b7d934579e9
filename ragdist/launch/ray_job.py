"""The entry point of `ray job submit`: retrieval service, training ranks and evaluation on a Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m ragdist.launch.ray_job --workers 4 --gpus-per-worker 1 \\
        hydra.run.dir=/shared/runs/exp1 index.root=/shared/indexes retrieval.top_k=5
    ray job status --address http://HEAD:8265 <submission id>
    ray job logs --address http://HEAD:8265 <submission id> --follow

This process is the job's driver. It prepares data and the index snapshot, starts the shard actors
on the cluster, trains every trainer.variant on Ray Train workers (a TorchTrainer, one worker per
rank: gloo on CPU, NCCL with --gpus-per-worker), evaluates, writes the report and stops the service.
The flags before the Hydra overrides size the workers; everything else is ragdist-train's config.
hydra.run.dir and index.root must be on storage every node sees: rank 0 writes the checkpoints the
driver evaluates, and the shard actors load the snapshot the driver built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ragdist.config import conf_dir, register_configs, typed_config
from ragdist.errors import RagdistError
from ragdist.recipes.common import cli, setup_logging

log = logging.getLogger("ragdist")


@dataclass
class WorkerSpec:
    workers: int = 0  # 0 = trainer.nproc
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


_SPEC = WorkerSpec()


def parse_worker_args(argv: list[str]) -> tuple[WorkerSpec, list[str]]:
    """Split this entry point's own flags from the Hydra overrides that follow them."""
    ap = argparse.ArgumentParser(prog="python -m ragdist.launch.ray_job", add_help=False)
    ap.add_argument("--workers", type=int, default=0, help="training ranks (default: trainer.nproc)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("-h", "--help", action="store_true")
    ns, rest = ap.parse_known_args(argv)
    if ns.help:
        print(__doc__)
        ap.print_help()
        sys.exit(0)
    if ns.workers < 0 or ns.cpus_per_worker < 0 or ns.gpus_per_worker < 0:
        ap.error("--workers, --cpus-per-worker and --gpus-per-worker cannot be negative")
    return WorkerSpec(ns.workers, ns.cpus_per_worker, ns.gpus_per_worker), rest


def rank_main(config: dict[str, Any]) -> None:
    """One Ray Train worker = one rank; Ray Train has set up the process group and RANK/WORLD_SIZE."""
    from ragdist.launch.rank import console_to_rank0
    from ragdist.recipes.training import train_ranks

    cfg = typed_config(config["cfg"])
    rank = int(os.environ.get("RANK", "0"))
    console_to_rank0(cfg.run_dir, rank)
    setup_logging(rank)
    train_ranks(cfg)


def train_on_ray(cfg: DictConfig, spec: WorkerSpec) -> None:
    """trainer.variants on Ray Train workers; raises RagdistError if any rank fails."""
    try:
        from ray.train import RunConfig as RayRunConfig
        from ray.train import ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as e:
        raise RagdistError(
            f"the Ray job trains its ranks with Ray Train, which is not installed ({e}): "
            "pip install 'ray[default,train]'"
        ) from None

    n = spec.workers or cfg.trainer.nproc
    gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker}
    if gpu:
        resources["GPU"] = spec.gpus_per_worker
    run_dir = Path(cfg.run_dir).resolve()
    # Ray Train moves each worker into its own trial directory; ragdist's relative paths (data files
    # in the uploaded working dir) are meant from the working dir, where Ray starts every worker.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    trainer = TorchTrainer(
        rank_main,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True)},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RayRunConfig(name=f"ragdist-{run_dir.name}", storage_path=str(run_dir / "ray_train")),
    )
    log.info("train: %d Ray Train workers (%s each, %s)", n, resources, cfg.trainer.engine)
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps the rank's exception; its last line names the cause
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise RagdistError(
            f"training on Ray workers failed: {lines[-1] if lines else type(e).__name__}"
        ) from None


def attach(cfg: DictConfig) -> str:
    """Join the job's cluster with worker output forwarded to the driver, so `ray job logs` shows it."""
    import ray

    address = cfg.retrieval.address or os.environ.get("RAY_ADDRESS") or "auto"
    if not ray.is_initialized():
        ray.init(address=address, namespace=cfg.retrieval.namespace, log_to_driver=True)
    gcs = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = gcs
    cfg.retrieval.address = gcs
    return gcs


@cli
def run(cfg: DictConfig) -> dict[str, Any]:
    from ragdist.recipes.evaluate import evaluate_checkpoints
    from ragdist.recipes.training import pin_resumed_index, prepare, stop_owned_service

    setup_logging()
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    for key in ("run_dir", "index.root"):
        value = str(OmegaConf.select(cfg, key))
        if not Path(value).is_absolute():
            log.warning(
                "%s=%s is relative to the job's working-dir copy (%s): other nodes will not see it, "
                "and it goes when the cluster does; give an absolute path on shared storage",
                key, value, os.getcwd(),
            )  # fmt: skip
    log.info("ray job: cluster %s, run dir %s", attach(cfg), Path(cfg.run_dir).resolve())
    pin_resumed_index(cfg)
    embedder = prepare(cfg)
    try:
        train_on_ray(cfg, _SPEC)
        ckpts = {v: str(Path(cfg.run_dir) / "checkpoints" / v) for v in cfg.trainer.variants}
        return evaluate_checkpoints(cfg, ckpts, embedder)
    finally:
        stop_owned_service(cfg)


register_configs()
_hydra_main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run)


def main() -> None:
    global _SPEC
    _SPEC, rest = parse_worker_args(sys.argv[1:])
    sys.argv = [sys.argv[0], *rest]
    _hydra_main()


if __name__ == "__main__":
    main()
