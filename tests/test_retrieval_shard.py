"""One shard in-process (no Ray): search backends, filters, deletes, update epochs, BM25."""

from __future__ import annotations

import numpy as np
import pytest

from ragdist.data.corpus import Chunk
from ragdist.errors import ConfigError, RetrievalError
from ragdist.index.builder import IndexConfig, build_snapshot
from ragdist.retrieval.server.filters import compile_filter
from ragdist.retrieval.server.lexical import LexicalIndex
from ragdist.retrieval.server.shard import PAD_SCORE, ShardServer, calibrate

DIM = 32
N = 3000


def meta_corpus(n: int = N, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = [
        Chunk(
            id=f"c{i}",
            doc_id=f"d{i // 2}",
            text=f"passage {i}",
            source=("wiki", "news", "forum")[i % 3],
            timestamp=float(i) if i % 10 else None,
            meta={"domain": "aero" if i % 50 == 0 else "misc", "tags": [f"t{i % 7}", "even" if i % 2 == 0 else "odd"],
                  "rank": i % 4},
        )
        for i in range(n)
    ]
    return chunks, x


def matches(c: Chunk, spec: dict) -> bool:
    """The filter semantics written out row by row: the reference for the vectorised masks."""
    for key, cond in spec.items():
        if key == "timestamp":
            if c.timestamp is None:
                return False
            lo, hi = cond if isinstance(cond, list) else (cond.get("gte"), cond.get("lte"))
            if (lo is not None and c.timestamp < lo) or (hi is not None and c.timestamp > hi):
                return False
        elif key == "tags":
            tags = c.meta.get("tags", [])
            if isinstance(cond, dict):
                if not all(t in tags for t in cond["all"]):
                    return False
            elif not any(t in tags for t in cond):
                return False
        else:
            name = key[5:] if key.startswith("meta.") else key
            val = getattr(c, name) if name in ("id", "doc_id", "source", "title") else c.meta.get(name, object())
            if val not in (cond if isinstance(cond, list) else [cond]):
                return False
    return True


def brute(x: np.ndarray, rows: list[int], q: np.ndarray, k: int) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    out = np.full((len(q), k), -1, np.int64)
    if len(rows):
        s = q @ x[rows].T
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        out[:, : top.shape[1]] = rows[top]
    return out


FILTERS = [
    {"source": "news"},
    {"domain": "aero"},  # 2% of rows: selective
    {"timestamp": [100, 160]},
    {"tags": ["t3"], "source": ["wiki", "forum"]},
    {"tags": {"all": ["t3", "even"]}},
    {"meta.domain": "aero", "timestamp": {"gte": 1000}},
    {"rank": 2.0},  # JSON numbers: 2.0 matches 2
    {"source": "nowhere"},
]


@pytest.fixture(scope="module")
def flat_snapshot(tmp_path_factory):
    chunks, x = meta_corpus()
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path_factory.mktemp("flat"))),
                          embedder_name="rand")
    return path, chunks, x


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_filters_return_exact_k(flat_snapshot, backend):
    path, chunks, x = flat_snapshot
    shard = ShardServer(str(path), 1, flat_backend=backend)
    own = list(range(N // 2, N))  # contiguous sharding: shard 1 holds the second half
    q = np.random.default_rng(5).standard_normal((6, DIM)).astype(np.float32)
    for spec in FILTERS:
        rows = [i for i in own if matches(chunks[i], spec)]
        got = shard.query(q, 10, filter=spec)
        want = brute(x, rows, q, 10)
        np.testing.assert_array_equal(got["G"], want, err_msg=str(spec))
        assert ((got["G"] >= 0).sum(axis=1) == min(10, len(rows))).all()
        assert all(matches(chunks[int(g)], spec) for g in got["G"].ravel() if g >= 0)
        assert all(p["id"] == chunks[g].id for g, p in got["payload"].items())
    empty = shard.query(q, 4, filter={"source": "nowhere"})
    assert (empty["G"] == -1).all() and (empty["D"] == PAD_SCORE).all()


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_deletes_and_epochs(flat_snapshot, backend):
    path, chunks, x = flat_snapshot
    shard = ShardServer(str(path), 0, flat_backend=backend)
    q = x[:3] + 0.01
    before = shard.query(q, 10)
    assert before["epoch"] == 0
    top = [chunks[int(g)].id for g in before["G"][:, :3].ravel()]
    shard.apply(1, {"delete_ids": top})
    new = np.ascontiguousarray(q[:1] / np.linalg.norm(q[:1]))
    shard.apply(2, {"add": {"gids": np.array([N]), "vectors": new,
                            "rows": [{"id": "fresh", "doc_id": "fresh", "text": "new", "meta": {"domain": "aero"}}]}})
    keep = [i for i in range(N // 2) if chunks[i].id not in top]
    # Epoch 1: the deleted rows are gone and every query still gets 10 results.
    at1 = shard.query(q, 10, epoch=1)
    np.testing.assert_array_equal(at1["G"], brute(x, keep, q, 10))
    # Epoch 2: the added row is the best match of query 0; epoch 0 is still readable as it was.
    at2 = shard.query(q, 10)
    assert at2["epoch"] == 2 and at2["G"][0, 0] == N and at2["payload"][N]["id"] == "fresh"
    np.testing.assert_array_equal(shard.query(q, 10, epoch=0)["G"], before["G"])
    # Filters see appended rows too.
    aero = shard.query(q, 3, filter={"domain": "aero"})
    assert aero["G"][0, 0] == N
    # Many deletes: the masked search switches strategy but stays exact.
    many = [chunks[i].id for i in range(0, N // 2, 3)]
    shard.apply(3, {"delete_ids": many})
    keep3 = [i for i in keep if chunks[i].id not in set(many)]
    got = shard.query(q[1:], 10)
    np.testing.assert_array_equal(got["G"], brute(x, keep3, q[1:], 10))
    # Replays are idempotent; a gap without an update log is a clear error.
    assert shard.apply(2, {"delete_ids": ["c5"]}) == 3
    with pytest.raises(RetrievalError, match="no update log"):
        shard.apply(9, {})


def test_ivf_and_hnsw_filter_with_id_selectors(tmp_path):
    chunks, x = meta_corpus(2000, seed=2)
    q = np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float32)
    for factory, params in (("IVF8,Flat", {"nprobe": 8}), ("HNSW16", {"efsearch": 400})):
        path = build_snapshot(chunks, x, IndexConfig(num_shards=1, root=str(tmp_path / factory), factory=factory),
                              embedder_name="rand")
        shard = ShardServer(str(path), 0, **params)
        spec = {"domain": "aero"}
        got = shard.query(q, 5, filter=spec)
        assert shard.backends["faiss"].selectors
        rows = [i for i in range(2000) if matches(chunks[i], spec)]
        np.testing.assert_array_equal(got["G"], brute(x, rows, q, 5))


def test_pq_filter_deepens_when_selectors_are_unsupported(tmp_path):
    chunks, x = meta_corpus(2000, seed=3)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=1, root=str(tmp_path), factory="PQ4x4"), embedder_name="r")
    shard = ShardServer(str(path), 0)
    q = np.random.default_rng(2).standard_normal((3, DIM)).astype(np.float32)
    got = shard.query(q, 10, filter={"tags": {"all": ["t1", "odd"]}})
    assert not shard.backends["faiss"].selectors  # IndexPQ refuses id selectors: over-fetch and deepen
    assert ((got["G"] >= 0).sum(axis=1) == 10).all()
    assert all(matches(chunks[int(g)], {"tags": {"all": ["t1", "odd"]}}) for g in got["G"].ravel())


def test_auto_backend_is_measured(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, DIM)).astype(np.float32)
    choice, info = calibrate(x, "fp32", "cpu", threads=1)
    assert set(choice) == {"small", "medium", "large"}
    assert set(choice.values()) <= {"faiss", "torch", "torch/256"}
    for cls in choice:
        qps = info["qps"][cls]
        assert choice[cls] == max(qps, key=qps.get) and all(v > 0 for v in qps.values())
    assert "torch/256" in info["qps"]["large"] and "torch/256" not in info["qps"]["small"]
    chunks = [Chunk(id=f"c{i}", doc_id=f"d{i}", text="t") for i in range(5000)]
    path = build_snapshot(chunks, x, IndexConfig(num_shards=1, root=str(tmp_path)), embedder_name="r")
    shard = ShardServer(str(path), 0, flat_backend="auto")
    assert shard.calibration["rows"] == 5000
    assert set(shard.backends) == {c.partition("/")[0] for c in shard.choice.values()}
    import faiss

    ref = faiss.IndexFlatIP(DIM)
    ref.add(x)
    for nq in (8, 100, 700):
        q = rng.standard_normal((nq, DIM)).astype(np.float32)
        np.testing.assert_array_equal(shard.query(q, 7)["G"], ref.search(q, 7)[1])
    torch_shard = ShardServer(str(path), 0, flat_backend="torch")
    q = rng.standard_normal((600, DIM)).astype(np.float32)
    whole = torch_shard.backends["torch"].search(q, 7, None)
    split = torch_shard.backends["torch"].search(q, 7, None, query_block=256)
    np.testing.assert_array_equal(whole[1], split[1])
    np.testing.assert_array_equal(whole[1], ref.search(q, 7)[1])


def test_torch_backend_needs_flat_ip(tmp_path):
    chunks, x = meta_corpus(500)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=1, root=str(tmp_path), factory="IVF4,Flat"),
                          embedder_name="r")
    with pytest.raises(ConfigError, match="flat_backend=torch needs a Flat inner-product index"):
        ShardServer(str(path), 0, flat_backend="torch")
    with pytest.raises(ConfigError, match="flat_backend='fast'"):
        ShardServer(str(path), 0, flat_backend="fast")


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"timestamp": [1]}, "expected \\[start, end\\]"),
        ({"timestamp": {"after": 3}}, "unknown bound"),
        ({"timestamp": {"gt": 1, "gte": 2}}, "one lower and one upper"),
        ({"timestamp": ["a", 3]}, "not a finite number"),
        ({"tags": {"some": ["x"]}}, "expected a list"),
        ({"source": []}, "empty list"),
        ({"meta.": 1}, "no meta field"),
        ({"domain": float("nan")}, "not a finite number"),
    ],
)
def test_bad_filters(spec, match):
    with pytest.raises(RetrievalError, match=match):
        compile_filter(spec)


def test_bm25_ranks_term_matches_and_honours_masks():
    texts = ["the airport of farah is small", "detroit metro airport", "a river in farah province", "nothing here"]
    lex = LexicalIndex(texts)
    scores, rows = lex.search(["farah airport", "zebra"], 4)
    assert rows[0, 0] == 0 and set(rows[0, :3]) == {0, 1, 2} and rows[0, 3] == -1  # row 3 shares no term
    assert (rows[1] == -1).all() and np.isneginf(scores[1]).all()
    masked = lex.search(["farah airport"], 4, mask=np.array([False, True, True, True]))[1]
    assert 0 not in masked[0] and masked[0, 0] in (1, 2)
