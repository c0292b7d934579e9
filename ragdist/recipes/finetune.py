"""ragdist-train: start (or attach to) the retrieval service, fine-tune every variant, evaluate.

    ragdist-train                                   # launches trainer.nproc ranks on this node
    ragdist-train retrieval.top_k=5 trainer.zero_stage=3 index.num_shards=4
    ragdist-train trainer=fsdp peft=lora trainer.save_every=100 trainer.resume=auto hydra.run.dir=runs/x
    deepspeed --num_gpus 2 --no_local_rank -m ragdist.launch.rank hydra.run.dir=runs/x ...   # under a launcher
    torchrun --nproc_per_node 2 -m ragdist.launch.rank hydra.run.dir=runs/x ...

Without a launcher this process is the driver: it prepares data, index and service, launches the
ranks (PyTorch's elastic agent, on loopback), and evaluates when they finish (on eval.nproc ranks).
Under a launcher, rank 0 prepares, every rank receives the prepared config and generates its share of
the evaluation. Either way every rank runs `recipes.training.train_ranks`. On SIGTERM / SIGUSR1 the ranks checkpoint at the next step boundary
and everything exits with status 75 (REQUEUE_EXIT_CODE); `trainer.resume=auto` with the same run dir
continues.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ragdist import distributed as rdist
from ragdist.config import conf_dir, register_configs, typed_config
from ragdist.recipes.common import cli, log, setup_logging
from ragdist.recipes.evaluate import evaluate_checkpoints, run_checkpoints
from ragdist.recipes.training import (
    launch_training,
    pin_resumed_index,
    prepare,
    stop_owned_service,
    train_ranks,
)


class FinetuneRecipe:
    """setup → train → evaluate → cleanup, the same on a driver and under a launcher."""

    def __init__(self, cfg: DictConfig):
        from ragdist.launch.slurm import adopt_slurm_ranks

        # srun with several tasks: each task is a rank. A one-task step (a submitit sweep job) stays the driver.
        adopt_slurm_ranks()
        self.cfg = cfg
        self.embedder: Any = None
        self.launched = rdist.launched_by_launcher()
        self.rank = 0

    def setup(self) -> None:
        """The driver, or rank 0 under a launcher, prepares data, index and service; under a launcher
        every rank then takes rank 0's prepared config."""
        Path(self.cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if not self.launched:
            setup_logging()
            pin_resumed_index(self.cfg)
            self.embedder = prepare(self.cfg)
            return
        self.rank, _ = rdist.init_process_group()
        setup_logging(self.rank)

        def rank0() -> dict[str, Any]:
            pin_resumed_index(self.cfg)
            self.embedder = prepare(self.cfg)
            return OmegaConf.to_container(self.cfg, resolve=True)  # type: ignore[return-value]

        self.cfg = typed_config(rdist.on_rank0(rank0, what="prepare data, index and retrieval service"))

    def train(self) -> None:
        if not self.launched:
            launch_training(self.cfg)
            return
        from ragdist.train.preempt import REQUEUE_EXIT_CODE, Preempted

        try:
            train_ranks(self.cfg)
        except Preempted as e:
            log.warning("rank %d: %s; exiting with %d for a requeue", self.rank, e, REQUEUE_EXIT_CODE)
            sys.exit(REQUEUE_EXIT_CODE)  # cleanup() still tears down cleanly

    def evaluate(self) -> dict[str, Any] | None:
        """Under a launcher every rank generates its share of the answers and rank 0 writes the report;
        a driver evaluates on eval.nproc ranks of its own."""
        report = None
        ckpts = run_checkpoints(self.cfg, self.cfg.run_dir)
        if ckpts:
            report = evaluate_checkpoints(self.cfg, ckpts, self.embedder) or None
        elif self.rank == 0:  # the retriever alone: its recall before → after is in joint_report.md
            log.info("no generator trained: retrieval recall in %s", Path(self.cfg.run_dir) / "joint_report.md")
        if self.launched:
            import torch.distributed as dist

            dist.barrier()
        return report

    def cleanup(self) -> None:
        if self.rank == 0:
            stop_owned_service(self.cfg)
        if self.launched:
            rdist.shutdown()


@cli
def run(cfg: DictConfig) -> dict[str, Any] | None:
    recipe = FinetuneRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        return recipe.evaluate()
    finally:
        recipe.cleanup()


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
