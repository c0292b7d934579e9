"""Evaluation over 2 ranks (gloo, CPU) writes the report one process writes: `ragdist-eval` with
eval.nproc=2 against eval.nproc=1, same checkpoint, same questions, the real retrieval service."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_cli
from tests.tiny_hf import save_tiny

TIMING = re.compile(r"(_s|_s_per_q|latency_s|latency_samples)$")


def _untimed(x):
    """The report without its wall-clock figures (which no two runs share)."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not TIMING.search(k)}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


@pytest.mark.slow
def test_two_rank_evaluation_reports_what_one_process_does(ray_cluster, tiny_index, tmp_path):
    from ragdist.prompts import write_reader_format
    from ragdist.train.config import ExamplesConfig

    ckpt = save_tiny("qwen2", tmp_path / "model")  # its tokenizer carries a chat template
    # recorded as trained one passage at a time: evaluating it with passages in one prompt is pointed out
    write_reader_format(ckpt, ExamplesConfig(aggregation="sequential"), top_k=3)
    common = [
        "ragdist-eval",
        "+experiment=tiny",
        f"eval.checkpoint={ckpt}",
        f"index.root={tiny_index}",
        "data.max_eval=22",
        "eval.batch_size=4",  # 6 batches, the last one short, dealt to 2 ranks
        "eval.max_new_tokens=4",
        "eval.latency_samples=2",
        "eval.topk_sweep=[0,1]",
        "eval.distractors=[1]",
        "eval.plots=false",
    ]
    runs = {}
    for n in (1, 2):
        run = tmp_path / f"ranks{n}"
        proc = run_cli(
            [*common, f"eval.nproc={n}", f"retrieval.service_name=sharded-eval-{n}", f"hydra.run.dir={run}"],
            env={"RAY_ADDRESS": ray_cluster},
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs[n] = run
    assert "eval: 2 ranks" in proc.stderr
    assert "to evaluate it as trained, add: trainer.examples.aggregation='sequential'" in proc.stderr
    one, two = (json.loads((runs[n] / "report.json").read_text()) for n in (1, 2))
    assert list(one["results"]) == ["closed_book", "rag"]
    assert one["results"]["rag"]["n"] == 22 and "em_at_k" in one["results"]["rag"]
    assert _untimed(two) == _untimed(one)
    for row in ("closed_book", "rag"):
        assert (runs[2] / f"predictions_{row}.jsonl").read_text() == (runs[1] / f"predictions_{row}.jsonl").read_text()
    # timings were measured (on rank 0 for the latency probe) rather than left out
    assert two["results"]["rag"]["e2e_latency_s"]["p50"] > 0 and len(two["latency_samples"]["rag"]["e2e"]) == 2
