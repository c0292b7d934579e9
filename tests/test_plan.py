"""ragdist-plan: its byte model against FAISS's own serialization and real snapshot files, its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragdist.errors import ConfigError
from ragdist.index import snapshot as snap
from ragdist.index.capacity import PlanConfig, availability_replicas, index_size, make_plan
from tests.conftest import DATA, ROOT, run_cli


def plan_cli(args: list[str]) -> subprocess.CompletedProcess:
    """The console script when this venv has it installed, else the same Hydra app through -m."""
    if (Path(sys.executable).parent / "ragdist-plan").exists():
        return run_cli(["ragdist-plan", *args])
    import tempfile

    return subprocess.run([sys.executable, "-m", "ragdist.recipes.plan", *args,
                           f"hydra.run.dir={tempfile.mkdtemp(prefix='ragdist-plan-')}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# 4-bit PQ keeps the k-means small; 8-bit codes are checked on a real snapshot below.
@pytest.mark.parametrize("factory", ["Flat", "SQ8", "SQfp16", "PQ16x4", "IVF16,Flat", "IVF16,PQ16x4", "IVF32,SQ8",
                                     "HNSW8", "HNSW8_SQ8", "PCA32,IVF16,Flat", "IVF16_HNSW8,PQ8x4",
                                     "IVF16,PQ8x4,RFlat", "IDMap,Flat"])
def test_bytes_match_faiss_serialization(factory):
    import faiss

    d = 64
    x = np.random.default_rng(0).standard_normal((1500, d), dtype=np.float32)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # tiny k-means: threads only spin on a busy machine
    try:
        index.train(x[:300])
    finally:
        faiss.omp_set_num_threads(threads)
    size = index_size(factory, d)
    for n in (100, 1500):
        filled = faiss.clone_index(index)
        if factory.startswith("IDMap"):
            filled.add_with_ids(x[:n], np.arange(n))
        else:
            filled.add(x[:n])
        real = faiss.serialize_index(filled).size
        # HNSW's levels are random: a 100-vector graph may hold a few more links than expected
        assert abs(size.bytes(n) - real) / real < 0.02, (factory, n, size.bytes(n), real)


def test_unknown_factory_component_is_named():
    with pytest.raises(ConfigError, match="cannot size the component 'LSH'"):
        index_size("LSH", 64)
    with pytest.raises(ConfigError, match="PQ7 needs a dim divisible by 7"):
        index_size("IVF16,PQ7", 384)


def shard_files(path: Path) -> tuple[int, int]:
    m = snap.read_manifest(path)
    index = sum(m["files"][s["index"]]["bytes"] for s in m["shards"])
    vectors = sum(m["files"][s["vectors"]]["bytes"] for s in m["shards"] if s.get("vectors"))
    return index, vectors


def test_cli_counts_the_corpus_and_predicts_the_flat_snapshot(tiny_snapshot):
    """ragdist-plan on the tests' corpus: 40 chunks, and the 2 Flat shard files the builder wrote."""
    proc = plan_cli([f"corpus.path={DATA / 'corpus.jsonl'}", "index.num_shards=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = last_json(proc.stdout)
    assert plan["inputs"]["passages"] == snap.read_manifest(tiny_snapshot)["num_chunks"] == 40
    assert plan["inputs"]["dim"] == 384 and plan["bytes_per_vector"] == 4 * 384
    real_index, _ = shard_files(tiny_snapshot)
    assert abs(plan["index_bytes_total"] - real_index) / real_index < 0.10
    assert "bytes per vector" in proc.stdout  # the table precedes the JSON


def test_ivfpq_snapshot_within_ten_percent(tmp_path):
    from ragdist.data.corpus import Chunk
    from ragdist.index.builder import build_snapshot
    from ragdist.index.config import IndexConfig

    n, d = 2000, 384
    x = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = [Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=f"passage {i}") for i in range(n)]
    cfg = IndexConfig(root=str(tmp_path), factory="IVF16,PQ16x4", num_shards=2, recall_queries=0)
    path = build_snapshot(chunks, x, cfg, embedder_name="random")
    plan = make_plan(PlanConfig(), factory=cfg.factory, shards=2, replicas=1, shards_per_gpu=1, nprobe=16,
                     store_vectors="auto", passages=n, dim=d, passage_bytes=20, build_workers=1,
                     train_sample=cfg.train_sample)
    real_index, real_vectors = shard_files(path)
    assert abs(plan["index_bytes_total"] - real_index) / real_index < 0.10, (plan["index_bytes_total"], real_index)
    predicted_vectors = 2 * plan["vectors_file_bytes_per_shard"]
    assert abs(predicted_vectors - real_vectors) / real_vectors < 0.10


def test_refusals_name_the_constraint():
    base = dict(factory="Flat", replicas=1, shards_per_gpu=1, nprobe=16, store_vectors="auto", dim=384,
                passage_bytes=300, build_workers=8, train_sample=100_000)
    # 1B float32 vectors on 8 GPUs in 8 shards: 1.5 TB / 8 does not fit 80 GB
    p = make_plan(PlanConfig(gpus=8, nodes=1, node_memory_gb=4096), passages=10**9, shards=8, **base)
    assert not p["fits"] and any(v.startswith("GPU memory") and "index.num_shards >=" in v for v in p["violations"])
    # more shard actors than GPU slots
    p = make_plan(PlanConfig(gpus=4, nodes=1), passages=10**6, shards=8, **base)
    assert any(v.startswith("GPU slots") for v in p["violations"])
    # passage rows: 1B rows on one 512 GB node
    p = make_plan(PlanConfig(gpus=0, nodes=1), passages=10**9, shards=64,
                  **{**base, "factory": "IVF4096,PQ16"})
    assert any(v.startswith("node memory") for v in p["violations"])
    # IVF training sample too small for the lists
    p = make_plan(PlanConfig(), passages=10**7, shards=1, **{**base, "factory": "IVF65536,PQ48"})
    assert any(v.startswith("IVF training") for v in p["violations"])


def test_cli_refuses_with_exit_2_and_the_constraint():
    proc = plan_cli(["plan.passages=1000000000", "plan.dim=384", "plan.gpus=8", "plan.node_memory_gb=4096",
                     "index.factory=Flat", "index.num_shards=8"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ragdist: error: the plan does not fit: GPU memory" in proc.stderr and "Traceback" not in proc.stderr
    assert last_json(proc.stdout)["fits"] is False


def test_the_documented_billion_plan_fits():
    proc = plan_cli(["+experiment=plan_1b"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = last_json(proc.stdout)
    assert plan["fits"] and plan["bytes_per_vector"] == 48 + 8 and plan["shard_actors"] == 32 * 31


def test_replicas_for_availability():
    assert availability_replicas(0.99, 1, 0.99) == 1
    assert availability_replicas(0.99, 32, 0.999) == 3  # two replicas: (1 - 0.01**2)**32 = 0.9968
    r = availability_replicas(0.99, 32, 0.999)
    assert (1 - 0.01**r) ** 32 >= 0.999 and (1 - 0.01 ** (r - 1)) ** 32 < 0.999
