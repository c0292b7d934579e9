"""Preemption through the real CLI: SIGTERM to ragdist-train → ranks checkpoint → exit 75 → resume.

The resume runs the same rank function the driver launches (`recipes.training.rank_entry`, through
the same elastic launch) with trainer.resume=auto, so the test stops where training ends instead of
paying for evaluation again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ragdist.distributed import launch_local
from ragdist.recipes.training import rank_entry
from ragdist.train import checkpoint as ckpt
from ragdist.train.preempt import REQUEUE_EXIT_CODE
from tests.conftest import ROOT


def _steps_logged(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"train/rag/loss"' in line)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes(ray_cluster, tiny_index, tmp_path):
    from ragdist.retrieval.client import RetrievalConfig, stop_service

    run_dir = tmp_path / "run"
    service = "preempt-test"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")  # CPU ranks
    args = [
        str(Path(sys.executable).parent / "ragdist-train"),
        "+experiment=tiny",
        f"index.root={tiny_index}",
        f"retrieval.service_name={service}",
        "retrieval.detached=true",  # the resumed ranks below query the same service
        "trainer.variants=[rag]",
        "trainer.max_steps=2000",
        "trainer.log_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while _steps_logged(run_dir / "metrics.jsonl") < 3:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "driver.log").read_text()
    try:
        assert rc == REQUEUE_EXIT_CODE, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        found = ckpt.find_checkpoint("auto", run_dir / "train_state" / "rag")
        assert found is not None, out[-3000:]
        state = ckpt.read_state(found)
        assert 3 <= state["step"] < 2000 and len(state["history"]) == state["step"]
        assert state["index_version"] == Path(OmegaConf.load(run_dir / "resolved.yaml").index.snapshot).name
        assert len(list((found / "rng").iterdir())) == 2
        assert not (run_dir / "checkpoints" / "rag").exists()  # nothing exported from a preempted run

        # requeued: the same ranks with trainer.resume=auto finish from the checkpoint
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "resolved.yaml"))
        cfg["trainer"]["resume"] = "auto"
        cfg["trainer"]["max_steps"] = state["step"] + 3
        rc = launch_local(rank_entry, 2, args=(cfg,), env=env)
        assert rc == 0
        summary = json.loads((run_dir / "train_rag.json").read_text())
        assert summary["resumed_from"] == str(found) and summary["steps"] == state["step"] + 3
        assert summary["history"][: state["step"]] == state["history"]
        assert (run_dir / "checkpoints" / "rag" / "config.json").is_file()
    finally:
        stop_service(RetrievalConfig(service_name=service, address=ray_cluster))
