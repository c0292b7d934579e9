"""Snapshots: recall of approximate indexes in the manifest, reshard N->M without re-embedding, restore."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from ragdist.data.corpus import Chunk
from ragdist.errors import IndexError_
from ragdist.index import snapshot as snap
from ragdist.index.builder import IndexConfig, build_snapshot, sharded_search
from ragdist.index.reader import read_shard_index, read_shard_rows, read_shard_vectors
from ragdist.index.reshard import reshard

DIM = 32


def corpus(n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Clustered data, so that an IVF index has structure to exploit.
    centers = rng.standard_normal((20, DIM)).astype(np.float32)
    x = centers[rng.integers(0, 20, n)] + 1.0 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = [Chunk(id=f"d{i // 3}#{i % 3}", doc_id=f"d{i // 3}", text=f"t{i}", meta={"i": i}) for i in range(n)]
    return chunks, x


def load(path):
    m = snap.read_manifest(path)
    idx = [read_shard_index(path, m, s) for s in range(m["num_shards"])]
    rows = [read_shard_rows(path, m, s) for s in range(m["num_shards"])]
    return m, idx, [g for g, _ in rows], rows


def test_reshard_flat_keeps_ids_rows_and_results(tmp_path):
    chunks, x = corpus()
    src = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path)), embedder_name="e",
                         extra={"key": "abc"})
    assert "recall" not in snap.read_manifest(src)  # exact index: nothing to measure
    q = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    ref = faiss.IndexFlatIP(DIM)
    ref.add(x)
    want = ref.search(q, 10)[1]
    for m_shards, strategy in ((3, "hash"), (1, "contiguous"), (4, "contiguous")):
        out = reshard(src, m_shards, sharding=strategy)
        m, idx, gids, rows = load(out)
        assert m["num_shards"] == m_shards and m["sharding"] == strategy and m["num_chunks"] == len(chunks)
        assert m["resharded_from"] == {"version": src.name, "num_shards": 2} and "key" not in m
        assert m["embedder"] == "e" and snap.resolve(tmp_path) == out
        np.testing.assert_array_equal(sharded_search(idx, gids, q, 10, "ip")[1], want)
        for g, (_, cols) in zip(gids, rows):
            for gid, cid, meta in zip(g, cols["id"], cols["meta"]):
                assert cid == chunks[gid].id and meta == {"i": int(gid)}
            vecs = np.concatenate([read_shard_vectors(out, m, s) for s in range(m_shards)])
        np.testing.assert_array_equal(np.sort(np.concatenate(gids)), np.arange(len(chunks)))
        if strategy == "hash":  # documents stay whole
            owner = {}
            for s, (_, cols) in enumerate(rows):
                for d in cols["doc_id"]:
                    assert owner.setdefault(d, s) == s
    # The vectors came out of the shards bit for bit: no re-embedding.
    np.testing.assert_array_equal(vecs[np.argsort(np.concatenate(gids))], x)


def test_ivf_recall_in_manifest_and_reshard_reuses_the_quantizer(tmp_path):
    chunks, x = corpus()
    cfg = IndexConfig(num_shards=2, root=str(tmp_path), factory="IVF16,Flat", nprobe=1, recall_queries=100,
                      train_sample=1000)
    src = build_snapshot(chunks, x, cfg, embedder_name="e")
    rec = snap.read_manifest(src)["recall"]
    assert rec["k"] == 10 and rec["queries"] == 100 and 0.3 < rec["recall"] < 1.0
    assert len(rec["query_gids"]) == 100
    # Held out of quantizer training when the corpus allows it.
    train = np.sort(np.random.default_rng(0).choice(len(x), 1000, replace=False))
    assert not set(rec["query_gids"]) & set(train.tolist())
    # Higher nprobe → higher recall: the figure measures the index, not noise.
    better = build_snapshot(chunks, x, IndexConfig(**{**cfg.__dict__, "nprobe": 16}), embedder_name="e")
    assert snap.read_manifest(better)["recall"]["recall"] == pytest.approx(1.0)
    out = reshard(src, 3)
    m, idx, gids, _ = load(out)
    first = read_shard_index(src, snap.read_manifest(src), 0)  # keep it alive while its quantizer is read
    c0 = faiss.extract_index_ivf(first).quantizer.reconstruct_n(0, 16)
    for ix in idx:
        np.testing.assert_array_equal(faiss.extract_index_ivf(ix).quantizer.reconstruct_n(0, 16), c0)
    assert m["recall"]["query_gids"] == rec["query_gids"] and 0.3 < m["recall"]["recall"] <= 1.0
    assert m["search"] == {"nprobe": 1, "efsearch": 64}


def test_lossy_index_keeps_vectors_for_resharding(tmp_path):
    chunks, x = corpus(1500)
    q = x[:5]
    pq = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path / "a"), factory="IVF8,PQ4x4",
                                               recall_queries=50), embedder_name="e")
    m = snap.read_manifest(pq)
    assert all(s["vectors"].endswith(".npy") and s["vectors"] in m["files"] for s in m["shards"])
    out = reshard(pq, 3)
    m2, idx, gids, _ = load(out)
    vecs = np.concatenate([read_shard_vectors(out, m2, s) for s in range(3)])
    np.testing.assert_array_equal(vecs[np.argsort(np.concatenate(gids))], x)
    assert sharded_search(idx, gids, q, 5, "ip")[1].shape == (5, 5)
    never = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path / "b"), factory="IVF8,PQ4x4",
                                                  store_vectors="never", recall_queries=0), embedder_name="e")
    with pytest.raises(IndexError_, match="stores lossy codes and no vectors"):
        reshard(never, 3)


def test_vectors_file_cannot_smuggle_a_pickle(tmp_path):
    chunks, x = corpus(300)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=1, root=str(tmp_path), store_vectors="always"),
                          embedder_name="e")
    m = snap.read_manifest(path)
    name = m["shards"][0]["vectors"]
    np.save(path / name, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(IndexError_, match="checksum mismatch"):
        read_shard_vectors(path, m, 0)
    # Even with a matching checksum (a forged manifest), nothing is unpickled.
    from ragdist.data.corpus import file_digest

    m["files"][name] = {"sha256": file_digest(path / name), "bytes": (path / name).stat().st_size}
    (path / snap.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(IndexError_, match="not a plain float32 .npy"):
        read_shard_vectors(path, snap.read_manifest(path), 0)


def test_restore_an_older_version(tmp_path):
    chunks, x = corpus(300)
    a = build_snapshot(chunks, x, IndexConfig(num_shards=1, root=str(tmp_path)), embedder_name="e")
    b = reshard(a, 2)
    assert snap.resolve(tmp_path) == b
    assert snap.restore(tmp_path, a.name) == a and snap.resolve(tmp_path) == a
    f = b / snap.read_manifest(b)["shards"][0]["meta"]
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(IndexError_, match="checksum mismatch"):
        snap.restore(tmp_path, b.name)
    assert snap.resolve(tmp_path) == a  # a failed restore changes nothing
    with pytest.raises(IndexError_, match="unknown snapshot version"):
        snap.restore(tmp_path, "v-missing")


def test_explicit_recall_queries(tmp_path):
    chunks, x = corpus(1000)
    q = np.random.default_rng(3).standard_normal((40, DIM)).astype(np.float32)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path), factory="HNSW8", efsearch=8),
                          embedder_name="e", recall_queries=q)
    rec = snap.read_manifest(path)["recall"]
    assert rec["queries"] == 40 and rec["query_gids"] == [] and 0.0 < rec["recall"] <= 1.0


@pytest.mark.parametrize("factory", ["SQ8", "HNSW8", "IVF8,PQ4x4", "IVF8,SQ8", "PCA16,IVF8,Flat"])
def test_any_factory_builds_serves_and_reports_recall(tmp_path, factory):
    from ragdist.retrieval.server.shard import ShardServer

    chunks, x = corpus(1000)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path), factory=factory, recall_queries=50),
                          embedder_name="e")
    rec = snap.read_manifest(path)["recall"]
    assert rec["queries"] == 50 and 0.0 < rec["recall"] <= 1.0
    got = ShardServer(str(path), 1).query(x[-4:], 5)
    assert got["G"].shape == (4, 5) and (got["G"] >= 0).all()
