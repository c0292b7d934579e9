"""The service on a real Ray cluster: sharded exact search equals one in-process index."""

import faiss
import numpy as np
import pytest

from ragdist.data.corpus import Chunk
from ragdist.errors import RetrievalError
from ragdist.index.builder import IndexConfig, build_snapshot
from ragdist.retrieval.client import RetrievalClient, RetrievalConfig, start_service, stop_service


def random_corpus(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = [Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=f"text {i}") for i in range(n)]
    return chunks, x


@pytest.mark.parametrize("num_shards,sharding", [(2, "contiguous"), (3, "hash")])
def test_sharded_equals_single_index(ray_cluster, tmp_path, num_shards, sharding):
    chunks, x = random_corpus(3000, 64)
    path = build_snapshot(
        chunks, x, IndexConfig(num_shards=num_shards, sharding=sharding, root=str(tmp_path)), embedder_name="rand"
    )
    cfg = RetrievalConfig(service_name=f"eq{num_shards}")
    start_service(str(path), cfg)
    try:
        client = RetrievalClient(cfg)
        q = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
        res = client.search(q, 10)
        single = faiss.IndexFlatIP(64)
        single.add(x)
        D, ids = single.search(q, 10)
        np.testing.assert_array_equal(res.ids, ids)
        np.testing.assert_allclose(res.scores, D, rtol=0, atol=1e-5)
        assert [[p["id"] for p in row] for row in res.passages] == [[chunks[i].id for i in row] for row in ids]
    finally:
        stop_service(cfg)


@pytest.fixture(scope="module")
def tiny_service(ray_cluster, tiny_snapshot):
    cfg = RetrievalConfig(service_name="tiny-tests")
    start_service(str(tiny_snapshot), cfg)
    yield cfg
    stop_service(cfg)


def test_text_retrieval_finds_the_gold_passage(tiny_service, embedder):
    from ragdist.data.qa import load_qa
    from tests.conftest import DATA

    client = RetrievalClient(tiny_service, embedder=embedder)
    qa = load_qa(DATA / "eval.jsonl")
    got = client.retrieve([ex.question for ex in qa], 3)
    hits = [ex.gold_ids[0] in [p["id"] for p in ps] for ex, ps in zip(qa, got)]
    assert np.mean(hits) >= 0.9
    assert all(len(ps) == 3 for ps in got)
    assert all({"title", "text", "meta", "source"} <= set(ps[0]) for ps in got)


def test_bf16_queries_find_what_fp32_queries_find(tiny_service, embedder):
    """embedder.dtype=bf16 against the fp32 index: vectors within 1e-4 in cosine, the same passages."""
    from ragdist.data.qa import load_qa
    from ragdist.embed import EmbedderConfig, build_embedder
    from ragdist.errors import ConfigError
    from tests.conftest import DATA

    bf16 = build_embedder(EmbedderConfig(progress=False, dtype="bf16"))
    assert bf16.name == embedder.name  # the same encoder: an fp32 snapshot serves it
    questions = [ex.question for ex in load_qa(DATA / "train.jsonl")]
    a, b = embedder.encode(questions), bf16.encode(questions)
    assert b.dtype == np.float32 and (a * b).sum(1).min() > 0.9999
    fp32_ids = [[p["id"] for p in ps] for ps in RetrievalClient(tiny_service, embedder=embedder).retrieve(questions, 3)]
    bf16_ids = [[p["id"] for p in ps] for ps in RetrievalClient(tiny_service, embedder=bf16).retrieve(questions, 3)]
    assert [x[0] for x in bf16_ids] == [x[0] for x in fp32_ids]
    assert np.mean([x == y for x, y in zip(bf16_ids, fp32_ids)]) >= 0.95
    with pytest.raises(ConfigError, match="embedder.dtype=fp16 needs"):
        build_embedder(EmbedderConfig(dtype="fp16"))
    with pytest.raises(ConfigError, match="embedder.dtype='int8'"):
        build_embedder(EmbedderConfig(dtype="int8"))


def test_cache_serves_repeats_and_keys_on_version(tiny_service, embedder, tiny_chunks, tiny_vectors, tmp_path):
    client = RetrievalClient(tiny_service, embedder=embedder)
    q = ["What is the IATA code of Farah Airport?"]
    first = client.retrieve(q, 2)
    calls = client.stats["calls"]
    assert client.retrieve(["  what is the IATA code of farah airport? "], 2) == first
    assert client.retrieve(q, 2, version=client.version) == first  # pinning the primary: the same entry
    assert client.stats["calls"] == calls and client.stats["cache_hits"] == 2
    # Another index version (the same rows under a new id) must never be served from the old entries.
    other = build_snapshot(tiny_chunks, tiny_vectors, IndexConfig(num_shards=2, root=str(tmp_path)),
                           embedder_name=embedder.name)
    vid = client.load_version(str(other))
    try:
        assert client.retrieve(q, 2, version=vid) == first
        assert client.stats["calls"] == calls + 1
    finally:
        client.unload(vid)


@pytest.mark.parametrize(
    "make_q,k,match",
    [
        (lambda: np.zeros((2, 7), np.float32), 3, "dim 384"),
        (lambda: np.full((1, 384), np.nan, np.float32), 3, "NaN"),
        (lambda: np.zeros((1, 384), np.float32), 0, "positive"),
        (lambda: np.zeros((1, 384), np.float32), -2, "positive"),
    ],
)
def test_bad_queries(tiny_service, make_q, k, match):
    client = RetrievalClient(tiny_service)
    with pytest.raises(RetrievalError, match=match):
        client.search(make_q(), k)


def test_k_larger_than_corpus_pads(tiny_service, tiny_vectors):
    client = RetrievalClient(tiny_service)
    res = client.search(tiny_vectors[:2], len(tiny_vectors) + 5)
    assert (res.ids[:, : len(tiny_vectors)] >= 0).all() and (res.ids[:, len(tiny_vectors) :] == -1).all()
    assert all(len(ps) == len(tiny_vectors) for ps in res.passages)


def test_unknown_service(ray_cluster):
    with pytest.raises(RetrievalError, match="no retrieval service named"):
        RetrievalClient(RetrievalConfig(service_name="nope"))
