"""The service's features on a real Ray cluster: updates, versions, filters, hybrid, re-ranking, metrics."""

from __future__ import annotations

import threading
import time
import zlib

import faiss
import numpy as np
import pytest

from ragdist.data.corpus import Chunk
from ragdist.errors import RetrievalError
from ragdist.index.builder import IndexConfig, build_snapshot
from ragdist.retrieval.client import (
    HybridConfig,
    RerankConfig,
    RetrievalClient,
    RetrievalConfig,
    flat_metrics,
    rrf_fuse,
    start_service,
    stop_service,
)
from tests.test_retrieval_shard import DIM, brute, matches, meta_corpus
from tests.test_service_faults import pid_of, wait_restarted


def unit(v: np.ndarray) -> np.ndarray:
    v = np.atleast_2d(np.asarray(v, np.float32))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def doc_on_shard(shard: int, prefix: str) -> str:
    """A document id that hash-routes to `shard` of 2."""
    for i in range(1000):
        d = f"{prefix}{i}"
        if zlib.crc32(d.encode()) % 2 == shard:
            return d
    raise AssertionError


@pytest.fixture(scope="module")
def meta_service(ray_cluster, tmp_path_factory):
    chunks, x = meta_corpus(2000)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path_factory.mktemp("meta"))),
                          embedder_name="rand")
    cfg = RetrievalConfig(service_name="features-meta")
    start_service(str(path), cfg)
    yield cfg, chunks, x, path
    stop_service(cfg)


def test_filters_through_the_service(meta_service):
    cfg, chunks, x, _ = meta_service
    client = RetrievalClient(cfg)
    q = np.random.default_rng(3).standard_normal((5, DIM)).astype(np.float32)
    for spec in ({"domain": "aero"}, {"source": ["news", "forum"], "timestamp": [10, 900]},
                 {"tags": {"all": ["t2", "odd"]}}):
        rows = [i for i in range(len(chunks)) if matches(chunks[i], spec)]
        res = client.search(q, 10, filter=spec)
        np.testing.assert_array_equal(res.ids, brute(x, rows, q, 10))
        assert all(len(ps) == 10 for ps in res.passages)
        assert all(matches(chunks[int(p["id"][1:])], spec) for ps in res.passages for p in ps)


def test_streaming_updates_are_atomic_and_replayed(meta_service):
    import ray

    cfg, chunks, x, _ = meta_service
    writer, reader = RetrievalClient(cfg), RetrievalClient(cfg)
    q = unit(np.random.default_rng(11).standard_normal(DIM))
    base = writer.search(q, 2, passages=False).ids
    docs = [doc_on_shard(0, "left"), doc_on_shard(1, "right")]

    def pair(gen: int) -> tuple[list[Chunk], np.ndarray]:
        noise = np.random.default_rng(gen).standard_normal((2, DIM)).astype(np.float32) * 1e-3
        return [Chunk(id=f"p{gen}-{s}", doc_id=docs[s], text=f"generation {gen}") for s in (0, 1)], unit(q + noise)

    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            res = reader.search(q, 2)
            seen.append(tuple(sorted(p["id"] for p in res.passages[0])))

    rows, vecs = pair(0)
    writer.upsert(rows, vecs)
    th = threading.Thread(target=read)
    th.start()
    try:
        for gen in range(1, 12):
            rows, vecs = pair(gen)
            # One epoch replaces the pair on both shards: the old rows go, the new ones arrive.
            out = writer.update(upsert=rows, vectors=vecs, delete_ids=[f"p{gen - 1}-0", f"p{gen - 1}-1"])
            assert out["epoch"] >= gen + 1 and out["upserted"] == 2
            res = writer.search(q, 2)  # read-your-writes, at once
            assert sorted(p["id"] for p in res.passages[0]) == [f"p{gen}-0", f"p{gen}-1"]
    finally:
        stop.set()
        th.join(60)
    assert len(seen) > 5
    for ids in seen:  # never a mix of two epochs, never a half-applied pair
        gens = {i.split("-")[0] for i in ids}
        assert len(gens) == 1 and len(ids) == 2, ids
    # A stale write (older timestamp) loses to the newer one already applied.
    late = writer.upsert([Chunk(id="p11-0", doc_id=docs[0], text="stale")], unit(-q), ts=time.time() - 3600)
    assert late["skipped"] == ["p11-0"] and late["upserted"] == 0
    # Delete a document: honoured by the very next query of any client.
    writer.delete(doc_ids=[docs[1]])
    assert [p["id"] for p in reader.search(q, 1).passages[0]] == ["p11-0"]
    # A restarted replica reloads the snapshot and replays the update log.
    victim = writer.views[writer.primary]["replicas"][1][0]
    old = pid_of(victim)
    ray.kill(victim, no_restart=False)
    wait_restarted(victim, old)
    info = ray.get(victim.info.remote())
    assert info["epoch"] == writer.versions()["versions"][writer.primary]["epoch"]
    res = RetrievalClient(cfg).search(q, 3)
    assert res.passages[0][0]["id"] == "p11-0" and "p11-1" not in [p["id"] for p in res.passages[0]]
    # Clean up for the other tests of this module: back to the snapshot's own rows.
    writer.delete(["p11-0"])
    np.testing.assert_array_equal(writer.search(q, 2, passages=False).ids, base)


def test_compact_folds_updates_into_a_new_snapshot(meta_service):
    from ragdist.index import snapshot as snap

    cfg, chunks, x, path = meta_service
    client = RetrievalClient(cfg)
    q = unit(np.random.default_rng(12).standard_normal(DIM))
    client.upsert([Chunk(id="fold-me", doc_id=doc_on_shard(1, "fold"), text="folded", meta={"domain": "aero"})],
                  unit(q + 1e-3))
    gone = [p["id"] for p in client.search(q, 3).passages[0]][1:3]
    client.delete(gone)
    before = client.search(q, 5, filter={"domain": ["aero", "misc"]})
    out = client.compact()
    assert out["promoted"] and client.versions()["primary"] == out["version"] != path.name
    m = snap.read_manifest(out["snapshot"])
    assert m["updated_from"]["version"] == path.name and m["num_chunks"] == len(chunks) + 1 - 2
    after = client.search(q, 5, filter={"domain": ["aero", "misc"]})
    assert after.epoch == 0 and after.version == out["version"]
    np.testing.assert_array_equal(after.ids, before.ids)  # global ids survive the fold
    assert [p["id"] for p in after.passages[0]] == [p["id"] for p in before.passages[0]]
    assert after.passages[0][0]["id"] == "fold-me" and not set(gone) & {p["id"] for p in after.passages[0]}
    client.rollback()  # back to the original snapshot (+ its log) for the other tests of this module
    client.update(delete_ids=["fold-me"])
    client.upsert([chunks[int(g[1:])] for g in gone], x[[int(g[1:]) for g in gone]])


def test_versions_canary_promote_rollback(ray_cluster, tmp_path):
    chunks, xa = meta_corpus(1000, seed=20)
    _, xb = meta_corpus(1000, seed=21)
    a = build_snapshot(chunks, xa, IndexConfig(num_shards=2, root=str(tmp_path)), embedder_name="rand")
    b = build_snapshot(chunks, xb, IndexConfig(num_shards=2, root=str(tmp_path)), embedder_name="rand")
    cfg = RetrievalConfig(service_name="features-versions")
    start_service(str(a), cfg)
    try:
        client, bystander = RetrievalClient(cfg), RetrievalClient(cfg)
        q = np.random.default_rng(4).standard_normal((3, DIM)).astype(np.float32)
        want_a, want_b = brute(xa, list(range(1000)), q, 5), brute(xb, list(range(1000)), q, 5)
        assert client.load_version(str(b)) == b.name
        assert client.versions()["primary"] == a.name and set(client.versions()["versions"]) == {a.name, b.name}
        np.testing.assert_array_equal(client.search(q, 5, version=b.name).ids, want_b)
        np.testing.assert_array_equal(client.search(q, 5).ids, want_a)
        client.set_canary(b.name, 0.5)
        got = [client.search(q, 5) for _ in range(40)]
        by = {r.version for r in got}
        assert by == {a.name, b.name}
        for r in got:  # each call answered wholly by one version
            np.testing.assert_array_equal(r.ids, want_a if r.version == a.name else want_b)
        assert min(client.metrics()["queries_by_version"].values()) >= 3 * 5
        assert client.promote() == b.name
        np.testing.assert_array_equal(client.search(q, 5).ids, want_b)
        # A client that has not refreshed sees the promotion on its next call.
        res = bystander.search(q, 5)
        assert res.version == b.name
        np.testing.assert_array_equal(res.ids, want_b)
        assert client.rollback() == a.name
        np.testing.assert_array_equal(bystander.search(q, 5).ids, want_a)
        assert set(client.versions()["versions"]) == {a.name}
        with pytest.raises(RetrievalError, match="already loaded"):
            client.load_version(str(a))
        with pytest.raises(RetrievalError, match="no canary to promote"):
            client.promote()
    finally:
        stop_service(cfg)


@pytest.fixture(scope="module")
def text_service(ray_cluster, tiny_snapshot):
    cfg = RetrievalConfig(service_name="features-text", hybrid=HybridConfig(enabled=True, depth=20))
    start_service(str(tiny_snapshot), cfg)
    yield cfg
    stop_service(cfg)


def test_hybrid_bm25_fused_by_rrf(text_service, embedder):
    cfg = text_service
    client = RetrievalClient(cfg, embedder=embedder)
    qs = ["Which airport has ICAO code OAFR?", "airport serving Detroit Michigan"]
    vecs = embedder.encode(qs)
    res = client.search(vecs, 20, texts=qs, lexical_k=20)
    assert res.payload[int(res.lexical_ids[0, 0])]["doc_id"] == "airport-FAH"  # the only passage with OAFR
    fused = rrf_fuse(res.ids, res.lexical_ids, 1.0, 1.0, 60)
    got = client.retrieve(qs, 4)
    assert [[p["id"] for p in ps] for ps in got] == [[res.payload[g]["id"] for g in f[:4]] for f in fused]
    # The weights decide: lexical only reproduces BM25's order, dense only the vector order.
    lex_only = RetrievalConfig(service_name=cfg.service_name, hybrid=HybridConfig(enabled=True, depth=20,
                                                                                  dense_weight=0.0))
    got = RetrievalClient(lex_only, embedder=embedder).retrieve(qs[:1], 3)
    assert [p["id"] for p in got[0]] == [res.payload[int(g)]["id"] for g in res.lexical_ids[0, :3]]
    dense_only = RetrievalConfig(service_name=cfg.service_name, hybrid=HybridConfig(enabled=True, depth=20,
                                                                                    lexical_weight=0.0))
    got = RetrievalClient(dense_only, embedder=embedder).retrieve(qs[:1], 3)
    assert [p["id"] for p in got[0]] == [p["id"] for p in res.passages[0][:3]]


def test_cross_encoder_reranks_top_n(text_service, embedder, tiny_cross_encoder):
    from ragdist.retrieval.rerank import CrossEncoderReranker

    cfg = RetrievalConfig(service_name=text_service.service_name, rerank=RerankConfig(model=tiny_cross_encoder, top_n=8))
    client = RetrievalClient(cfg, embedder=embedder)
    qs = ["What is the IATA code of Farah Airport?", "Which airport is in the Pacific/Fiji time zone?"]
    got = client.retrieve(qs, 3)
    dense = RetrievalClient(RetrievalConfig(service_name=text_service.service_name), embedder=embedder).retrieve(qs, 8)
    ce = CrossEncoderReranker(tiny_cross_encoder)
    for q, ps, cands in zip(qs, got, dense):
        s = ce.scores(q, cands)
        want = [cands[i]["id"] for i in np.argsort(-s, kind="stable")[:3]]
        assert [p["id"] for p in ps] == want
        assert [p["rerank_score"] for p in ps] == sorted((p["rerank_score"] for p in ps), reverse=True)
    with pytest.raises(Exception, match="not a local model directory"):
        RetrievalClient(RetrievalConfig(service_name=text_service.service_name,
                                        rerank=RerankConfig(model="/nonexistent/model")), embedder=embedder
                        ).retrieve(qs, 2)


def test_cache_never_serves_a_stale_entry(text_service, embedder):
    cfg = text_service
    a, b = RetrievalClient(cfg, embedder=embedder), RetrievalClient(cfg, embedder=embedder)
    q = ["What is the IATA code of Farah Airport?"]
    first = a.retrieve(q, 2)
    b.retrieve(q, 2)
    gold = first[0][0]
    assert gold["doc_id"] == "airport-FAH"
    calls = b.stats["calls"]
    assert b.retrieve(q, 2) == first and b.stats["calls"] == calls  # a hit
    a.delete([gold["id"]])  # a new epoch: b's entry for the old epoch must not be served
    try:
        again = b.retrieve(q, 2)
        assert b.stats["calls"] == calls + 1 and gold["id"] not in [p["id"] for p in again[0]]
    finally:
        vec = embedder.encode([gold["text"]])
        a.upsert([dict(gold)], vec)  # put it back (under a new row) for the other tests
    m = b.metrics()
    assert 0 < m["cache_hit_rate"] < 1 and m["cache_entries"] >= 1


def test_metrics(meta_service):
    cfg, _, _, _ = meta_service
    client = RetrievalClient(cfg)
    for i in range(6):
        client.search(np.random.default_rng(i).standard_normal((4, DIM)).astype(np.float32), 5)
    m = client.metrics(replicas=True)
    assert m["calls"] == 6 and m["queries"] == 24 and m["qps"] > 0
    assert set(m["shards"]) == {0, 1}
    for s in m["shards"].values():
        assert s["calls"] == 6 and 0 < s["rtt_ms"]["p50"] <= s["rtt_ms"]["p95"] <= s["rtt_ms"]["p99"]
    assert m["hottest_shard"] in (0, 1) and 0.5 <= m["hottest_shard_busy_share"] <= 1.0
    assert m["latency_ms"]["p50"] > 0 and m["max_queue_depth"] >= 1 and sum(m["queue_depth"].values()) == 0
    assert {r["backend"]["small"] for r in m["replicas"]} <= {"faiss", "torch"}
    flat = flat_metrics(m)
    assert flat["retrieval/qps"] == m["qps"] and flat["retrieval/shard1/p99_ms"] == m["shards"][1]["rtt_ms"]["p99"]


def test_ray_binds_loopback(ray_cluster):
    import ray

    assert ray_cluster.startswith("127.0.0.1:")
    assert ray.util.get_node_ip_address() == "127.0.0.1"


gpu = pytest.mark.skipif(not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0), reason="needs faiss-gpu")


@pytest.mark.gpu
@gpu
def test_shards_on_gpu(ray_cluster, tmp_path):
    chunks, x = meta_corpus(3000)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path)), embedder_name="rand")
    cfg = RetrievalConfig(service_name="features-gpu", device="gpu", shards_per_gpu=2, flat_backend="faiss")
    start_service(str(path), cfg)
    try:
        client = RetrievalClient(cfg)
        q = np.random.default_rng(0).standard_normal((8, DIM)).astype(np.float32)
        np.testing.assert_array_equal(client.search(q, 5).ids, brute(x, list(range(3000)), q, 5))
        assert {r["device"] for r in client.metrics(replicas=True)["replicas"]} == {"gpu"}
    finally:
        stop_service(cfg)
