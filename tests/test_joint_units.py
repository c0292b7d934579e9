"""Joint training, in one process: the four losses against their definitions, the encoders against the
index's embedder, the weights snapshot format, and the config's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ragdist.errors import ConfigError
from ragdist.joint import losses
from ragdist.joint.config import JointConfig, check_joint_top_k


@pytest.fixture(scope="module")
def encoder_path():
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.joint.retriever import encoder_dir

    return encoder_dir(resolve_model_path("minilm"))


def _inputs(seed: int = 0, b: int = 3, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(b, k, generator=g) * 2 - 1).requires_grad_(True)
    ll = (-torch.rand(b, k, generator=g) * 8).requires_grad_(True)
    return scores, ll


def test_rag_nll_is_the_marginal_likelihood_and_trains_both_sides():
    scores, ll = _inputs()
    tau = 0.1
    loss = losses.retriever_loss("rag_nll", scores, ll, retriever_temperature=tau, lm_temperature=1.0)
    p = torch.softmax(scores.detach() / tau, -1)
    marginal = (p * ll.detach().exp()).sum(-1)
    assert torch.allclose(loss, -marginal.log().mean(), atol=1e-5)
    loss.backward()
    post = p * ll.detach().exp() / marginal[:, None]
    b = scores.shape[0]
    # d/ds of -log Σ p(z|x) p(y|x,z) = (p(z|x) - p(z|x,y)) / τ; d/dll = -p(z|x,y)
    assert torch.allclose(scores.grad, (p - post) / tau / b, atol=1e-5)
    assert torch.allclose(ll.grad, -post / b, atol=1e-5)


def test_emdr2_is_the_marginal_with_the_generator_side_stopped():
    scores, ll = _inputs(1)
    a = losses.retriever_loss("emdr2", scores, ll, retriever_temperature=0.2, lm_temperature=1.0)
    b = losses.retriever_loss("rag_nll", scores.detach(), ll.detach(), retriever_temperature=0.2, lm_temperature=1.0)
    assert torch.allclose(a, b)
    a.backward()
    assert ll.grad is None and scores.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["lsr", "pdist"])
def test_kl_losses_match_their_definition(name):
    scores, ll = _inputs(2)
    tr, tl = 0.1, 0.5
    loss = losses.retriever_loss(name, scores, ll, retriever_temperature=tr, lm_temperature=tl)
    p = np.exp(scores.detach().numpy() / tr)
    p /= p.sum(-1, keepdims=True)
    q = np.exp(ll.detach().numpy() / tl)
    q /= q.sum(-1, keepdims=True)
    # lsr: KL(retriever || LM) as REPLUG / RA-DIT; pdist: KL(LM || retriever) as Atlas
    kl = (p * np.log(p / q)).sum(-1) if name == "lsr" else (q * np.log(q / p)).sum(-1)
    assert loss.item() == pytest.approx(kl.mean(), rel=1e-4, abs=1e-6)
    loss.backward()
    assert ll.grad is None  # the generator side is a target, not trained by this loss
    assert scores.grad.abs().sum() > 0
    if name == "pdist":  # cross-entropy with soft targets: gradient (p - q) / τ
        assert torch.allclose(scores.grad, torch.tensor((p - q) / tr / len(p), dtype=torch.float32), atol=1e-5)


def test_losses_pull_the_retriever_toward_what_the_generator_credits():
    """One gradient step on the scores raises the score of the passage the generator likes best."""
    for name in losses.LOSSES:
        scores = torch.zeros(1, 3, requires_grad=True)
        ll = torch.tensor([[-1.0, -6.0, -6.0]])
        losses.retriever_loss(name, scores, ll, retriever_temperature=0.1, lm_temperature=1.0).backward()
        assert scores.grad[0, 0] < 0 < scores.grad[0, 1], name


def test_unknown_loss_and_bad_shapes():
    s, ll = _inputs()
    with pytest.raises(ConfigError, match="joint.loss='dpr'"):
        losses.retriever_loss("dpr", s, ll, retriever_temperature=0.1, lm_temperature=1.0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        losses.retriever_loss("lsr", s, ll[:, :2], retriever_temperature=0.1, lm_temperature=1.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"loss": "ranknet"}, "joint.loss='ranknet'"),
        ({"side": "passage"}, "joint.side='passage'"),
        ({"candidates": 2}, "joint.candidates=2"),
        ({"retriever_temperature": 0.0}, "joint.retriever_temperature"),
        ({"refresh_every": 5}, "need joint.side=both"),
        ({"side": "both", "refresh_workers": 0}, "joint.refresh_workers=0"),
        ({"recall_ks": [0]}, "joint.recall_ks"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):  # refused as the config is built, or against top_k
        check_joint_top_k(JointConfig(**{"loss": "lsr", **overrides}), top_k=4)
    with pytest.raises(ConfigError, match="at least 2 passages"):
        check_joint_top_k(JointConfig(loss="lsr"), top_k=1)


def test_joint_group_composes_and_refuses_unknown_keys():
    from ragdist.config import compose

    cfg = compose(["joint=pdist", "joint.side=both", "joint.refresh_every=7"])
    assert cfg.joint.loss == "pdist" and cfg.joint.refresh_every == 7
    assert compose([]).joint.loss == "none"
    with pytest.raises(Exception, match="refresh_evry"):
        compose(["joint=lsr", "joint.refresh_evry=3"])


def test_encoders_reproduce_the_index_embedder(encoder_path, tiny_chunks, tiny_vectors):
    from ragdist.joint.retriever import JointRetriever

    r = JointRetriever(encoder_path, "query")
    texts = [c.text for c in tiny_chunks]
    assert np.allclose(r.passage.encode(texts), tiny_vectors, atol=2e-5)
    assert np.allclose(r.query.encode(texts[:5]), tiny_vectors[:5], atol=2e-5)
    # side=query: the passage side is frozen; scores carry gradient into the query encoder only
    ps = [{"id": c.id, "text": c.text} for c in tiny_chunks[:4]]
    s = r.scores(["Which airport serves Detroit?"], [ps])
    assert s.shape == (1, 4)
    s[0, 0].backward()
    assert all(p.grad is None for p in r.passage.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.query.parameters())


def test_perturbed_query_encoder_is_weaker_and_identical_per_seed(encoder_path):
    from ragdist.joint.retriever import JointRetriever

    a, b = JointRetriever(encoder_path, "query"), JointRetriever(encoder_path, "query")
    before = a.query.encode(["What is the IATA code of Farah Airport?"])
    a.perturb_query(0.5, seed=3)
    b.perturb_query(0.5, seed=3)
    after = a.query.encode(["What is the IATA code of Farah Airport?"])
    assert float((before * after).sum()) < 0.99
    assert all(torch.equal(x, y) for x, y in zip(a.query.parameters(), b.query.parameters()))


def test_weights_snapshot_is_safetensors_and_roundtrips(tmp_path, encoder_path):
    from ragdist.joint.retriever import MeanPoolEncoder, load_weights, save_weights

    enc = MeanPoolEncoder(encoder_path)
    with torch.no_grad():
        next(enc.model.parameters()).add_(0.01)
    path = save_weights(enc.weights(), tmp_path / "snap.safetensors", {"step": "3"})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensors
    assert header["__metadata__"] == {"step": "3"}
    assert not list(tmp_path.glob(".snap*"))  # the temp file was renamed, not left behind
    fresh = MeanPoolEncoder(encoder_path)
    fresh.load_weights(load_weights(path))
    assert np.allclose(fresh.encode(["Ngau Airport"]), enc.encode(["Ngau Airport"]), atol=1e-6)
    path.write_bytes(raw[:100])
    with pytest.raises(ConfigError, match="snap.safetensors"):
        load_weights(path)


def test_encoder_dir_refuses_a_pooling_it_cannot_reproduce(tmp_path):
    from ragdist.joint.retriever import encoder_dir

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ConfigError, match="mean pooling"):
        encoder_dir(str(tmp_path))


def test_generator_log_likelihood_is_per_sequence_answer_tokens():
    from ragdist.joint.generator import JointLM, answer_log_likelihood
    from ragdist.train.model import IGNORE, ModelConfig, build_generator, load_tokenizer

    mc = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tok = load_tokenizer(mc)
    lm = build_generator(mc, tok).eval()
    ids = torch.randint(100, 1000, (4, 12))
    labels = torch.full_like(ids, IGNORE)
    labels[:, 9:] = ids[:, 9:]
    mask = torch.ones_like(ids)
    ll, n = answer_log_likelihood(lm, ids, mask, labels)
    logp = lm(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    ref = torch.stack([sum(logp[i, t - 1, ids[i, t]] for t in range(9, 12)) for i in range(4)])
    assert torch.allclose(ll, ref, atol=1e-4) and n.tolist() == [3, 3, 3, 3]
    joint = JointLM(lm, loss="rag_nll", generator_weight=1.0, retriever_weight=1.0, retriever_temperature=0.1,
                    lm_temperature=1.0)
    scores = torch.zeros(2, 2, requires_grad=True)
    joint(ids, mask, labels, scores).backward()
    assert scores.grad is not None and joint.last["ll"].shape == (2, 2)
    with pytest.raises(ValueError, match="4 sequences for 3 questions"):
        joint(ids, mask, labels, torch.zeros(3, 2))
