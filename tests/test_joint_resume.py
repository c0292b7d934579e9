"""Joint training is the one training loop's: SIGTERM mid-run → both ranks checkpoint (generator, retriever,
its optimizer, the served index version) → exit 75 → `trainer.resume=auto` finishes the run with exactly
the losses of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragdist.train import checkpoint as ckpt
from ragdist.train.preempt import REQUEUE_EXIT_CODE
from tests.conftest import ROOT, run_cli
from tests.test_golden import CHEAP_EVAL


def _args(index, run):
    return ["+experiment=tiny", "joint=lsr", "trainer.variants=[rag]", "eval.strategies=[rag]", "trainer.max_steps=12",
            "trainer.log_every=1", f"index.root={index}", "retrieval.service_name=joint-resume",
            *CHEAP_EVAL, f"hydra.run.dir={run}"]  # fmt: skip


def _logged(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"train/joint/loss"' in line)


@pytest.mark.slow
def test_joint_preemption_and_resume_reproduce_the_losses(ray_cluster, tiny_index, tmp_path):
    env = {"RAY_ADDRESS": ray_cluster}
    full = tmp_path / "full"
    p = run_cli(["ragdist-train", *_args(tiny_index, full)], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    want = json.loads((full / "train_rag.json").read_text())

    run = tmp_path / "cut"
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ragdist-train"), *_args(tiny_index, run)], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **env), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while _logged(run / "metrics.jsonl") < 3:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "driver.log").read_text()
    assert rc == REQUEUE_EXIT_CODE, out[-3000:]
    found = ckpt.find_checkpoint("auto", run / "train_state" / "rag")
    assert found is not None and (found / "hooks" / "joint.pt").is_file(), out[-3000:]
    state = ckpt.read_state(found)
    assert 3 <= state["step"] < 12 and state["hooks"]["joint"]["served"]["seq"] == 0
    assert not (run / "checkpoints" / "rag").exists()  # nothing exported from a preempted run

    p = run_cli(["ragdist-train", *_args(tiny_index, run), "trainer.resume=auto"], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads((run / "train_rag.json").read_text())
    assert got["resumed_from"] == str(found) and got["steps"] == 12
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in want["history"]]
    assert [h["retriever_grad_norm"] for h in got["history"]] == [h["retriever_grad_norm"] for h in want["history"]]
    # the recall measured before training is the original run's, not re-measured at the resume
    assert got["joint"]["recall_before"] == want["joint"]["recall_before"]
    assert got["joint"]["recall_after"] == want["joint"]["recall_after"]
    assert (run / "retriever" / "config.json").is_file()
