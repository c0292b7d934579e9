"""Faults and bad input on a real Ray cluster: killed replicas, a dead shard, corrupted snapshots."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from ragdist.data.corpus import Chunk
from ragdist.errors import RetrievalError
from ragdist.index import snapshot as snap
from ragdist.index.builder import IndexConfig, build_snapshot
from ragdist.retrieval.client import RetrievalClient, RetrievalConfig, start_service, stop_service

DIM = 32


def corpus(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [Chunk(id=f"c{i}", doc_id=f"d{i}", text=f"text {i}") for i in range(n)], x


def queries(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def pid_of(handle, timeout: float = 30.0) -> int:
    import ray

    return ray.get(handle.info.remote(), timeout=timeout)["pid"]


def wait_restarted(handle, old_pid: int, limit_s: float = 60.0) -> int:
    """Bounded wait until Ray has restarted the actor (a new process answers)."""
    import ray

    end = time.time() + limit_s
    while time.time() < end:
        try:
            pid = pid_of(handle, timeout=5)
            if pid != old_pid:
                return pid
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"actor was not restarted within {limit_s}s")


@pytest.fixture(scope="module")
def replicated(ray_cluster, tmp_path_factory):
    chunks, x = corpus(3000)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path_factory.mktemp("rep"))),
                          embedder_name="rand")
    cfg = RetrievalConfig(service_name="faults-replicated", replicas=2, attempt_timeout_s=5, timeout_s=30)
    start_service(str(path), cfg)
    yield cfg, x
    stop_service(cfg)


def test_replicas_share_the_load(replicated):
    cfg, _ = replicated
    client = RetrievalClient(cfg)
    for i in range(8):
        client.search(queries(4, i), 5)
    info = client.metrics(replicas=True)["replicas"]
    assert len(info) == 4 and all(r["alive"] for r in info)
    for shard in (0, 1):
        calls = [r["calls"] for r in info if r["shard"] == shard]
        assert len(calls) == 2 and min(calls) >= 1, calls  # both replicas of each shard served


def test_kill_one_replica_mid_stream(replicated):
    import ray

    cfg, x = replicated
    client = RetrievalClient(cfg)
    stream = [queries(8, 100 + i) for i in range(150)]
    expected = [client.search(q, 5, passages=False).ids for q in stream]  # the no-fault run
    got, errors = [], []

    def run():
        for q in stream:
            try:
                got.append(client.search(q, 5, passages=False))
            except Exception as e:  # noqa: BLE001 - any failure fails the test below
                errors.append(e)

    victim = client.views[client.primary]["replicas"][1][0]
    old = pid_of(victim)
    th = threading.Thread(target=run)
    th.start()
    end = time.time() + 30
    while len(got) < 20 and time.time() < end and th.is_alive():
        time.sleep(0.005)
    ray.kill(victim, no_restart=False)
    th.join(120)
    assert not th.is_alive()
    assert not errors, errors[:1]
    assert len(got) == len(stream)
    assert not any(r.partial for r in got)
    for r, want in zip(got, expected):
        np.testing.assert_array_equal(r.ids, want)
    # Ray restarted the replica; it reloaded its shard and answers the same as before.
    wait_restarted(victim, old)
    for i, q in enumerate(stream[:10]):
        np.testing.assert_array_equal(client.search(q, 5, passages=False).ids, expected[i])
    assert client.metrics(replicas=True)["replicas"][2]["alive"]


@pytest.fixture(scope="module")
def single(ray_cluster, tmp_path_factory):
    chunks, x = corpus(2000, seed=3)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path_factory.mktemp("single"))),
                          embedder_name="rand")
    cfg = RetrievalConfig(service_name="faults-single", replicas=1)
    start_service(str(path), cfg)
    yield cfg, x, path
    stop_service(cfg)


def _kill_and_query(client, q, victim, attempts: int = 6):
    """Kill the shard's only replica and query at once; retried if Ray restarted it faster than the timeout."""
    import ray

    for _ in range(attempts):
        old = pid_of(victim)
        ray.kill(victim, no_restart=False)
        time.sleep(0.05)
        try:
            res = client.search(q, 5)
        except RetrievalError as e:
            return old, e
        if res.partial:
            return old, res
        wait_restarted(victim, old)
    raise AssertionError("the killed replica came back before the attempt timeout every time")


@pytest.mark.parametrize("mode", ["partial", "raise"])
def test_kill_only_replica(single, mode):
    import faiss

    cfg, x, _ = single
    fast = RetrievalConfig(service_name=cfg.service_name, on_shard_down=mode, attempt_timeout_s=0.5, timeout_s=2)
    client = RetrievalClient(fast)
    q = queries(6, 7)
    full = client.search(q, 5)
    assert not full.partial
    victim = client.views[client.primary]["replicas"][1][0]
    old, out = _kill_and_query(client, q, victim)
    if mode == "partial":
        assert not isinstance(out, Exception), out
        # (on a very busy machine the healthy shard may miss the short attempt timeout too)
        assert out.partial and 1 in out.missing_shards
        assert client.last_partial and client.metrics()["partial_results"] >= 1
        # Flagged, and exactly the merge of the shards that answered (shard 0 holds rows 0..999).
        answered = [i for s in (0, 1) if s not in out.missing_shards for i in range(s * 1000, (s + 1) * 1000)]
        ref = faiss.IndexFlatIP(DIM)
        ref.add(x[answered])
        want = np.array(answered)[ref.search(q, 5)[1]] if answered else np.full((len(q), 5), -1)
        np.testing.assert_array_equal(out.ids, want)
    else:
        assert isinstance(out, RetrievalError), out
        assert re.search(r"shard\(s\) \[(\d+, )*1\]", str(out)), str(out)
    # Recovery: Ray restarts the actor, it reloads the shard, full results come back.
    wait_restarted(victim, old)
    end = time.time() + 30
    while True:
        try:
            res = client.search(q, 5)
            if not res.partial:
                break
        except RetrievalError:
            pass
        assert time.time() < end, "no recovery after restart"
        time.sleep(0.2)
    np.testing.assert_array_equal(res.ids, full.ids)


def test_corrupted_snapshot_keeps_previous_version_serving(single, tmp_path):
    cfg, x, path = single
    client = RetrievalClient(cfg)
    before = client.search(queries(3, 9), 5)
    chunks, y = corpus(2000, seed=4)
    bad = build_snapshot(chunks, y, IndexConfig(num_shards=2, root=str(tmp_path)), embedder_name="rand")
    m = snap.read_manifest(bad)
    f = bad / m["shards"][1]["index"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RetrievalError, match="checksum mismatch"):
        client.load_version(str(bad), primary=True)
    assert client.versions()["primary"] == path.name and list(client.versions()["versions"]) == [path.name]
    np.testing.assert_array_equal(client.search(queries(3, 9), 5).ids, before.ids)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda c: c.search(queries(2, 0)[:, :7], 3), f"dim {DIM}"),
        (lambda c: c.search(np.full((1, DIM), np.nan, np.float32), 3), "NaN"),
        (lambda c: c.search(queries(1, 0), 0), "positive"),
        (lambda c: c.search(queries(1, 0), -1), "positive"),
        (lambda c: c.search(queries(1, 0), 2.5), "positive"),
        (lambda c: c.search(queries(1, 0), True), "positive"),
        (lambda c: c.search(queries(1, 0), 3, version="v-nope"), "unknown index version 'v-nope'"),
        (lambda c: c.promote("v-nope"), "unknown index version 'v-nope'"),
        (lambda c: c.set_canary("v-nope", 0.5), "unknown index version 'v-nope'"),
        (lambda c: c.search(queries(1, 0), 3, filter={"timestamp": [5, 1]}), "empty range"),
        (lambda c: c.search(queries(1, 0), 3, filter={"source": {"x": 1}}), "filter key 'source'"),
        (lambda c: c.search(queries(1, 0), 3, filter="source=x"), "filter must be a dict"),
        (lambda c: c.upsert([Chunk(id="n", doc_id="n", text="t")], queries(1, 0)[:, :5]), "expected \\(1, 32\\)"),
        (lambda c: c.upsert([{"id": "", "doc_id": "n", "text": "t"}], queries(1, 0)), "no string 'id'"),
        (lambda c: c.rollback(), "nothing to roll back"),
    ],
)
def test_bad_input_is_a_clear_error(single, call, match):
    cfg, _, _ = single
    with pytest.raises(RetrievalError, match=match):
        call(RetrievalClient(cfg))


def test_k_beyond_corpus(single):
    cfg, _, _ = single
    strict = RetrievalClient(RetrievalConfig(service_name=cfg.service_name, k_beyond_corpus="error"))
    with pytest.raises(RetrievalError, match="k=2001 exceeds the 2000 passages"):
        strict.search(queries(1, 0), 2001)
    padded = RetrievalClient(cfg).search(queries(1, 0), 2003, passages=False)
    assert (padded.ids[0, :2000] >= 0).all() and (padded.ids[0, 2000:] == -1).all()
