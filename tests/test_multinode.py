"""The retrieval service and its training ranks on a real multi-node Ray cluster on one host.

`ray.cluster_utils.Cluster`: a head (the driver, the controller) and three worker raylets on 127.0.0.1,
each offering `retrieval` (the nodes meant for shards) and its own `node<i>` resource (its name here).
Shown: replicas of a shard on distinct nodes; a whole node removed during a stream of queries with no
failed query and results identical to the no-fault run; two node ranks (`torchrun --nnodes 2`) training
against the cluster; a rank that cannot reach the cluster failing within `retrieval.connect_timeout_s`.

These tests replace the session's loopback cluster in this process, so they run last (conftest.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ragdist.data.corpus import Chunk
from ragdist.index.builder import IndexConfig, build_snapshot
from ragdist.retrieval.client import RetrievalClient, RetrievalConfig, start_service, stop_service
from ragdist.retrieval.server.controller import host_nodes
from tests.conftest import ROOT
from tests.test_launch import CHEAP, _tail, check_run, launch_env

pytestmark = pytest.mark.multinode

DIM = 32
WORKERS = 3


@pytest.fixture(scope="module")
def cluster():
    """Head + 3 worker raylets on loopback; the driver (this process) attached to the head."""
    import ray
    from ray.cluster_utils import Cluster

    from ragdist.retrieval.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()  # the session's loopback cluster: multinode tests run after every other test
    saved = os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only: nothing else can reach it
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False, resources={"head": 1}))  # fmt: skip
    workers = [
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"retrieval": 1, f"node{i}": 1})
        for i in range(WORKERS)
    ]
    c.wait_for_nodes()
    address = init_ray(c.address, namespace="ragdist")
    assert os.environ["RAY_ADDRESS"] == address
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved


def node_names() -> dict[str, str]:
    """Ray node id -> the name its custom resource gives it (head, node0, node1, ...)."""
    import ray

    out = {}
    for n in ray.nodes():
        names = [k for k in n["Resources"] if k == "head" or (k.startswith("node") and not k.startswith("node:"))]
        out[n["NodeID"]] = names[0] if names else n["NodeID"][:8]
    return out


def placement(client: RetrievalClient) -> dict[int, list[str]]:
    """shard -> the node name of each of its live replicas."""
    names = node_names()
    out: dict[int, list[str]] = {}
    for r in client.metrics(replicas=True)["replicas"]:
        if r["alive"]:
            out.setdefault(r["shard"], []).append(names.get(r["node_id"], r["node_id"][:8]))
    return out


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = [Chunk(id=f"c{i}", doc_id=f"d{i}", text=f"text {i}") for i in range(len(x))]
    path = build_snapshot(chunks, x, IndexConfig(num_shards=2, root=str(tmp_path_factory.mktemp("mn"))),
                          embedder_name="rand")  # fmt: skip
    cfg = RetrievalConfig(service_name="multinode", replicas=2, node_resource="retrieval", attempt_timeout_s=2,
                          timeout_s=60)  # fmt: skip
    start_service(str(path), cfg)
    yield cfg
    stop_service(cfg)


def test_hosts_are_the_nodes_offering_the_resource(cluster):
    import ray

    names = node_names()
    hosts = host_nodes(ray.nodes(), {"CPU": 0.25, "retrieval": 0.001})
    assert sorted(names[h] for h in hosts) == [f"node{i}" for i in range(WORKERS)]
    assert len(host_nodes(ray.nodes(), {"CPU": 0.25})) == WORKERS + 1


def test_replicas_of_a_shard_on_distinct_nodes(service):
    where = placement(RetrievalClient(service))
    assert sorted(where) == [0, 1]
    for nodes in where.values():
        assert len(nodes) == 2 and len(set(nodes)) == 2, where  # never two replicas of a shard on one node
        assert "head" not in nodes, where  # only nodes offering `retrieval` host shards


def test_node_removed_during_queries(cluster, service):
    """A whole node goes away mid-stream: every query answered, ids identical to the no-fault run."""
    c, workers = cluster
    client = RetrievalClient(service)
    rng = np.random.default_rng(1)
    stream = [rng.standard_normal((8, DIM)).astype(np.float32) for _ in range(300)]
    expected = [client.search(q, 5, passages=False).ids for q in stream]  # the no-fault run
    before = placement(client)
    victim_name = before[0][0]
    victim = next(w for w in workers if node_names().get(w.node_id) == victim_name)
    got, errors = [], []

    def run() -> None:
        for q in stream:
            try:
                got.append(client.search(q, 5, passages=False))
            except Exception as e:  # noqa: BLE001 - counted, asserted below
                errors.append(e)

    th = threading.Thread(target=run)
    th.start()
    end = time.time() + 60
    while len(got) < 30 and time.time() < end and th.is_alive():
        time.sleep(0.005)
    t_removed = time.perf_counter()
    c.remove_node(victim)  # raylet, object store and every worker process of that node
    workers.remove(victim)
    th.join(300)
    assert not th.is_alive()
    identical = all(np.array_equal(r.ids, want) for r, want in zip(got, expected))
    m = client.metrics()
    print(f"\nnode loss: removed {victim_name} after {30} of {len(stream)} batches; queries {len(got)} "
          f"failed {len(errors)} partial {sum(r.partial for r in got)} identical {identical}; "
          f"replica_failures {m.get('replica_failures', 0)} retries {m.get('retries', 0)} hedges {m.get('hedges', 0)}")
    assert not errors, errors[:1]
    assert len(got) == len(stream) and not any(r.partial for r in got)
    assert identical
    # Ray re-places the lost replicas (their placement group's bundles) on the nodes left, still spread.
    end = time.time() + 180
    while True:
        now = placement(client)
        if all(len(n) == 2 and len(set(n)) == 2 and victim_name not in n for n in now.values()):
            break
        assert time.time() < end, f"replicas not re-placed within 180 s: {now}"
        time.sleep(1)
    print(f"node loss: replicas re-placed {now} {time.perf_counter() - t_removed:.1f}s after the removal")
    for q, want in zip(stream[:20], expected):
        np.testing.assert_array_equal(client.search(q, 5, passages=False).ids, want)
    # a fresh node takes the lost one's place for the tests that follow
    workers.append(c.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                              resources={"retrieval": 1, f"node{WORKERS}": 1}))  # fmt: skip
    c.wait_for_nodes()


@pytest.mark.slow
def test_training_over_two_node_ranks(cluster, tmp_path):
    """`torchrun --nnodes 2 --node-rank {0,1}` on one host, RAY_ADDRESS on both: rank 0 starts the service
    on the cluster (shards on the `retrieval` nodes), both ranks retrieve from it every step."""
    import ray

    from ragdist.distributed import free_port

    run_dir, index = tmp_path / "run", tmp_path / "index"
    port = free_port()
    env = launch_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address, OMP_NUM_THREADS="1")
    name = "mn-train"
    overrides = [*CHEAP, f"index.root={index}", f"hydra.run.dir={run_dir}", f"retrieval.service_name={name}",
                 "retrieval.replicas=2", "retrieval.node_resource=retrieval", "retrieval.detached=true"]  # fmt: skip

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "ragdist.launch.rank", *overrides]  # fmt: skip
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    cfg = RetrievalConfig(service_name=name)
    procs = [node(0), node(1)]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, _tail(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        check_run(run_dir, world=2)
        assert (run_dir / "logs" / "rank-1.log").is_file()
        # The service rank 0 started (detached, so it is still up): shards on the worker nodes, spread,
        # and they answered the ranks' retrievals.
        client = RetrievalClient(cfg)
        info = client.metrics(replicas=True)["replicas"]
        names = node_names()
        for shard in {r["shard"] for r in info}:
            nodes = [names[r["node_id"]] for r in info if r["shard"] == shard]
            assert len(set(nodes)) == len(nodes) == 2 and "head" not in nodes, info
        assert sum(r["calls"] for r in info) > 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop_service(cfg)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


ATTACH = (
    "import sys, time\n"
    "from ragdist.errors import RetrievalError\n"
    "from ragdist.retrieval.client import RetrievalClient, RetrievalConfig\n"
    "t0 = time.perf_counter()\n"
    "try:\n"
    "    RetrievalClient(RetrievalConfig(address=sys.argv[1], connect_timeout_s=float(sys.argv[2])))\n"
    "except RetrievalError as e:\n"
    "    print(f'{time.perf_counter() - t0:.2f}', e)\n"
)


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_cluster_fails_within_the_timeout(kind):
    """Ray's own attach retries an unanswering address for minutes; a rank fails within the timeout."""
    listener = None
    if kind == "silent":  # accepts TCP connections (kernel backlog) but never speaks
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
    else:
        port = _closed_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run([sys.executable, "-c", ATTACH, address, "4"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        if listener is not None:
            listener.close()
    assert proc.stdout, proc.stderr[-2000:]
    took, msg = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert address in msg and "retrieval.address" in msg, msg
    assert float(took) < 4 + 3, (took, msg)
    print(f"\nunreachable ({kind}): {msg} after {took}s")


@pytest.mark.slow
def test_rank_that_cannot_reach_the_cluster_fails_naming_it(tmp_path):
    """A torchrun rank pointed at a dead address exits with status 2, naming it, within the timeout."""
    address = f"127.0.0.1:{_closed_port()}"
    env = launch_env()
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(_closed_port()), "-m", "ragdist.launch.rank",
         *CHEAP, f"hydra.run.dir={tmp_path / 'run'}", f"retrieval.address={address}",
         "retrieval.connect_timeout_s=5", f"index.root={tempfile.mkdtemp(dir=tmp_path)}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    took = time.perf_counter() - t0
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert f"cannot reach the Ray cluster at {address} (retrieval.address)" in err, _tail(proc)
    assert not list(Path(tmp_path / "run").glob("checkpoints/*")), "it should fail before training"
    print(f"\nrank with a dead address: exit {proc.returncode} after {took:.1f}s (process start included)")
