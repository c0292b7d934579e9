"""End to end through the console scripts: real Ray, real FAISS, 2 DeepSpeed ranks over gloo."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, run_cli

TINY = [
    f"corpus.path={DATA / 'corpus.jsonl'}",
    f"data.train={DATA / 'train.jsonl'}",
    f"data.eval={DATA / 'eval.jsonl'}",
]


def snapshots_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir()] if root.exists() else []


@pytest.mark.slow
def test_train_end_to_end(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            "ragdist-train",
            "+experiment=tiny",
            f"index.root={tmp_path / 'idx'}",
            "retrieval.service_name=pipeline-test",
            "trainer.max_steps=40",
            f"hydra.run.dir={run_dir}",
        ],
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((run_dir / "report.json").read_text())
    rag, closed = report["results"]["rag"], report["results"]["closed_book"]
    for m in (rag, closed):
        assert {"em", "f1", "n", "generation_latency_s"} <= set(m) and m["n"] == 40
    assert rag["recall@3"] >= 0.9 and "recall@3" not in closed
    for variant in ("rag", "closed_book"):
        s = json.loads((run_dir / f"train_{variant}.json").read_text())
        assert s["world_size"] == 2 and s["steps"] == 40
        losses = [h["loss"] for h in s["history"]]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
        assert (run_dir / "checkpoints" / variant / "config.json").is_file()
    assert "| RAG fine-tuned" in (run_dir / "report.md").read_text()
    assert (run_dir / "predictions_rag.jsonl").is_file()
    # the eval command on the finished run reproduces the same numbers
    proc = run_cli(["ragdist-eval", f"eval.run_dir={run_dir}", "retrieval.service_name=eval-test"],
                   env={"RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((run_dir / "report.json").read_text())["results"]
    assert again["rag"]["em"] == rag["em"] and again["closed_book"]["f1"] == closed["f1"]


def _fails(args, match, tmp_path):
    proc = run_cli(args)
    assert proc.returncode != 0
    assert match in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not [p for p in snapshots_under(tmp_path / "idx") if p.name.startswith("v")]
    return proc


def test_cli_missing_corpus(tmp_path):
    _fails(["ragdist-index", *TINY, f"corpus.path={tmp_path}/missing.jsonl", f"index.root={tmp_path / 'idx'}"],
           "missing.jsonl: corpus file not found", tmp_path)


def test_cli_malformed_corpus_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "broken\n')
    _fails(["ragdist-index", *TINY, f"corpus.path={bad}", f"index.root={tmp_path / 'idx'}"], "bad.jsonl:2", tmp_path)


def test_cli_unknown_config_key(tmp_path):
    proc = run_cli(["ragdist-index", *TINY, "index.num_shard=4"])
    assert proc.returncode != 0 and "num_shard" in proc.stderr


def test_cli_missing_model_path(tmp_path):
    _fails(["ragdist-train", *TINY, "model.name_or_path=/no/such/model", f"index.root={tmp_path / 'idx'}"],
           "/no/such/model", tmp_path)


def test_cli_index_dim_mismatch(tmp_path, tiny_chunks):
    from ragdist.index.builder import IndexConfig, build_snapshot

    x = np.random.default_rng(0).standard_normal((len(tiny_chunks), 16)).astype(np.float32)
    snap = build_snapshot(tiny_chunks, x, IndexConfig(root=str(tmp_path / "other")), embedder_name="rand16")
    proc = run_cli(["ragdist-train", *TINY, f"index.snapshot={snap}"])
    assert proc.returncode == 2 and "has dim 16 but embedder" in proc.stderr, proc.stderr[-2000:]
