"""A controller that survives: killed during a stream of queries and updates, restarted by Ray, its state
recovered from the durable files in the snapshot root; retried admin calls act once; the update log folded
into a new snapshot past `compact_log_rows`; replicas leave when their controller is gone for good."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ragdist.data.corpus import Chunk
from ragdist.index.builder import IndexConfig, build_snapshot
from ragdist.index.snapshot import read_manifest
from ragdist.retrieval.admin import ServiceAdmin, start_service, state_dir_of, stop_service
from ragdist.retrieval.client import RetrievalClient, RetrievalConfig
from tests.conftest import ROOT

DIM = 32


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def corpus(n: int, seed: int):
    return [Chunk(id=f"c{i}", doc_id=f"d{i}", text=f"text {i}") for i in range(n)], unit(np.random.default_rng(seed), n)


def kill_and_wait(ctl) -> float:
    """Kill the controller (Ray restarts it); seconds until the new one answers."""
    import ray

    t0 = time.perf_counter()
    ray.kill(ctl, no_restart=False)
    time.sleep(0.2)  # the kill lands before the ping below is sent
    ray.get(ctl.ping.remote(), timeout=120)  # queued by Ray until the restarted controller is up
    return time.perf_counter() - t0


def top1(client: RetrievalClient, vecs: np.ndarray) -> list[str]:
    res = client.search(vecs, 1)
    return [row[0]["id"] if row else "" for row in res.passages]


@pytest.fixture()
def service(ray_cluster, tmp_path, request):
    chunks, x = corpus(2000, seed=11)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path / "idx")), embedder_name="rand")
    kw = getattr(request, "param", {})
    cfg = RetrievalConfig(service_name=f"ctl-{request.node.name[:20]}", replicas=1, attempt_timeout_s=5,
                          timeout_s=60, **kw)  # fmt: skip
    ctl = start_service(str(path), cfg)
    yield cfg, ctl, path, x
    stop_service(cfg)


def test_killed_during_queries_and_updates(service):
    """Three kills mid-stream (one during an update): no update lost or applied twice, no query failed,
    and the readers never called the controller."""
    import ray

    cfg, ctl, path, x = service
    reader = RetrievalClient(cfg)
    writer = ServiceAdmin(cfg)
    rng = np.random.default_rng(5)
    n_updates, per = 30, 2
    new_vecs = unit(rng, n_updates * per)
    stream = [unit(rng, 8) for _ in range(40)]
    calls0 = reader.view.controller_calls
    done = threading.Event()
    answered, failures, results, recover_s = [0], [], [], []

    def read() -> None:
        i = 0
        while not done.is_set() and i < 5000:
            try:
                reader.search(stream[i % len(stream)], 5, passages=False)
                answered[0] += 1
            except Exception as e:  # noqa: BLE001 - counted, asserted below
                failures.append(repr(e))
            i += 1

    def in_flight_kill(u: int) -> dict:
        """The call ServiceAdmin.update makes, with the controller killed right after it was sent."""
        rows = [{"id": f"u{u}-{j}", "doc_id": f"du{u}-{j}", "text": f"update {u}.{j}", "title": "", "source": "",
                 "timestamp": None, "meta": {}} for j in range(per)]  # fmt: skip
        ref = ctl.update.remote(None, rows, new_vecs[u * per:(u + 1) * per], [f"c{u}"], [], None, f"uid-{u}")
        t0 = time.perf_counter()
        ray.kill(ctl, no_restart=False)
        out = ray.get(ref, timeout=120)  # Ray re-sends it to the restarted controller
        recover_s.append(time.perf_counter() - t0)
        return out

    def write() -> None:
        for u in range(n_updates):
            if u == 25:
                results.append(in_flight_kill(u))
                continue
            chunks = [Chunk(id=f"u{u}-{j}", doc_id=f"du{u}-{j}", text=f"update {u}.{j}") for j in range(per)]
            results.append(writer.update(upsert=chunks, vectors=new_vecs[u * per:(u + 1) * per],
                                         delete_ids=[f"c{u}"]))  # fmt: skip
            if u in (9, 19):
                recover_s.append(kill_and_wait(ctl))  # the next update waits for the new controller

    readers = [threading.Thread(target=read)]
    for th in readers:
        th.start()
    t0 = time.perf_counter()
    write()
    elapsed = time.perf_counter() - t0
    done.set()
    for th in readers:
        th.join(120)

    # Every update applied once, in order: epochs 1..30 and nothing replayed as a second epoch.
    assert [r["epoch"] for r in results] == list(range(1, n_updates + 1)), results
    versions = writer.versions()["versions"]
    assert versions[path.name]["epoch"] == n_updates
    assert not failures, failures[:3]
    assert answered[0] > 0
    # The readers never needed the controller: nothing about the topology changed.
    assert reader.view.controller_calls == calls0, (calls0, reader.view.controller_calls)
    # Every upsert is served (its own vector finds it), every delete is honoured.
    assert top1(reader, new_vecs) == [f"u{u}-{j}" for u in range(n_updates) for j in range(per)]
    hits = reader.search(x[:n_updates], 3, passages=True).passages
    assert all(p["id"] != f"c{u}" for u, row in enumerate(hits) for p in row)
    # The durable log holds each epoch once; the restarted controller recovered what it had.
    rec = ray.get(ctl.recovery.remote())
    assert len(recover_s) == 3
    assert rec["versions"] == 1 and rec["epochs"][path.name] in (25, 26), rec  # killed during update 26
    state = json.loads((state_dir_of(path, cfg) / "state.json").read_text())
    nonce = state["versions"][path.name]["nonce"]
    assert len(list((state_dir_of(path, cfg) / "log" / nonce).glob("*.npz"))) == n_updates
    print(f"\ncontroller kill: updates sent {n_updates} applied {versions[path.name]['epoch']}, queries "
          f"{answered[0]} failed {len(failures)}, recovery_s {[round(s, 2) for s in recover_s]}, "
          f"stream {elapsed:.1f}s, reader controller calls {reader.view.controller_calls - calls0}")


def test_topology_survives_and_retried_calls_act_once(service, tmp_path):
    import ray

    cfg, ctl, path, x = service
    admin = RetrievalClient(cfg)
    chunks, y = corpus(2000, seed=12)
    other = build_snapshot(chunks, y, IndexConfig(num_shards=2, root=str(path.parent)), embedder_name="rand")
    vid = admin.load_version(str(other))
    admin.set_canary(vid, 0.25)
    before = admin.versions()
    gen_before = ray.get(ctl.state.remote())[0]
    kill_and_wait(ctl)
    after = ServiceAdmin(cfg).versions()
    assert after == before
    assert ray.get(ctl.state.remote())[0] == gen_before  # nothing changed, so clients need no refresh
    q = unit(np.random.default_rng(1), 4)
    np.testing.assert_array_equal(admin.search(q, 5, version=vid).ids, admin.search(q, 5, version=vid).ids)
    # Ray re-sends a call the dead controller was serving: the same request id acts once.
    first = ray.get(ctl.rollback.remote("rid-rollback"))
    again = ray.get(ctl.rollback.remote("rid-rollback"))
    assert first == again == path.name
    assert set(ServiceAdmin(cfg).versions()["versions"]) == {path.name}  # one rollback: the canary went
    row = {"id": "n1", "doc_id": "dn1", "text": "new", "title": "", "source": "", "timestamp": None, "meta": {}}
    v1 = unit(np.random.default_rng(2), 1)
    a = ray.get(ctl.update.remote(None, [row], v1, [], [], None, "uid-1"))
    b = ray.get(ctl.update.remote(None, [row], v1, [], [], None, "uid-1"))
    assert a["epoch"] == b["epoch"] == 1 and b.get("replayed")
    # ... also after a restart (the update id is in the durable log)
    kill_and_wait(ctl)
    c = ray.get(ctl.update.remote(None, [], None, ["c0"], [], None, "uid-1"))
    assert c["epoch"] == 1 and c.get("replayed")
    assert ray.get(ctl.state.remote())[1][path.name] == 1
    leftovers = [f for f in state_dir_of(path, cfg).rglob(".*")]
    assert not leftovers, leftovers  # temp files were renamed into place


@pytest.mark.parametrize("service", [{"compact_log_rows": 10}], indirect=True)
def test_update_log_folded_past_threshold(service):
    import ray

    cfg, ctl, path, x = service
    client = RetrievalClient(cfg)
    rng = np.random.default_rng(7)
    vecs = unit(rng, 15)
    for u in range(5):  # 3 rows each: the 4th update takes the log past 10 rows
        chunks = [Chunk(id=f"k{u}-{j}", doc_id=f"dk{u}-{j}", text="x") for j in range(3)]
        out = client.update(upsert=chunks, vectors=vecs[3 * u:3 * u + 3])
    end = time.time() + 120
    while client.versions()["primary"] == path.name:
        assert time.time() < end, "no compaction within 120 s"
        time.sleep(0.5)
    primary = client.versions()["primary"]
    manifest = read_manifest(path.parent / primary)
    assert manifest["updated_from"]["version"] == path.name and manifest["updated_from"]["updates"] >= 4
    # The fifth update either went into the fold or to the new primary: every row is served either way.
    assert out["version"] in (path.name, primary)
    assert top1(client, vecs) == [f"k{u}-{j}" for u in range(5) for j in range(3)]
    # A restarted controller serves the compacted version with the remaining log only.
    kill_and_wait(ctl)
    rec = ray.get(ctl.recovery.remote())
    assert client.versions()["primary"] == primary and rec["epochs"][primary] <= 1, rec
    assert top1(RetrievalClient(cfg), vecs) == [f"k{u}-{j}" for u in range(5) for j in range(3)]


def test_replicas_leave_with_a_controller_gone_for_good(ray_cluster, tmp_path):
    """A driver that exits without stopping its (non-detached) service: its replicas go too."""
    chunks, x = corpus(500, seed=13)
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path)), embedder_name="rand")
    code = (
        "import json, ray\n"
        "from ragdist.retrieval.client import RetrievalClient, RetrievalConfig, start_service\n"
        "cfg = RetrievalConfig(service_name='ctl-orphan', replicas=1)\n"
        f"start_service({str(path)!r}, cfg)\n"
        "info = RetrievalClient(cfg).metrics(replicas=True)['replicas']\n"
        "print(json.dumps([r['pid'] for r in info]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RAY_ADDRESS=ray_cluster))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(pids) == 2
    end = time.time() + 90
    while any(_alive(p) for p in pids):
        assert time.time() < end, f"replicas {pids} still alive 90 s after their controller died"
        time.sleep(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its raylet) is gone too
        return "zombie" not in open(f"/proc/{pid}/status").read().lower()
    except OSError:
        return False
