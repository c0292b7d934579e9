"""The retriever's side of joint training learns what the generator's likelihoods say, and that carries
over to held-out questions: from a weakened query encoder, a few steps of each loss raise recall on the
eval airports. Here the per-passage answer log-likelihood is given (the answer-bearing passage is
likelier), standing in for a generator that reads its passages; the retriever, its optimizer and the
losses are the real ones. (With the tiny from-scratch generator the same signal takes hundreds of
generator steps to appear; see docs/joint.md.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import DATA


@pytest.fixture(scope="module")
def setup():
    from ragdist.data.corpus import load_documents
    from ragdist.data.qa import load_qa
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.joint.retriever import JointRetriever, encoder_dir

    torch.manual_seed(0)
    r = JointRetriever(encoder_dir(resolve_model_path("minilm")), "query")
    r.perturb_query(0.5, seed=1)  # recall@1 on the eval questions drops from 1.0 to about 0.3
    docs = [{"id": d.id + "#0", "text": d.text} for d in load_documents(DATA / "corpus.jsonl")]
    return r, {k: v.clone() for k, v in r.query.state_dict().items()}, docs, r.passage.encode([d["text"] for d in docs]), \
        load_qa(DATA / "train.jsonl"), load_qa(DATA / "eval.jsonl")


def _recall_at_1(r, docs, P, evals) -> float:
    top = np.argmax(r.query.encode([e.question for e in evals]) @ P.T, axis=1)
    return float(np.mean([docs[j]["id"] in e.gold_ids for j, e in zip(top, evals)]))


@pytest.mark.parametrize("loss", ["rag_nll", "lsr", "pdist", "emdr2"])
def test_each_loss_raises_recall_on_held_out_questions(setup, loss):
    from ragdist.joint.losses import retriever_loss
    from ragdist.joint.retriever import RetrieverOptimizer

    r, start, docs, P, train, evals = setup
    r.query.load_state_dict(start)
    before = _recall_at_1(r, docs, P, evals)
    opt = RetrieverOptimizer(r.trainable(), lr=1e-4, weight_decay=0.0, grad_clip=1.0, schedule=lambda s: 1.0)
    rng = np.random.default_rng(0)
    for _ in range(12):
        batch = [train[i] for i in rng.choice(len(train), 8, replace=False)]
        q = r.query([e.question for e in batch])
        chosen = [[docs[j] for j in row] for row in np.argsort(-(q.detach().numpy() @ P.T), axis=1)[:, :8]]
        scores = r.scores([e.question for e in batch], chosen, q=q)
        ll = torch.tensor([[-2.0 if d["id"] in e.gold_ids else -8.0 for d in ps] for e, ps in zip(batch, chosen)])
        retriever_loss(loss, scores, ll, retriever_temperature=0.1, lm_temperature=1.0).backward()
        opt.step()
    after = _recall_at_1(r, docs, P, evals)
    assert after >= before + 0.2, (loss, before, after)
