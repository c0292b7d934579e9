"""Training checkpoints (atomic, pruned, identity-checked) with a real one-rank FSDP2 engine, RNG state,
the fused-loss path, and the local launcher's exit-status rules."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ragdist.distributed import free_port, launch_local
from ragdist.errors import ConfigError
from ragdist.train import checkpoint as ckpt
from ragdist.train.engine import TrainerConfig
from ragdist.train.engines import build_engine
from ragdist.train.examples import collate_train, encode_train
from ragdist.train.loop import build_module_fn
from ragdist.train.model import AnswerLossLM, ModelConfig, build_generator, load_tokenizer
from ragdist.train.peft import PeftConfig
from ragdist.train.preempt import REQUEUE_EXIT_CODE

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=64)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo group in this process, so FSDP2 and the collective save path run for real."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def engine(one_rank_group, tok, tmp_path):
    eng = build_engine(TrainerConfig(engine="fsdp", max_steps=10, warmup_steps=1), build_module_fn(TINY, tok, PeftConfig()), tmp_path)
    yield eng
    eng.close()


def batch(tok):
    rows = [encode_train(tok, f"question {i}?", [{"title": "t", "text": f"passage {i}"}], f"a{i}", 48) for i in range(4)]
    return collate_train(rows, tok.pad_token_id)


def test_rng_state_roundtrip():
    s = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(s)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_save_is_atomic_pruned_and_resumable(engine, tok, tmp_path):
    root = tmp_path / "state"
    assert ckpt.find_checkpoint("auto", root) is None
    b = batch(tok)
    for step in (1, 2, 3):
        engine.train_step(b)
        ckpt.save_checkpoint(engine, root, {"step": step, "variant": "rag"}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert ckpt.find_checkpoint("auto", root).name == "step_00000003"

    # a save that dies half-way leaves the previous checkpoint as the one to resume from
    real = engine.save_checkpoint

    def dies(path):
        real(path)
        raise OSError("disk full")

    engine.save_checkpoint = dies
    engine.train_step(b)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(engine, root, {"step": 4, "variant": "rag"}, keep=2)
    engine.save_checkpoint = real
    assert ckpt.find_checkpoint("auto", root).name == "step_00000003"
    assert not (root / "step_00000004").exists()

    # resuming restores weights, optimizer and schedule: the next steps' losses match
    loss_after_3 = []
    st = ckpt.load_checkpoint(engine, root / "step_00000003", {"variant": "rag"})
    assert st["step"] == 3
    for _ in range(2):
        loss_after_3.append(engine.train_step(b).item())
    lr = engine.lr()
    ckpt.load_checkpoint(engine, root / "step_00000003", {"variant": "rag"})
    assert [engine.train_step(b).item() for _ in range(2)] == loss_after_3 and engine.lr() == lr
    ckpt.save_checkpoint(engine, root, {"step": 4, "variant": "rag"}, keep=2)  # the stale temp dir is cleared
    assert not list(root.glob(".tmp-*"))

    with pytest.raises(ConfigError, match="variant='rag' but this run has variant='closed_book'"):
        ckpt.load_checkpoint(engine, root / "step_00000004", {"variant": "closed_book"})
    with pytest.raises(ConfigError, match="no training checkpoint"):
        ckpt.find_checkpoint(str(tmp_path / "nowhere"), root)


def test_gathered_params_are_whole(engine):
    from torch.distributed.tensor import DTensor

    assert any(isinstance(p, DTensor) for p in engine.module.parameters())
    with engine.gathered_params():
        emb = engine.module.lm.get_input_embeddings().weight
        assert not isinstance(emb, DTensor) and emb.shape[1] == TINY.hidden_size


def test_fused_loss_matches_the_plain_loss(tok):
    lm = build_generator(TINY, tok)
    b = batch(tok)
    fused, plain = AnswerLossLM(lm, fused_loss=True), AnswerLossLM(lm, fused_loss=False)
    lf = fused(**b)
    lf.backward()
    g_fused = lm.get_input_embeddings().weight.grad.clone()
    lm.zero_grad()
    lp = plain(**b)
    lp.backward()
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, lm.get_input_embeddings().weight.grad, rtol=1e-4, atol=1e-5)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_launcher_exit_status_rules(monkeypatch):
    assert launch_local(_py("import sys; sys.exit(0)"), 2) == 0
    assert launch_local(_py(f"import sys; sys.exit({REQUEUE_EXIT_CODE})"), 2) == REQUEUE_EXIT_CODE
    # one rank fails: its status is returned and the other (which would sleep a minute) is stopped
    code = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(60)"
    import time

    t0 = time.perf_counter()
    assert launch_local(_py(code), 2, grace_s=5) == 3
    assert time.perf_counter() - t0 < 30
    env_code = "import os, sys; sys.exit(0 if os.environ['WORLD_SIZE'] == '3' and os.environ['MASTER_ADDR'] == '127.0.0.1' else 1)"
    assert launch_local(_py(env_code), 3) == 0
    # the ranks' gloo pairs on loopback unless the caller chose an interface; this process's own
    # environment is left as it was
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    lo_code = "import os, sys; sys.exit(0 if os.environ.get('GLOO_SOCKET_IFNAME') == 'lo' else 1)"
    assert launch_local(_py(lo_code), 2) == 0
    assert "GLOO_SOCKET_IFNAME" not in os.environ


def test_launcher_forwards_signals_to_its_ranks_only(tmp_path):
    """A SIGTERM to the launching process reaches the ranks, not the children it had before (a Ray
    cluster the driver started itself: a forwarded SIGTERM stopped its GCS server under the service
    the driver still had to shut down, and the driver hung on it)."""
    import signal
    import subprocess
    import threading
    import time

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    code = (
        "import os, signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready-' + os.environ['RANK']), 'w').close()\n"
        "deadline = time.monotonic() + 120\n"
        "while not got and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        f"sys.exit({REQUEUE_EXIT_CODE} if got else 1)\n"
    )

    launched = threading.Event()  # set once launch_local returns: no signal to this process after that

    def signal_when_ready() -> None:
        while len(list(tmp_path.glob("ready-*"))) < 2 and not launched.is_set():
            time.sleep(0.05)
        if not launched.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=signal_when_ready, daemon=True)
    try:
        sender.start()
        try:
            rc = launch_local(_py(code), 2)
        finally:
            launched.set()
        assert rc == REQUEUE_EXIT_CODE
        time.sleep(0.5)
        assert bystander.poll() is None, "the launcher signalled a child that is not a rank"
    finally:
        sender.join(timeout=5)
        bystander.kill()
        bystander.wait()
