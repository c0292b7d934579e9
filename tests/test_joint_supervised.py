"""Supervised retriever training (DPR) through the one training loop, 2 ranks over gloo (DeepSpeed, FSDP2),
hard negatives mined from the real retrieval service on the tiny sample:

- from a weakened query encoder, the InfoNCE loss falls and recall@1 on the held-out eval airports rises;
- preempted mid-run and resumed from its checkpoint, it reproduces the uninterrupted run's losses exactly;
- the run leaves what joint runs leave (`retriever/`, `joint/final.json`, `joint_report.json`).

The test launches this file with torchrun; run as a script, it is one rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, ROOT

STEPS, CUT = 12, 5


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_snapshot):
    from ragdist.retrieval.client import RetrievalConfig, start_service, stop_service

    cfg = RetrievalConfig(service_name="dpr-test", cache_size=0)
    start_service(str(tiny_snapshot), cfg)
    yield cfg
    stop_service(cfg)


def _launch(tmp_path: Path, snapshot: str, engine: str, address: str) -> dict:
    from ragdist.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__)), engine,
           snapshot, str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_ADDRESS=address, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_supervised_stage_learns_and_resumes_exactly(engine, service, tiny_snapshot, ray_cluster, tmp_path):
    res = _launch(tmp_path, str(tiny_snapshot), engine, ray_cluster)
    full = res["full"]
    losses = [h["loss"] for h in full["history"]]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    before, after = full["joint"]["recall_before"], full["joint"]["recall_after"]
    assert before["questions"] == 40 and after["recall@1"] >= before["recall@1"] + 0.15, (before, after)
    assert after["mrr"] > before["mrr"]

    run = tmp_path / "full"
    assert (run / "retriever" / "config.json").is_file() and not (run / "passage_encoder").exists()
    final = json.loads((run / "joint" / "final.json").read_text())
    assert final["snapshot"] == str(tiny_snapshot) and final["query_encoder"] == str(run / "retriever")
    report = json.loads((run / "joint_report.json").read_text())
    assert report["loss"] == "dpr" and report["recall_after"] == after

    if engine != "deepspeed":
        return  # resume is the loop's and the engine's; checked once, under DeepSpeed
    # preempted at step CUT (a checkpoint, Preempted raised), then resumed: the same losses bit for bit
    assert res["preempted_at"] == CUT
    resumed = res["resumed"]
    assert resumed["resumed_from"].endswith(f"step_{CUT:08d}") and resumed["steps"] == STEPS
    assert [h["loss"] for h in resumed["history"]] == losses
    assert resumed["joint"]["recall_before"] == before  # measured once, at the start, carried by the checkpoint
    assert resumed["joint"]["recall_after"] == after


def test_contrastive_batch_masks_shared_golds_and_mines_non_gold(tiny_snapshot):
    """Two questions about one airport share a gold column (each masks nothing of its own); mined
    negatives are never gold; labels point at each question's own gold."""
    from transformers import AutoTokenizer

    from ragdist.data.qa import load_qa
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.joint.retriever import encoder_dir
    from ragdist.joint.supervised import ContrastiveSource
    from ragdist.train.examples import PassageStore
    from ragdist.train.trainer import Position

    store = PassageStore.from_snapshot(tiny_snapshot)
    train = load_qa(DATA / "train.jsonl")
    others = list(store.passages)

    def mine(questions, k):  # a stand-in ranking that puts every question's gold first
        out = []
        for q in questions:
            ex = next(e for e in train if e.question == q)
            gold = store.get(ex.gold_ids[0])
            out.append([gold] + [p for p in others if p["id"] != gold["id"]][: k - 1])
        return out

    tok = AutoTokenizer.from_pretrained(encoder_dir(resolve_model_path("minilm")))
    src = ContrastiveSource(train, passage_of=store.get, mine=mine, tokenizer=tok, max_length=64, hard_negatives=2,
                            mine_depth=5, vectors=None)  # fmt: skip
    b = src.build(Position(0, 0, (0, 1, 4)))  # questions 0 and 1 share airport-BJK#0; 4 is another airport
    t = b.tensors
    assert t["labels"].tolist()[0] == t["labels"].tolist()[1] != t["labels"].tolist()[2]
    assert t["p_input_ids"].shape[0] == len(b.passages) and t["q_input_ids"].shape[0] == 3
    for i, ex in enumerate(b.examples):
        golds = {j for j, p in enumerate(b.passages) if p["id"] in ex.gold_ids}
        assert int(t["labels"][i]) in golds
        assert {j for j in range(len(b.passages)) if t["exclude"][i, j]} == golds - {int(t["labels"][i])}
    ids = [p["id"] for p in b.passages]
    assert len(ids) == len(set(ids)) and 2 + 2 <= len(ids) <= 2 + 3 * 2  # 2 distinct golds, 2 negatives each, deduplicated


def test_supervised_config_errors_name_the_key():
    from ragdist.errors import ConfigError
    from ragdist.joint.config import JointConfig, SupervisedConfig, check_supervised_config

    for sup, key in [(SupervisedConfig(temperature=0), "temperature"), (SupervisedConfig(mine_depth=1), "mine_depth"),
                     (SupervisedConfig(schedule="step"), "schedule"), (SupervisedConfig(batch_size=0), "batch_size")]:
        with pytest.raises(ConfigError, match=f"joint.supervised.{key}"):
            check_supervised_config(JointConfig(supervised=sup))
    with pytest.raises(ConfigError, match="side=both"):
        check_supervised_config(JointConfig(refresh_every=5, supervised=SupervisedConfig(steps=5)))


@pytest.mark.slow
def test_supervised_stage_before_joint_training_side_both(ray_cluster, tiny_index, tmp_path):
    """`joint=lsr joint.supervised.steps=N joint.side=both` through ragdist-train: the supervised stage
    refreshes the index while it trains, and joint training starts from its encoders and final index."""
    from tests.conftest import run_cli
    from tests.test_golden import CHEAP_EVAL

    run = tmp_path / "run"
    p = run_cli(["ragdist-train", "+experiment=tiny", "joint=lsr", "joint.side=both", "joint.refresh_every=3",
                 "joint.refresh_nice=0", "joint.refresh_wait_staleness=4", "joint.supervised.steps=6",
                 "joint.supervised.batch_size=8", "joint.encoder_max_length=64", "trainer.max_steps=3",
                 "trainer.variants=[rag]", "eval.strategies=[rag]", *CHEAP_EVAL, f"index.root={tiny_index}",
                 "retrieval.service_name=dpr-then-lsr", f"hydra.run.dir={run}"], env={"RAY_ADDRESS": ray_cluster})  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sup = json.loads((run / "train_retriever.json").read_text())
    assert sup["steps"] == 6 and sup["joint"]["loss"] == "dpr" and sup["joint"]["side"] == "both"
    assert sup["joint"]["refresh"]["served"] >= 1 and sup["joint"]["final_index"]["encoder_step"] == 6
    joint = json.loads((run / "train_rag.json").read_text())["joint"]
    # joint training measured its "before" on the supervised stage's encoders and final index
    assert joint["recall_before"]["index_version"] == sup["joint"]["final_index"]["version"]
    assert joint["recall_before"]["mrr"] == sup["joint"]["recall_after"]["mrr"]
    for d in ("retriever", "passage_encoder", "checkpoints/rag"):
        assert (run / d / "config.json").is_file(), d
    assert json.loads((run / "joint_report.json").read_text())["loss"] == "lsr"  # the last stage's report


# --------------------------------------------------------------------------- one rank (under torchrun)


def _rank(engine_name: str, snapshot: str, out: Path) -> None:
    import dataclasses

    from ragdist import distributed as rdist
    from ragdist.data.qa import load_qa
    from ragdist.embed import EmbedderConfig
    from ragdist.joint.config import JointConfig, SupervisedConfig
    from ragdist.joint.supervised import train_supervised
    from ragdist.retrieval.client import RetrievalConfig
    from ragdist.retrieval.cluster import init_ray
    from ragdist.train.engine import TrainerConfig
    from ragdist.train.preempt import Preempted
    from ragdist.utils.logger import LoggerConfig, RunLogger

    torch.set_num_threads(1)
    rank, _ = rdist.init_process_group()
    init_ray(os.environ["RAY_ADDRESS"])
    train, evals = load_qa(DATA / "train.jsonl"), load_qa(DATA / "eval.jsonl")
    joint = JointConfig(query_noise=0.5, encoder_max_length=64, recall_ks=[1, 3],
                        supervised=SupervisedConfig(steps=STEPS, batch_size=8, hard_negatives=2, mine_depth=6,
                                                    lr=1e-4, warmup_steps=0, schedule="constant"))  # fmt: skip
    trainer = TrainerConfig(engine=engine_name, zero_stage=2, save_every=4, log_every=1, seed=0, prefetch_depth=2,
                            retrieval_lookahead=2)  # fmt: skip
    kw = dict(joint=joint, retrieval=RetrievalConfig(service_name="dpr-test", cache_size=0),
              embedder_cfg=EmbedderConfig(progress=False), snapshot=snapshot)

    def run(name: str, tcfg: TrainerConfig, stop=None) -> dict:
        logger = RunLogger(LoggerConfig(), out / name, enabled=False, config=None)
        return train_supervised(train, evals, trainer=tcfg, run_dir=out / name, logger=logger, stop_requested=stop, **kw)

    result: dict = {"full": run("full", trainer)}
    if engine_name != "deepspeed":
        if rank == 0:
            result["full"] = {k: result["full"][k] for k in ("history", "joint", "steps", "resumed_from")}
            (out / "result.json").write_text(json.dumps(result, default=str))
        rdist.shutdown()
        return
    calls = [0]

    def stop_at_cut() -> bool:
        calls[0] += 1
        return calls[0] >= CUT

    try:
        run("cut", trainer, stop_at_cut)
    except Preempted as e:
        result["preempted_at"] = e.step
    result["resumed"] = run("cut", dataclasses.replace(trainer, resume="auto"))
    if rank == 0:
        for r in ("full", "resumed"):
            result[r] = {k: result[r][k] for k in ("history", "joint", "steps", "resumed_from")}
        (out / "result.json").write_text(json.dumps(result, default=str))
    rdist.shutdown()


if __name__ == "__main__":
    _rank(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
