"""Shared fixtures: one loopback Ray cluster and one embedder per test session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ranks started by any launcher in a test talk over loopback (gloo otherwise binds the address the
# hostname resolves to)
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def pytest_collection_modifyitems(config, items):
    # A multi-node cluster (tests/test_multinode.py) replaces the session's loopback cluster in this
    # process: run those tests after all others (a stable sort keeps every other order).
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on 127.0.0.1, shared by every test (and every subprocess via RAY_ADDRESS)."""
    import ray

    from ragdist.retrieval.cluster import init_ray

    address = init_ray(num_cpus=2, namespace="ragdist")
    yield address
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def embedder():
    from ragdist.embed import EmbedderConfig, build_embedder

    return build_embedder(EmbedderConfig(progress=False))


@pytest.fixture(scope="session")
def tiny_docs():
    from ragdist.data.corpus import load_documents

    return load_documents(DATA / "corpus.jsonl")


@pytest.fixture(scope="session")
def tiny_chunks(tiny_docs, embedder):
    from ragdist.data.corpus import chunk_documents

    return chunk_documents(tiny_docs, embedder.tokenizer, 128, 32)


@pytest.fixture(scope="session")
def tiny_vectors(tiny_chunks, embedder):
    return embedder.encode([c.text for c in tiny_chunks])


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory, tiny_chunks, tiny_vectors, embedder):
    from ragdist.index.builder import IndexConfig, build_snapshot

    root = tmp_path_factory.mktemp("snapshots")
    return build_snapshot(
        tiny_chunks, tiny_vectors, IndexConfig(num_shards=2, root=str(root)), embedder_name=embedder.name
    )


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, embedder):
    """A 2-layer BERT sequence classifier (random weights) saved locally: a real re-ranker to load and run."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cross-encoder")
    tok = embedder.tokenizer
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_index_built(ray_cluster, tmp_path_factory):
    """The tiny experiment's index (`ragdist-index +experiment=tiny`), built once per session."""
    root = tmp_path_factory.mktemp("tiny-index")
    proc = run_cli(["ragdist-index", "+experiment=tiny", f"index.root={root}"], env={"RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (root / "LATEST").is_file()
    return root


@pytest.fixture
def tiny_index(tiny_index_built, tmp_path):
    """An index root holding a copy of the tiny experiment's snapshot: a `+experiment=tiny` run given
    `index.root=<it>` finds its inputs' snapshot there and reuses it instead of embedding the corpus
    again. Each test gets its own copy, so versions a run adds (joint refreshes) stay in that test."""
    dst = tmp_path / "idx"
    shutil.copytree(tiny_index_built, dst)
    return dst


def run_cli(args: list[str], *, env: dict | None = None, timeout: int = 900, cwd: Path = ROOT):
    """Run a console script of this venv; return the CompletedProcess."""
    import subprocess

    exe = Path(sys.executable).parent / args[0]
    if args[0].startswith("ragdist-") and not any(a.startswith(("hydra.run.dir=", "-m", "--")) for a in args[1:]):
        # Hydra would otherwise make a dated run dir under the repo's runs/, even for a run refused at once
        args = [*args, f"hydra.run.dir={tempfile.mkdtemp(prefix='ragdist-cli-')}"]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [str(exe), *args[1:]], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
