"""Equivalence and dispatch tests for ragdist.kernels (exact top-k, chunked linear + cross-entropy).

CPU tests compare against faiss.IndexFlatIP and F.cross_entropy; ``gpu`` tests run the CUDA /
Triton paths against the same references and skip cleanly without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragdist.kernels import (
    FAISS_IP_PAD_SCORE,
    TopKConfig,
    TorchFlatIP,
    exact_topk_ip,
    fused_linear_ce_available,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    select_backend,
    triton_linear_ce,
    triton_topk,
)
from ragdist.kernels import linear_ce as lce_mod
from ragdist.kernels import topk as topk_mod
from ragdist.kernels.topk import TRITON_MAX_QUERIES, scan_kernel, triton_forced

faiss = pytest.importorskip("faiss")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The tensors here are tiny: one intra-op thread avoids OpenMP hand-off costs (which dominate
    # on a busy 2-core machine) without changing what is tested.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _data(nb: int, nq: int, d: int, seed: int = 0, normalize: bool = True):
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((nb, d), dtype=np.float32)
    xq = rng.standard_normal((nq, d), dtype=np.float32)
    if normalize:
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return xb, xq


def _faiss(xb: np.ndarray, xq: np.ndarray, k: int):
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)


def _assert_same_topk(D, ids, Dref, Iref, score_tol: float = 1e-5, tie_tol: float = 1e-6) -> None:
    """Scores within ``score_tol``; ids equal except where the reference score is within
    ``tie_tol`` of the k-th score (ties may be broken differently)."""
    assert D.shape == Dref.shape and ids.shape == Iref.shape
    assert D.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(D, Dref, atol=score_tol, rtol=0)
    kth = Dref[:, -1:]
    decisive = np.abs(Dref - kth) > tie_tol
    assert np.array_equal(ids[decisive], Iref[decisive])


def _recall(ids, Iref) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, Iref))
    return hits / Iref.size


# ------------------------------------------------------------------------------ exact top-k


@pytest.mark.parametrize("block_size", [None, 613, 4096])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_topk_matches_faiss_fp32(block_size, k):
    xb, xq = _data(3000, 37, 48)
    Dref, Iref = _faiss(xb, xq, k)
    D, ids = exact_topk_ip(xq, xb, k, block_size=block_size)
    _assert_same_topk(D, ids, Dref, Iref)


def test_topk_unnormalized_and_torch_inputs():
    xb, xq = _data(2000, 19, 32, seed=3, normalize=False)
    Dref, Iref = _faiss(xb, xq, 7)
    D, ids = exact_topk_ip(torch.from_numpy(xq), torch.from_numpy(xb), 7, block_size=500, threads=1)
    _assert_same_topk(D, ids, Dref, Iref, score_tol=1e-4)
    # float64 numpy queries are accepted (cast to fp32)
    D2, I2 = exact_topk_ip(xq.astype(np.float64), xb, 7)
    _assert_same_topk(D2, I2, Dref, Iref, score_tol=1e-4)


def test_topk_threads_restored():
    before = torch.get_num_threads()
    xb, xq = _data(500, 4, 16)
    exact_topk_ip(xq, xb, 3, threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("db_dtype", ["fp32", "bf16"])
def test_topk_pads_like_faiss_when_k_exceeds_nb(db_dtype):
    xb, xq = _data(5, 3, 8)
    Dref, Iref = _faiss(xb, xq, 8)
    D, ids = exact_topk_ip(xq, xb, 8, db_dtype=db_dtype)
    np.testing.assert_array_equal(ids[:, 5:], Iref[:, 5:])
    np.testing.assert_array_equal(D[:, 5:], Dref[:, 5:])
    assert (ids[:, 5:] == -1).all() and (D[:, 5:] == np.float32(FAISS_IP_PAD_SCORE)).all()
    _assert_same_topk(D[:, :5], ids[:, :5], Dref[:, :5], Iref[:, :5])


def test_topk_empty_database_all_padding():
    index = TorchFlatIP(4)
    D, ids = index.search(np.ones((2, 4), np.float32), 3)
    ref = faiss.IndexFlatIP(4).search(np.ones((2, 4), np.float32), 3)
    np.testing.assert_array_equal(D, ref[0])
    np.testing.assert_array_equal(ids, ref[1])


@pytest.mark.parametrize("k", [0, -1])
def test_topk_rejects_bad_k(k):
    xb, xq = _data(10, 2, 4)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        exact_topk_ip(xq, xb, k)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        TorchFlatIP(4).search(xq, k)


def test_topk_rejects_dimension_mismatch():
    xb, _ = _data(10, 2, 4)
    with pytest.raises(ValueError, match="dimension mismatch"):
        exact_topk_ip(np.zeros((2, 5), np.float32), xb, 1)
    index = TorchFlatIP(4)
    with pytest.raises(ValueError, match="dimension mismatch"):
        index.add(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="dimension mismatch"):
        index.search(np.zeros((3, 5), np.float32), 1)
    with pytest.raises(ValueError, match="2-D"):
        exact_topk_ip(np.zeros(4, np.float32), xb, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_topk_rejects_non_finite_queries(bad):
    xb, xq = _data(10, 3, 4)
    xq[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        exact_topk_ip(xq, xb, 2)
    index = TorchFlatIP(4)
    index.add(xb)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(xq, 2)


def test_topk_rejects_bad_dtype_option():
    xb, xq = _data(10, 3, 4)
    with pytest.raises(ValueError, match="db_dtype"):
        exact_topk_ip(xq, xb, 2, db_dtype="fp16")


def test_torch_flat_ip_add_search_reset():
    xb, xq = _data(2500, 21, 24, seed=5)
    index = TorchFlatIP(24, block_size=700)
    assert index.ntotal == 0 and index.is_trained
    for part in np.array_split(xb, 4):  # ids continue across add() calls
        index.add(part)
    assert index.ntotal == len(index) == 2500
    np.testing.assert_array_equal(index.reconstruct(1234), xb[1234])
    Dref, Iref = _faiss(xb, xq, 10)
    D, ids = index.search(xq, 10)
    _assert_same_topk(D, ids, Dref, Iref)
    D2, I2 = index.search(xq[:3], 10)  # smaller batch reuses the scratch buffer
    _assert_same_topk(D2, I2, Dref[:3], Iref[:3])
    index.reset()
    assert index.ntotal == 0
    D, ids = index.search(xq, 4)
    assert (ids == -1).all() and (D == np.float32(FAISS_IP_PAD_SCORE)).all()
    index.add(xb[:100])
    Dref, Iref = _faiss(xb[:100], xq, 4)
    D, ids = index.search(xq, 4)
    _assert_same_topk(D, ids, Dref, Iref)


def test_torch_flat_ip_config_object():
    cfg = TopKConfig(block_size=256, threads=1, db_dtype="bf16", device="cpu")
    index = TorchFlatIP(16, config=cfg)
    assert index.db_dtype == "bf16" and index.backend == "torch-cpu" and index.block_size == 256


def test_topk_bf16_with_fp32_rescoring_matches_faiss():
    # bf16 scan + exact fp32 re-scoring of k + max(k, 16) candidates.  Tolerance: recall@10 >= 0.99
    # against exact fp32 (observed: identical ids), and every returned score is the exact fp32
    # inner product of the returned id (1e-5).
    xb, xq = _data(20000, 64, 64, seed=11)
    Dref, Iref = _faiss(xb, xq, 10)
    index = TorchFlatIP(64, db_dtype="bf16")
    index.add(xb)
    D, ids = index.search(xq, 10)
    assert _recall(ids, Iref) >= 0.99
    exact = np.einsum("qd,qkd->qk", xq, xb[ids])
    np.testing.assert_allclose(D, exact, atol=1e-5)
    D2, I2 = exact_topk_ip(xq, xb, 10, db_dtype="bf16", block_size=3000)
    assert _recall(I2, Iref) >= 0.99
    np.testing.assert_allclose(D2, np.einsum("qd,qkd->qk", xq, xb[I2]), atol=1e-5)


def test_topk_bf16_only_storage():
    # keep_fp32=False: scores are those of the bf16-rounded vectors (|err| <= ~1e-2 for unit
    # vectors); tolerance recall@10 >= 0.95.
    xb, xq = _data(5000, 32, 64, seed=2)
    Dref, Iref = _faiss(xb, xq, 10)
    index = TorchFlatIP(64, db_dtype="bf16", keep_fp32=False)
    index.add(xb)
    assert index.memory_bytes() == 5000 * 64 * 2
    D, ids = index.search(xq, 10)
    assert _recall(ids, Iref) >= 0.95
    np.testing.assert_allclose(D, Dref, atol=1e-2)


def test_select_backend_dispatch(monkeypatch):
    monkeypatch.delenv("RAGDIST_TOPK_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_backend() == "torch-cpu"
    assert select_backend("cpu") == "torch-cpu"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        select_backend("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        select_backend("tpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_topk, "triton_available", lambda: True)
    assert select_backend() == "triton"
    assert select_backend("cuda") == "triton"
    assert select_backend("torch-cuda") == "torch-cuda"
    assert select_backend("cpu") == "torch-cpu"
    monkeypatch.setenv("RAGDIST_TOPK_BACKEND", "cpu")
    assert select_backend() == "torch-cpu"
    monkeypatch.delenv("RAGDIST_TOPK_BACKEND")

    monkeypatch.setattr(triton_topk, "triton_available", lambda: False)
    assert select_backend() == "torch-cuda"
    with pytest.raises(RuntimeError, match="triton"):
        select_backend("triton")


def test_triton_modules_import_without_triton():
    # Importable everywhere; the availability probe is a plain bool.
    assert isinstance(triton_topk.triton_available(), bool)
    assert triton_linear_ce.triton_available is triton_topk.triton_available
    if not triton_topk.triton_available():
        with pytest.raises(RuntimeError, match="triton is not available"):
            triton_topk.tile_topk_ip(torch.zeros(1, 16), torch.zeros(4, 16), 1)
        with pytest.raises(RuntimeError, match="triton is not available"):
            triton_linear_ce.ce_loss_and_grad_inplace(
                torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), 0.0, None
            )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("device", ["torch-cuda", "triton", "cuda"])
@pytest.mark.parametrize("db_dtype", ["fp32", "bf16"])
def test_topk_cuda_matches_faiss(device, db_dtype):
    if device == "triton" and not triton_topk.triton_available():
        pytest.skip("triton not installed")
    xb, xq = _data(30000, 70, 96, seed=7)
    Dref, Iref = _faiss(xb, xq, 10)
    index = TorchFlatIP(96, db_dtype=db_dtype, device=device)
    index.add(xb)
    D, ids = index.search(xq, 10)
    if db_dtype == "fp32":
        _assert_same_topk(D, ids, Dref, Iref, score_tol=1e-4)
    else:
        assert _recall(ids, Iref) >= 0.99
    xb5, xq5 = _data(5, 3, 96)
    D, ids = exact_topk_ip(xq5, torch.from_numpy(xb5).cuda(), 8, db_dtype=db_dtype)
    assert (ids[:, 5:] == -1).all() and (D[:, 5:] == np.float32(FAISS_IP_PAD_SCORE)).all()


def test_triton_scan_runs_only_where_it_was_measured_faster(monkeypatch):
    # chosen automatically: small batches; torch's GEMM for the rest
    assert scan_kernel("triton", 16, 10, "bf16") == scan_kernel("triton", 16, 10, "fp32") == "triton"
    assert scan_kernel("triton", TRITON_MAX_QUERIES, 10, "bf16") == "triton"
    assert scan_kernel("triton", TRITON_MAX_QUERIES + 1, 10, "bf16") == "torch"
    assert scan_kernel("triton", 16, triton_topk.MAX_TILE_K, "bf16") == "torch"  # k + 16 candidates: too many
    assert scan_kernel("torch-cuda", 16, 10, "bf16") == scan_kernel("torch-cpu", 16, 10, "bf16") == "torch"
    # asked for by name: Triton on every batch that fits a tile
    assert scan_kernel("triton", 4096, 10, "fp32", forced=True) == "triton"
    assert scan_kernel("triton", 16, triton_topk.MAX_TILE_K + 1, "fp32", forced=True) == "torch"
    assert triton_forced("triton") and not triton_forced("cuda") and not triton_forced("auto")
    monkeypatch.setenv("RAGDIST_TOPK_BACKEND", "triton")
    assert triton_forced("auto") and not triton_forced("cuda")


# ------------------------------------------------------------------ linear + cross-entropy


def _lce_inputs(n=29, h=24, v=67, dtype=torch.float32, bias=False, ignore_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(v, h, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def _run(fn, hidden, weight, b, labels, grad_scale=None, **kw):
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    loss = fn(hidden, weight, labels, bias=b, **kw)
    if grad_scale is None:
        grad_scale = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss * grad_scale.to(loss.dtype)).sum().backward()
    grads = [t.grad.detach().clone() for t in (hidden, weight, b) if t is not None]
    return loss.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_ce_matches_reference_fp32(reduction, label_smoothing, bias):
    hidden, weight, b, labels = _lce_inputs(bias=bias)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref_loss, ref_grads = _run(linear_cross_entropy_reference, hidden, weight, b, labels, **kw)
    for chunk in (5, 7, 1024):  # several chunks, ragged last chunk, single chunk
        loss, grads = _run(linear_cross_entropy, hidden, weight, b, labels, chunk_size=chunk, **kw)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        assert len(grads) == len(ref_grads)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_linear_ce_ignored_rows_get_zero_grad_and_mean_counts_valid_only():
    hidden, weight, _, labels = _lce_inputs(ignore_every=3)
    loss, (gh, _) = _run(linear_cross_entropy, hidden, weight, None, labels, grad_scale=torch.tensor(1.0))
    assert torch.all(gh[labels == -100] == 0)
    valid = labels != -100
    per_tok = linear_cross_entropy(hidden, weight, labels, reduction="none").detach()
    torch.testing.assert_close(loss, per_tok[valid].sum() / valid.sum(), atol=1e-6, rtol=1e-6)
    assert torch.all(per_tok[~valid] == 0)


def test_linear_ce_custom_ignore_index():
    hidden, weight, _, labels = _lce_inputs(ignore_every=0)
    labels[::2] = 7  # ignore class 7 (a valid class id) by index
    kw = dict(ignore_index=7, label_smoothing=0.1)
    ref_loss, ref_grads = _run(linear_cross_entropy_reference, hidden, weight, None, labels, **kw)
    loss, grads = _run(linear_cross_entropy, hidden, weight, None, labels, chunk_size=4, **kw)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_all_ignored_is_zero_not_nan(reduction):
    hidden, weight, b, labels = _lce_inputs(bias=True)
    labels[:] = -100
    loss, grads = _run(linear_cross_entropy, hidden, weight, b, labels, reduction=reduction)
    assert torch.isfinite(loss).all() and torch.all(loss == 0)
    for g in grads:
        assert torch.all(g == 0)


def test_linear_ce_float64_and_gradcheck():
    hidden, weight, b, labels = _lce_inputs(n=6, h=5, v=7, dtype=torch.float64, bias=True, ignore_every=3)
    for reduction in ("mean", "sum", "none"):
        ref_loss, ref_grads = _run(
            linear_cross_entropy_reference, hidden, weight, b, labels, reduction=reduction
        )
        loss, grads = _run(linear_cross_entropy, hidden, weight, b, labels, reduction=reduction, chunk_size=2)
        torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)

        def fn(h, w, bb, reduction=reduction):
            return linear_cross_entropy(
                h, w, labels, bias=bb, label_smoothing=0.1, reduction=reduction, chunk_size=2
            )

        assert torch.autograd.gradcheck(fn, (hidden, weight, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_linear_ce_bf16_close_to_fp32_reference(label_smoothing):
    # bf16 inputs, fp32 softmax/accumulation; compared with the fp32 reference on the same
    # (bf16-representable) values: 1e-2 relative (to the largest entry) on loss and grads.
    hidden, weight, b, labels = _lce_inputs(n=64, h=32, v=301, dtype=torch.bfloat16, bias=True)
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (hidden, weight, b))
    kw = dict(label_smoothing=label_smoothing)
    ref_loss, ref_grads = _run(linear_cross_entropy_reference, h32, w32, b32, labels, **kw)
    loss, grads = _run(linear_cross_entropy, hidden, weight, b, labels, chunk_size=16, **kw)
    assert loss.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    assert abs(loss.float() - ref_loss).item() <= 1e-2 * abs(ref_loss).item()
    for g, r in zip(grads, ref_grads):
        err = (g.float() - r).abs().max().item()
        assert err <= 1e-2 * r.abs().max().item(), err


def test_linear_ce_grad_output_scaling_and_partial_requires_grad():
    hidden, weight, _, labels = _lce_inputs()
    _, (gh1, gw1) = _run(linear_cross_entropy, hidden, weight, None, labels, grad_scale=torch.tensor(1.0))
    _, (gh3, gw3) = _run(linear_cross_entropy, hidden, weight, None, labels, grad_scale=torch.tensor(3.0))
    torch.testing.assert_close(gh3, 3 * gh1)
    torch.testing.assert_close(gw3, 3 * gw1)
    # weight only (frozen hidden states), and no-grad evaluation
    h = hidden.detach()
    weight.grad = None
    linear_cross_entropy(h, weight, labels).backward()
    torch.testing.assert_close(weight.grad, gw1)
    # a second backward through a retained graph recomputes instead of reusing consumed buffers
    loss = linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight), grad_outputs=torch.tensor(2.0))
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        val = linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(val, linear_cross_entropy_reference(hidden, weight, labels).detach())


def test_linear_ce_rejects_bad_inputs():
    hidden, weight, _, labels = _lce_inputs()
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_cross_entropy(hidden[:, :5], weight, labels)
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    bad = labels.clone()
    bad[1] = weight.shape[0]
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="needs CUDA"):
        linear_cross_entropy(hidden, weight, labels, backend="triton")


def test_linear_ce_dispatch(monkeypatch):
    monkeypatch.delenv("RAGDIST_LINEAR_CE_BACKEND", raising=False)
    assert fused_linear_ce_available("cpu") == "torch-chunked"
    assert fused_linear_ce_available(torch.device("cpu")) == "torch-chunked"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fused_linear_ce_available("cuda") == "torch-chunked"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lce_mod, "_liger_loss_cls", lambda: object)
    monkeypatch.setattr(triton_linear_ce, "triton_available", lambda: True)
    assert fused_linear_ce_available("cuda") == "liger"
    assert fused_linear_ce_available("cpu") == "torch-chunked"
    monkeypatch.setattr(lce_mod, "_liger_loss_cls", lambda: None)
    assert fused_linear_ce_available("cuda:0") == "triton"
    monkeypatch.setattr(triton_linear_ce, "triton_available", lambda: False)
    assert fused_linear_ce_available("cuda") == "torch-chunked"
    monkeypatch.setenv("RAGDIST_LINEAR_CE_BACKEND", "triton")
    assert fused_linear_ce_available("cuda") == "triton"
    assert fused_linear_ce_available("cpu") == "torch-chunked"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch-chunked", "triton", "liger"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_linear_ce_cuda_matches_reference(backend, label_smoothing):
    if backend == "triton" and not triton_linear_ce.triton_available():
        pytest.skip("triton not installed")
    if backend == "liger" and lce_mod._liger_loss_cls() is None:
        pytest.skip("liger-kernel not installed")
    hidden, weight, b, labels = _lce_inputs(n=300, h=64, v=5003, bias=backend != "liger")
    cuda = [None if t is None else t.detach().cuda().requires_grad_() for t in (hidden, weight, b)]
    labels = labels.cuda()
    kw = dict(label_smoothing=label_smoothing)
    ref_loss, ref_grads = _run(
        linear_cross_entropy_reference, *cuda, labels, grad_scale=torch.tensor(1.0), **kw
    )
    loss, grads = _run(
        linear_cross_entropy,
        *cuda,
        labels,
        grad_scale=torch.tensor(1.0),
        backend=backend,
        chunk_size=128,
        **kw,
    )
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_topk_module_constants():
    assert FAISS_IP_PAD_SCORE == float(np.finfo(np.float32).min)
    assert topk_mod.PAD_ID == -1
