"""Every retriever loss under DeepSpeed ZeRO-3 and FSDP2, 2 ranks over gloo: the retriever's query and
passage encoders get non-zero gradients through the engine's backward, change after the step, and stay
identical on both ranks; the generator steps too.

The test launches this file with torchrun; run as a script, it is one rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _launch(engine: str, out: Path) -> dict:
    from ragdist.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__)), engine, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_every_loss_trains_the_retriever_through_the_engine(engine, tmp_path):
    from ragdist.joint.losses import LOSSES

    res = _launch(engine, tmp_path)
    for loss in LOSSES:
        a, b = res[0][loss], res[1][loss]
        for r in (a, b):
            assert r["query_grad"] > 0 and r["passage_grad"] > 0, (engine, loss, r)
            assert r["query_change"] > 0 and r["passage_change"] > 0, (engine, loss, r)
            assert r["retriever_loss"] == r["retriever_loss"]  # finite
        # Gradients were averaged over ranks: the replicas are still the same model.
        assert a["retriever_checksum"] == b["retriever_checksum"], (engine, loss)
        assert a["generator_checksum"] == b["generator_checksum"], (engine, loss)
    sums = [res[0][loss]["generator_checksum"] for loss in LOSSES]
    assert len(set(sums)) == len(sums)  # the generator stepped every time as well


def _worker(engine_name: str, out: Path) -> None:
    import torch

    from ragdist import distributed as rdist
    from ragdist.data.corpus import load_documents
    from ragdist.data.qa import load_qa
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.joint.generator import JointLM
    from ragdist.joint.losses import LOSSES
    from ragdist.joint.retriever import JointRetriever, RetrieverOptimizer, encoder_dir
    from ragdist.train.engine import TrainerConfig
    from ragdist.train.engines import build_engine
    from ragdist.train.examples import collate_train, encode_train
    from ragdist.train.model import ModelConfig, build_generator, load_tokenizer

    torch.set_num_threads(1)
    trainer = TrainerConfig(engine=engine_name, zero_stage=3, micro_batch_size=2, max_steps=8, warmup_steps=0, lr=1e-3)
    model_cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    tok = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    retriever = JointRetriever(encoder_dir(resolve_model_path("minilm")), "both", max_length=64)

    def build() -> torch.nn.Module:
        return JointLM(build_generator(model_cfg, tok), loss="rag_nll", generator_weight=1.0, retriever_weight=1.0,
                       retriever_temperature=0.1, lm_temperature=1.0)

    engine = build_engine(trainer, build, out)
    rank = engine.rank
    ropt = RetrieverOptimizer(retriever.trainable(), lr=1e-4, weight_decay=0.0, grad_clip=1.0, schedule=lambda s: 1.0)
    docs = {d.id + "#0": {"id": d.id + "#0", "title": d.title, "text": d.text}
            for d in load_documents(ROOT / "tests/data/corpus.jsonl")}
    ids = sorted(docs)
    qa = load_qa(ROOT / "tests/data/train.jsonl")[rank * 8 : rank * 8 + 2]  # each rank its own questions
    passages = [[docs[ex.gold_ids[0]]] + [docs[i] for i in ids[3 * j : 3 * j + 2]] for j, ex in enumerate(qa)]

    def flat(module: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])

    results = {}
    for loss in LOSSES:
        engine.module.loss_name = loss
        q0, p0 = flat(retriever.query), flat(retriever.passage)
        scores = retriever.scores([ex.question for ex in qa], passages)
        rows = [encode_train(tok, ex.question, [p], ex.answers[0], 96) for ex, ps in zip(qa, passages) for p in ps]
        batch = collate_train(rows, tok.pad_token_id)
        batch["retriever_scores"] = scores
        engine.train_step(batch)
        grad = {name: float(sum(p.grad.norm() ** 2 for p in enc.parameters() if p.grad is not None) ** 0.5)
                for name, enc in (("query", retriever.query), ("passage", retriever.passage))}
        ropt.step()
        with engine.gathered_params():
            gen = float(flat(engine.module.lm).sum())
        results[loss] = {
            "query_grad": grad["query"],
            "passage_grad": grad["passage"],
            "query_change": float((flat(retriever.query) - q0).abs().max()),
            "passage_change": float((flat(retriever.passage) - p0).abs().max()),
            "retriever_checksum": repr(float(flat(retriever).sum())),
            "generator_checksum": repr(gen),
            "retriever_loss": engine.module.last["retriever_loss"],
        }
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    engine.close()
    del engine
    rdist.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
