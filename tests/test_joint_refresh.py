"""The asynchronous index refresh on the real Ray cluster and retrieval service: a new version is
re-embedded, loaded beside the served one and swapped in; crashes are retried while the old version
serves; a refresh that finishes after a newer one started is discarded."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

QUESTIONS = ["What is the IATA code of Farah Airport?", "Which city does RAF Leuchars serve?",
             "What is the ICAO code of Ngau Airport?"]


@pytest.fixture(scope="module")
def env(ray_cluster, tiny_snapshot, tmp_path_factory):
    from ragdist.embed.embedder import resolve_model_path
    from ragdist.index.snapshot import read_manifest
    from ragdist.joint.config import JointConfig
    from ragdist.joint.refresh import IndexView, RefreshManager, ServedVersion, joint_service
    from ragdist.joint.retriever import MeanPoolEncoder, encoder_dir
    from ragdist.retrieval.client import RetrievalConfig, start_service, stop_service

    path = encoder_dir(resolve_model_path("minilm"))
    svc = joint_service(RetrievalConfig(service_name="test-refresh", timeout_s=120))
    start_service(str(tiny_snapshot), svc)
    served = ServedVersion(0, read_manifest(tiny_snapshot)["version"], str(tiny_snapshot), 0)
    # Full priority here: the test checks what a refresh does, bench/refresh.py what it costs training.
    cfg = JointConfig(loss="lsr", side="both", refresh_every=1, refresh_backoff_s=1.0, refresh_timeout_s=300,
                      refresh_keep_versions=1, refresh_nice=0)
    run_dir = tmp_path_factory.mktemp("joint-refresh")
    mgr = RefreshManager(cfg, source_snapshot=str(tiny_snapshot), served=served, service=svc, encoder_path=path,
                         run_dir=run_dir)
    e = SimpleNamespace(mgr=mgr, view=IndexView(svc, served), enc=MeanPoolEncoder(path), svc=svc, run_dir=run_dir,
                        v0=served.version)
    try:
        yield e
    finally:
        mgr.close()
        stop_service(svc)


def _serve_until(e, outcome: str, step: int, timeout: float = 240.0):
    """Poll as the training loop does, querying the served version meanwhile; bounded."""
    qv = e.enc.encode(QUESTIONS)
    deadline = time.monotonic() + timeout
    answered = 0
    seen = len(e.mgr.records)
    while time.monotonic() < deadline:
        res = e.view.search(qv, 3)  # training keeps querying the served version meanwhile
        assert res.version == e.view.served.version and len(res.passages[0]) == 3
        answered += 1
        new = e.mgr.poll(step)
        if new is not None:
            e.view.switch(new)
            e.mgr.promote(new)
        for rec in e.mgr.records[seen:]:
            if rec.outcome == outcome:
                return rec, answered
        time.sleep(0.1)
    raise AssertionError(f"no refresh reached {outcome!r} in {timeout}s: {e.mgr.records}")


def test_refresh_with_unchanged_weights_serves_an_identical_index(env):
    from ragdist.index.snapshot import read_manifest

    qv = env.enc.encode(QUESTIONS)
    ids0 = env.view.search(qv, 5).ids
    env.mgr.start(1, env.enc, "test")
    rec, answered = _serve_until(env, "served", 1)
    assert answered >= 1 and env.view.served.seq == 1 and env.view.served.version != env.v0
    m = read_manifest(env.view.served.snapshot)
    assert m["joint"]["encoder_step"] == 1 and m["num_chunks"] == 40
    assert np.array_equal(env.view.search(qv, 5).ids, ids0)  # same weights → same vectors → same ranking
    assert rec.detail["docs_per_s"] > 0
    # The swap is service-wide too: the new version becomes primary and the original is unloaded.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        vs = env.mgr.admin.versions()
        if vs["primary"] == env.view.served.version and env.v0 not in vs["versions"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"promote/unload did not happen: {vs}")


def test_refresh_reembeds_with_the_snapshotted_weights(env, tiny_chunks):
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in env.enc.model.encoder.layer[-1].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    env.mgr.start(2, env.enc, "test")
    _serve_until(env, "served", 2)
    assert env.view.served.seq == 2 and env.view.served.encoder_step == 2
    vecs = env.enc.encode([c.text for c in tiny_chunks])
    qv = env.enc.encode(QUESTIONS)
    exact = np.argsort(-(qv @ vecs.T), axis=1)[:, :5]
    assert np.array_equal(env.view.search(qv, 5).ids, exact)
    # Only the served version's weights file stays; keep_versions=1 leaves one refreshed snapshot dir.
    assert [f.name for f in (env.run_dir / "joint" / "encoder_snapshots").glob("*.safetensors")] == [
        "step0000002-r2.safetensors"]
    assert len([p for p in (env.run_dir / "joint" / "index").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1


def test_crashed_refresh_keeps_the_old_version_and_is_retried(env, caplog):
    caplog.set_level(logging.WARNING, logger="ragdist.joint.refresh")
    before = env.view.served
    env.mgr.crashes_left = 1  # an embed worker process dies in the next refresh
    env.mgr.start(3, env.enc, "test")
    rec, answered = _serve_until(env, "failed", 3)
    assert "died" in rec.detail["error"] and answered >= 1
    assert env.view.served == before and env.mgr.retry_at is not None
    assert any("failed (attempt 1" in r.message and "retrying in" in r.message for r in caplog.records)
    assert env.mgr.maybe_start(4, env.enc) is False  # still backing off
    deadline = time.monotonic() + 30
    while not env.mgr.maybe_start(4, env.enc):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rec, _ = _serve_until(env, "served", 4)
    assert rec.reason == "retry" and env.view.served.seq == 4 and env.mgr.attempt == 0


def test_refresh_finishing_after_a_newer_one_is_discarded(env):
    env.mgr.cfg.refresh_supersede = True
    slow = env.mgr.next_seq
    env.mgr.faults["delay_s"] = {slow: 8.0}
    env.mgr.start(5, env.enc, "test")
    fast = env.mgr.start(6, env.enc, "test")
    assert env.mgr.inflight() == 2
    _serve_until(env, "served", 6)
    assert env.view.served.seq == fast
    rec, _ = _serve_until(env, "discarded", 7)
    assert rec.seq == slow and env.view.served.seq == fast  # never went back to the older encoder
    assert not rec.detail.get("loaded") and rec.detail["version"] not in env.mgr.admin.versions()["versions"]
