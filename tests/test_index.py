import json
import os

import numpy as np
import pytest

from ragdist.errors import ConfigError, IndexError_
from ragdist.index import snapshot as snap
from ragdist.index.builder import IndexConfig, assign_shards, build_snapshot
from ragdist.retrieval.server.shard import ShardServer


def test_snapshot_layout_and_manifest(tiny_snapshot, tiny_chunks):
    m = snap.read_manifest(tiny_snapshot)
    assert m["num_shards"] == 2 and m["dim"] == 384 and m["factory"] == "Flat"
    assert sum(s["count"] for s in m["shards"]) == len(tiny_chunks) == m["num_chunks"]
    for name in m["files"]:
        snap.verify_file(tiny_snapshot, m, name)
    assert (tiny_snapshot.parent / "LATEST").read_text().strip() == tiny_snapshot.name
    assert snap.resolve(tiny_snapshot.parent) == tiny_snapshot
    assert not [p for p in tiny_snapshot.parent.iterdir() if p.name.startswith(".tmp-")]


def test_failed_build_leaves_nothing(tmp_path, tiny_chunks, tiny_vectors):
    bad = tiny_vectors.copy()
    bad[3, 0] = np.nan
    with pytest.raises(IndexError_, match="NaN"):
        build_snapshot(tiny_chunks, bad, IndexConfig(root=str(tmp_path)), embedder_name="e")
    with pytest.raises(ConfigError, match="factory"):
        build_snapshot(tiny_chunks, tiny_vectors, IndexConfig(root=str(tmp_path), factory="Nope12"), embedder_name="e")
    assert list(tmp_path.iterdir()) == [] or all(not p.name.startswith((".tmp-", "v")) for p in tmp_path.iterdir())


def test_crash_mid_write_leaves_no_trusted_snapshot(tmp_path):
    with pytest.raises(RuntimeError):
        with snap.SnapshotWriter(tmp_path) as w:
            w.path("shard_0000.faiss").write_bytes(b"partial")
            raise RuntimeError("killed")
    assert snap.list_versions(tmp_path) == []
    with pytest.raises(IndexError_, match="no index snapshot"):
        snap.resolve(tmp_path)


def test_corrupted_file_detected(tmp_path, tiny_chunks, tiny_vectors):
    path = build_snapshot(tiny_chunks, tiny_vectors, IndexConfig(root=str(tmp_path)), embedder_name="e")
    m = snap.read_manifest(path)
    f = path / m["shards"][0]["index"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IndexError_, match="checksum mismatch"):
        ShardServer(str(path), 0)


def test_manifest_paths_cannot_escape(tmp_path, tiny_chunks, tiny_vectors):
    path = build_snapshot(tiny_chunks, tiny_vectors, IndexConfig(root=str(tmp_path)), embedder_name="e")
    mpath = path / snap.MANIFEST
    m = json.loads(mpath.read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0", "bytes": 1}
    mpath.write_text(json.dumps(m))
    with pytest.raises(IndexError_, match="not a plain file name"):
        snap.read_manifest(path)


def test_unknown_version(tiny_snapshot):
    with pytest.raises(IndexError_, match="unknown snapshot version"):
        snap.resolve(tiny_snapshot.parent, "v0-nope")


def test_hash_sharding_keeps_documents_together(tiny_chunks):
    shards = assign_shards(tiny_chunks, 3, "hash")
    owner = {}
    for s, rows in enumerate(shards):
        for r in rows:
            assert owner.setdefault(tiny_chunks[r].doc_id, s) == s
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(tiny_chunks)))


def test_too_many_shards(tiny_chunks):
    with pytest.raises(ConfigError, match="more shards"):
        assign_shards(tiny_chunks, len(tiny_chunks) + 1, "contiguous")


def test_ivf_snapshot_builds(tmp_path, tiny_chunks, tiny_vectors):
    path = build_snapshot(
        tiny_chunks, tiny_vectors, IndexConfig(root=str(tmp_path), factory="IVF4,Flat", num_shards=2), embedder_name="e"
    )
    s = ShardServer(str(path), 1)
    D, G, rows = s.search(tiny_vectors[-3:], 2)
    assert G.shape == (3, 2) and len(rows) == 3
    assert os.path.isdir(path)
