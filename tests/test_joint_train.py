"""ragdist-train with joint training and side=both on the tiny sample, 2 ranks: refreshed index versions
are swapped in while training runs, every example records its version (the same on both ranks at each
step), staleness is logged, and the run leaves a generator, a query encoder, a final index and a report."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.slow
def test_joint_side_both_refreshes_without_stopping(ray_cluster, tiny_index, tmp_path):
    run = tmp_path / "run"
    p = run_cli([
        "ragdist-train", "+experiment=tiny", "joint=lsr", "joint.side=both", "joint.refresh_every=3",
        "joint.refresh_wait_staleness=5", "joint.refresh_nice=0", "joint.refresh_timeout_s=300", "trainer.max_steps=9", "trainer.log_every=3",
        "trainer.variants=[rag]", "eval.strategies=[rag]", "eval.max_questions=4", "eval.latency_samples=1",
        "eval.latency_warmup=0", "eval.topk_sweep=[]", "eval.distractors=[]", "eval.order_checks=false",
        "eval.plots=false", f"index.root={tiny_index}", "retrieval.service_name=test-joint-train",
        f"hydra.run.dir={run}",
    ], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    summary = json.loads((run / "train_rag.json").read_text())
    j = summary["joint"]
    assert summary["steps"] == 9 and j["loss"] == "lsr" and j["side"] == "both"
    assert j["refresh"]["served"] >= 2 and j["refresh"]["failed"] == 0
    assert j["final_index"]["encoder_step"] == 9  # the last refresh saw the final passage encoder
    stale = [h["staleness"] for h in summary["history"]]
    # Refreshes ran while training stepped (staleness grew), and bounded staleness capped it.
    assert max(stale) >= 1 and max(stale) <= 5

    # Each example names the version it was built from; both ranks switch at the same step.
    by_step: dict[int, set[str]] = defaultdict(set)
    versions = set()
    for rank in (0, 1):
        for line in (run / "joint" / f"examples.rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_step[row["step"]].add(row["index_version"])
            versions.add(row["index_version"])
            assert len(row["passages"]) == 4
    assert len(versions) >= 2 and all(len(v) == 1 for v in by_step.values())

    final = json.loads((run / "joint" / "final.json").read_text())
    manifest = json.loads((ROOT / final["snapshot"] / "manifest.json").read_text())
    assert manifest["joint"]["encoder_step"] == 9 and manifest["num_chunks"] == 40
    for d in ("checkpoints/rag", "retriever", "passage_encoder"):
        assert (run / d / "config.json").is_file(), d
    # the generator read one retrieved passage per row: its checkpoint says so for ragdist-eval
    assert json.loads((run / "checkpoints" / "rag" / "ragdist_reader.json").read_text())["aggregation"] == "sequential"
    assert (run / "joint" / "encoder_snapshots").is_dir()
    assert not list((run / "joint" / "encoder_snapshots").glob("*.pkl"))
    report = json.loads((run / "joint_report.json").read_text())
    assert {"recall@1", "recall@3", "recall@5"} <= set(report["recall_before"]) and report["recall_after"]["questions"] == 40
    assert (run / "report.json").is_file()  # the evaluation ran after joint training
    # ... and its report carries the retriever's recall before → after
    assert json.loads((run / "report.json").read_text())["joint_retriever"]["this run"]["loss"] == report["loss"]
    assert "## Joint retriever training" in (run / "report.md").read_text()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/joint/staleness" in m for m in metrics)
