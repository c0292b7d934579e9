"""The `Retriever` API on a real Ray cluster: controller round trips per search, caller-computed query
vectors, pinned versions, the exact merge, joint training's view, and a loopback-only cluster."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from ragdist.errors import RetrievalError
from ragdist.index.builder import IndexConfig, build_snapshot
from ragdist.retrieval.admin import ServiceAdmin, start_service, stop_service
from ragdist.retrieval.api import Retriever
from ragdist.retrieval.config import HybridConfig, RetrievalConfig
from ragdist.retrieval.retriever import ShardedRetriever
from ragdist.retrieval.transport import merge_topk
from tests.test_retrieval_shard import DIM, brute, meta_corpus


def reads(retriever: ShardedRetriever) -> dict[str, int]:
    """The controller's own count of the reads it served (topology, state, shards' log reads)."""
    import ray

    return ray.get(retriever.view.controller.read_counts.remote())


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


@pytest.fixture(scope="module")
def two_versions(ray_cluster, tmp_path_factory):
    chunks, xa = meta_corpus(1500, seed=30)
    _, xb = meta_corpus(1500, seed=31)
    root = tmp_path_factory.mktemp("api")
    a = build_snapshot(chunks, xa, IndexConfig(num_shards=2, root=str(root)), embedder_name="rand")
    b = build_snapshot(chunks, xb, IndexConfig(num_shards=2, root=str(root)), embedder_name="rand")
    cfg = RetrievalConfig(service_name="api-versions", replicas=2)
    start_service(str(a), cfg)
    yield cfg, chunks, (a, xa), (b, xb)
    stop_service(cfg)


def test_controller_round_trips_per_search(two_versions):
    cfg, chunks, (a, xa), (b, xb) = two_versions
    reader, admin = ShardedRetriever(cfg), ServiceAdmin(cfg)
    q = np.random.default_rng(5).standard_normal((4, DIM)).astype(np.float32)
    reader.search(q, 5)
    before = reads(reader)
    for _ in range(20):  # nothing changed: no controller call at all, and no shard reads the update log
        np.testing.assert_array_equal(reader.search(q, 5).ids, brute(xa, list(range(1500)), q, 5))
    assert reads(reader) == before
    # An update epoch (another client's write) reaches the reader through the shards' answers.
    top = reader.search(q[:1], 1).passages[0][0]
    admin.delete([top["id"]])
    n = total(reads(reader))
    assert top["id"] not in [p["id"] for p in reader.search(q[:1], 5).passages[0]]
    assert total(reads(reader)) == n
    # A version change (another client's promote): at most one round trip, then none again.
    admin.load_version(str(b))
    admin.promote(b.name)
    try:
        for _ in range(3):
            n = total(reads(reader))
            res = reader.search(q, 5)
            assert total(reads(reader)) - n <= 1
            assert res.version == b.name
            np.testing.assert_array_equal(res.ids, brute(xb, list(range(1500)), q, 5))
        assert total(reads(reader)) == n  # the last two searches: nothing changed
    finally:
        admin.rollback()  # back to a; b is unloaded
        admin.upsert([chunks[int(top["id"][1:])]], xa[[int(top["id"][1:])]])
    n = total(reads(reader))
    res = reader.search(q, 5)  # its version b is gone: the dead shards say so, one refresh
    assert res.version == a.name and total(reads(reader)) - n <= 1
    assert reader.metrics()["controller_calls"] <= 4


def test_pinned_version(two_versions):
    cfg, _, (a, xa), (b, xb) = two_versions
    retriever, admin = ShardedRetriever(cfg), ServiceAdmin(cfg)
    q = np.random.default_rng(6).standard_normal((3, DIM)).astype(np.float32)
    qs = ["q0", "q1", "q2"]
    want_a, want_b = brute(xa, list(range(1500)), q, 4), brute(xb, list(range(1500)), q, 4)
    ids = lambda ps: [[int(p["id"][1:]) for p in row] for row in ps]  # noqa: E731 - chunk "c<i>" is row i
    admin.load_version(str(b))  # loaded after the retriever built its view: pinning finds it
    try:
        assert ids(retriever.retrieve(qs, 4, version=b.name, vectors=q)) == want_b.tolist()
        assert ids(retriever.retrieve(qs, 4, vectors=q)) == want_a.tolist()
        admin.set_canary(b.name, 1.0)  # every unpinned call goes to b now; a pinned one stays on a
        assert ids(retriever.retrieve(qs, 4, vectors=q)) == want_b.tolist()
        assert ids(retriever.retrieve(qs, 4, version=a.name, vectors=q)) == want_a.tolist()
        assert retriever.version == a.name  # the primary
        with pytest.raises(RetrievalError, match="unknown index version 'v-nope'"):
            retriever.retrieve(qs, 4, version="v-nope", vectors=q)
    finally:
        admin.rollback()  # drops the canary (and unloads b)
    with pytest.raises(RetrievalError, match=f"unknown index version '{b.name}'"):
        retriever.retrieve(qs, 4, version=b.name, vectors=q)


class CountingEmbedder:
    """The real embedder, counting how many texts it encoded."""

    def __init__(self, inner):
        self.inner, self.name, self.texts = inner, inner.name, 0

    def encode(self, texts):
        self.texts += len(texts)
        return self.inner.encode(texts)


@pytest.mark.parametrize("hybrid", [False, True])
def test_vectors_path_equals_text_path(ray_cluster, tiny_snapshot, embedder, hybrid):
    cfg = RetrievalConfig(service_name=f"api-vectors-{hybrid}", hybrid=HybridConfig(enabled=hybrid, depth=20))
    start_service(str(tiny_snapshot), cfg)
    try:
        counting = CountingEmbedder(embedder)
        r = ShardedRetriever(cfg, embedder=counting)
        assert isinstance(r, Retriever)
        qs = [
            "What is the IATA code of Farah Airport?",
            "Which city does RAF Leuchars serve?",
            "airport serving Detroit Michigan",
        ]
        text = r.retrieve(qs, 4)
        assert counting.texts == len(qs)
        if hybrid:  # fused ranks have no dense score to carry
            assert not any("score" in p for ps in text for p in ps)
        else:  # each dense passage carries its score, best first (evaluation's p(passage | question))
            got = [[p["score"] for p in ps] for ps in text]
            np.testing.assert_allclose(np.array(got), r.search(embedder.encode(qs), 4).scores, atol=1e-5)
            assert all(g == sorted(g, reverse=True) for g in got)
        hits = r.stats["cache_hits"]
        vecs = embedder.encode(qs)
        assert r.retrieve(qs, 4, vectors=vecs) == text
        assert counting.texts == len(qs) and r.stats["cache_hits"] == hits  # no embedding, no cache
        # Other vectors for the same texts are answered for those vectors, never from the cache
        # (hybrid: BM25 still reads the texts, so only the dense half follows the vectors).
        other = embedder.encode(["Ngau Airport ICAO code"] * len(qs))
        moved = r.retrieve(qs, 4, vectors=other)
        assert moved != text
        if not hybrid:
            assert moved == r.retrieve(["Ngau Airport ICAO code"] * len(qs), 4) == r.search(other, 4).passages
        with pytest.raises(RetrievalError, match="one row per question"):
            r.retrieve(qs, 4, vectors=vecs[:2])
    finally:
        stop_service(cfg)


def test_index_view_is_a_retriever(ray_cluster, tiny_snapshot, embedder):
    from ragdist.index.snapshot import read_manifest
    from ragdist.joint.refresh import IndexView, ServedVersion

    cfg = RetrievalConfig(service_name="api-view", cache_size=0)
    start_service(str(tiny_snapshot), cfg)
    try:
        served = ServedVersion(0, read_manifest(tiny_snapshot)["version"], str(tiny_snapshot), 0)
        view = IndexView(cfg, served)
        assert isinstance(view, Retriever) and view.version == served.version
        qs = ["What is the IATA code of Farah Airport?", "Which city does RAF Leuchars serve?"]
        vecs = embedder.encode(qs)
        res = view.search(vecs, 3)
        assert view.retrieve(qs, 3, vectors=vecs) == res.passages and res.version == served.version
    finally:
        stop_service(cfg)


def test_merge_equals_faiss_result_heap():
    rng = np.random.default_rng(0)
    nq, k = 7, 10
    for keep_max in (True, False):
        parts = []
        for s, n in enumerate((10, 4, 10)):  # one shard with fewer than k rows (-1 padded)
            D = rng.standard_normal((nq, n)).astype(np.float32)
            D = -np.sort(-D, axis=1) if keep_max else np.sort(D, axis=1)
            ids = rng.permutation(1000)[: nq * n].reshape(nq, n).astype(np.int64) + 1000 * s
            parts.append((D, ids))
        heap = faiss.ResultHeap(nq, k, keep_max=keep_max)
        for D, ids in parts:
            heap.add_result(D, ids)
        heap.finalize()
        D, ids = merge_topk(parts, k, keep_max, nq)
        np.testing.assert_array_equal(ids, heap.I)
        np.testing.assert_array_equal(D, heap.D)


def test_local_cluster_listens_on_loopback_only(ray_cluster):
    """Every listening socket of the cluster this session started (GCS, raylet, workers) is on 127.0.0.1."""
    import psutil

    if not ray_cluster.startswith("127.0.0.1:") or os.environ.get("RAGDIST_EXTERNAL_RAY"):
        pytest.skip("attached to a cluster this session did not start")
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    names = {p.name() for p in procs if p.is_running()}
    assert {"gcs_server", "raylet"} <= names, names
    listening = [
        c.laddr
        for p in procs
        if p.is_running()
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and {a.ip for a in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_loopback_cluster_refused_when_ray_was_imported_first():
    """Ray read its loopback switch at import: a local cluster would listen everywhere, so none starts."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    }
    code = "import ray\nfrom ragdist.retrieval.cluster import init_ray\ninit_ray(num_cpus=1)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in proc.stderr
