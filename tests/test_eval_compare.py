"""The comparison command end to end: `ragdist-eval eval.compare=true` on the tiny sample trains the
missing rows with 2 DeepSpeed ranks, evaluates every row against the real retrieval service, and
writes the report, JSON, plots, predictions and an offline wandb run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ragdist.eval import metrics as M
from tests.conftest import DATA, run_cli
from tests.test_eval_units import PNG_MAGIC, save_tiny_classifier

ROWS = ["closed_book", "base_rag", "closed_book_rag", "rag"]


def _predictions(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / f"predictions_{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compare_trains_missing_rows_then_reuses_them(ray_cluster, tiny_index, tmp_path):
    nli = save_tiny_classifier(tmp_path / "nli", ["contradiction", "entailment", "neutral"])
    run = tmp_path / "cmp"
    proc = run_cli(
        [
            "ragdist-eval",
            "+experiment=tiny",
            "eval.compare=true",
            "trainer.max_steps=8",
            "trainer.warmup_steps=2",
            "data.max_eval=16",
            "eval.latency_samples=6",
            "eval.topk_sweep=[0,1,3]",
            "eval.distractors=[2]",
            f"eval.nli_model={nli}",
            "logger=wandb",
            f"index.root={tiny_index}",
            "retrieval.service_name=compare-test",
            f"hydra.run.dir={run}",
        ],
        env={"RAY_ADDRESS": ray_cluster, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((run / "report.json").read_text())
    results = report["results"]
    assert list(results) == ROWS

    # the missing rows were trained by the training recipe with the same budget
    for v in ("rag", "closed_book"):
        s = json.loads((run / f"train_{v}.json").read_text())
        assert s["steps"] == 8 and s["world_size"] == 2
    assert report["setup"]["steps"] == {"rag": 8, "closed_book": 8}
    assert "variants:\n  - rag\n  - closed_book" in (run / "resolved.yaml").read_text()

    for name, m in results.items():
        rows = _predictions(run, name)
        assert m["n"] == len(rows) == 16
        # report figures are the per-question scores of the written predictions
        assert m["em"] == pytest.approx(np.mean([M.exact_match(r["prediction"], r["answers"]) for r in rows]))
        assert m["f1"] == pytest.approx(np.mean([M.token_f1(r["prediction"], r["answers"]) for r in rows]))
        assert m["generated_tokens"] == pytest.approx(np.mean([r["generated_tokens"] for r in rows]))
        lat = m["e2e_latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert m["tokens_per_q"] == pytest.approx(m["prompt_tokens"] + m["generated_tokens"])
        assert len(report["latency_samples"][name]["e2e"]) == 6
    closed = results["closed_book"]
    assert (
        "recall@3" not in closed
        and closed["retrieval_added_tokens"] == 0
        and closed["retrieval_latency_s"] == {}
    )
    for name in ROWS[1:]:
        m = results[name]
        assert m["recall@3"] >= 0.9 and m["top_k"] == 3
        assert {"precision@3", "ndcg@3", "mrr", "answer_recall@3", "nli_score", "faithfulness_nli"} <= set(m)
        assert m["retrieval_added_tokens"] > 100 and m["retrieval_latency_s"]["p50"] > 0
        if name == "base_rag":  # random weights: main figures only, no sweep or robustness passes
            assert "em_at_k" not in m and "em_distractors" not in m
            continue
        assert set(m["em_at_k"]) == {"0", "1", "3"} and set(m["em_distractors"]) == {"2"}
        assert m["em_at_k"]["3"] == m["em"] and "em_reversed" in m and "em_shuffled" in m
    # the closed-book model at k=0 is the closed-book row
    assert results["closed_book_rag"]["em_at_k"]["0"] == closed["em"]
    curve = report["retrieval"]["main"]["recall_curve"]
    assert all(a <= b + 1e-9 for a, b in zip(curve, curve[1:]))

    md = (run / "report.md").read_text()
    assert "| strategy | EM | F1 | faithfulness | hallucination | R@k | p50 latency | tokens/q |" in md
    for label in (
        "fine-tune only (closed book)",
        "RAG at inference only (base model)",
        "RAG at inference only (closed-book fine-tuned)",
        "RAG fine-tuned (with retrieval)",
    ):
        assert f"| {label} | " in md
    assert sorted(report["plots"]) == sorted(
        f"plots/{p}.png" for p in ("em_vs_topk", "recall_at_k", "latency", "robustness", "tokens")
    )
    for p in report["plots"]:
        data = (run / p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    # the same figures went to the logger: metrics.jsonl and an offline wandb run
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(rec.get("eval/rag/em") == results["rag"]["em"] for rec in logged)
    assert list((run / "wandb").glob("offline-run-*/*.wandb"))

    # Second call: the run's checkpoints are reused (nothing retrained) and the run itself is given
    # as the joint run, served by a second service: its row must repeat the rag row exactly. Its
    # query encoder is a copy of the stock one saved as the run's `retriever` (as a side=query joint
    # run leaves it): another name than the snapshot's embedder, which the joint row must accept.
    from ragdist.embed.embedder import resolve_model_path

    shutil.copytree(resolve_model_path("minilm"), run / "retriever")
    mtime = (run / "train_rag.json").stat().st_mtime
    proc = run_cli(
        [
            "ragdist-eval",
            f"eval.run_dir={run}",
            f"eval.joint_run={run}",
            "eval.compare=true",
            "eval.strategies=[rag,joint]",
            "eval.distractor_source=random",
            "eval.latency_samples=4",
            "eval.topk_sweep=[3]",
            "eval.distractors=[1]",
            "eval.order_checks=false",
            "retrieval.service_name=compare-test-2",
            f"hydra.run.dir={tmp_path / 'second'}",
        ],
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (run / "train_rag.json").stat().st_mtime == mtime
    again = json.loads((run / "report.json").read_text())
    assert list(again["results"]) == ["rag", "joint"] and set(again["retrieval"]) == {"main", "joint"}
    assert again["results"]["rag"]["em"] == results["rag"]["em"]
    assert [r["prediction"] for r in _predictions(run, "joint")] == [
        r["prediction"] for r in _predictions(run, "rag")
    ]
    assert again["retrieval"]["joint"]["recall_curve"] == again["retrieval"]["main"]["recall_curve"]
    assert again["setup"]["joint"]["checkpoint"] == str(run / "checkpoints" / "rag")
    # the first call's budget came from the tiny experiment; this call's eval group leaves it to the
    # training answers, which all fit (the tiny eval answers too)
    assert report["setup"]["max_new_tokens_from"] == "eval.max_new_tokens"
    assert again["setup"]["max_new_tokens_from"].startswith("the longest training answer")
    assert again["setup"]["answers_over_budget"] == 0 and not again["notes"]
    assert "random distractor" in (run / "report.md").read_text()


def test_compare_refuses_eval_questions_seen_in_training(tmp_path):
    leaked = tmp_path / "eval.jsonl"
    leaked.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:3]))
    run = tmp_path / "run"
    proc = run_cli(
        [
            "ragdist-eval",
            "+experiment=tiny",
            "eval.compare=true",
            f"data.eval={leaked}",
            f"index.root={tmp_path / 'idx'}",
            f"hydra.run.dir={run}",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "3 eval question(s)" in proc.stderr and str(leaked) in proc.stderr and "Traceback" not in proc.stderr
    )
    assert not (run / "checkpoints").exists() and not (tmp_path / "idx").exists()  # nothing expensive started


def test_eval_needs_a_mode_and_a_complete_joint_run(tmp_path):
    proc = run_cli(["ragdist-eval", "+experiment=tiny", f"hydra.run.dir={tmp_path / 'a'}"])
    assert proc.returncode == 2 and "eval.compare=true" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "joint").mkdir()
    proc = run_cli(
        [
            "ragdist-eval",
            "+experiment=tiny",
            "eval.compare=true",
            f"eval.joint_run={tmp_path / 'joint'}",
            f"index.root={tmp_path / 'idx'}",
            f"hydra.run.dir={tmp_path / 'b'}",
        ]
    )
    assert proc.returncode == 2 and "no generator checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "idx").exists()
