"""Linear + cross-entropy without materialising the ``(N, V)`` logits.

``linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=..., label_smoothing=...,
reduction=...)`` but walks the non-ignored tokens in chunks of ``chunk_size`` rows.  For each chunk
it forms the logits (input dtype GEMM, fp32 softmax math), the per-token loss and, in the same
pass, the gradient of the loss w.r.t. the chunk's logits, which is immediately contracted into
``grad_hidden`` (rows of the chunk) and accumulated into ``grad_weight`` / ``grad_bias`` (fp32
buffers).  Only those gradients are kept for backward, which just scales them by
``grad_output``; peak extra memory is one ``(chunk, V)`` block plus the gradient buffers.
``reduction="none"`` cannot pre-scale the gradients, so it stores nothing and recomputes the
chunks in backward with the per-token ``grad_output``.

Semantics follow ``torch.nn.functional.cross_entropy``: the target distribution is
``(1 - eps) * onehot + eps / V``, ignored rows contribute neither loss nor gradient, and ``mean``
divides by the number of non-ignored tokens.  One deliberate difference: when every token is
ignored, ``mean`` returns 0 (with zero gradients) instead of NaN.

Backends (:func:`fused_linear_ce_available`): ``torch-chunked`` (any device), ``triton`` (CUDA;
the softmax/gradient pass of each chunk is a Triton kernel working in place on the logits) and
``liger`` (CUDA, when ``liger-kernel`` is installed).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import triton_linear_ce

#: Token rows per chunk.  Tuned on a 2-core AVX512 CPU for V=32000, H=512: 128 rows keep the
#: chunk's logits at 16 MB (peak memory ~0.22x the naive path) while the three GEMMs per chunk
#: stay efficient; see bench/linear_ce.py.
DEFAULT_CHUNK_SIZE = 128
_CUDA_CHUNK_SIZE = 4096

_REDUCTIONS = ("mean", "sum", "none")


@functools.lru_cache(maxsize=1)
def _liger_loss_cls():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearCrossEntropyLoss


def fused_linear_ce_available(device) -> str:
    """Backend for ``device``: ``"liger"``, ``"triton"`` or ``"torch-chunked"``.

    CUDA devices use liger-kernel's fused linear cross-entropy when it imports, else the Triton
    kernel when Triton (>= 3.0) imports, else the torch chunked path; every other device uses
    ``torch-chunked``.  ``RAGDIST_LINEAR_CE_BACKEND`` forces one of the three names.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    forced = os.environ.get("RAGDIST_LINEAR_CE_BACKEND", "").strip().lower()
    on_cuda = dev.type == "cuda" and torch.cuda.is_available()
    if forced:
        if forced not in ("liger", "triton", "torch-chunked"):
            raise ValueError(f"RAGDIST_LINEAR_CE_BACKEND={forced!r}: use liger, triton or torch-chunked")
        if forced != "torch-chunked" and not on_cuda:
            return "torch-chunked"
        return forced
    if not on_cuda:
        return "torch-chunked"
    if _liger_loss_cls() is not None:
        return "liger"
    if triton_linear_ce.triton_available():
        return "triton"
    return "torch-chunked"


# --------------------------------------------------------------------------------------------
# chunk kernels


def _ce_rows_torch(
    logits: torch.Tensor, y: torch.Tensor, eps: float, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses of a ``(c, V)`` compute-dtype logits block and, if ``want_grad``, the
    (unscaled) gradient ``softmax - (1 - eps) * onehot - eps / V`` w.r.t. the logits.

    Same formula as ``F.cross_entropy``: ``-(1 - eps) * logp[y] - eps / V * sum(logp)``.  On CPU
    the block is overwritten in place (log-softmax, then its exp), so no second ``(c, V)`` buffer
    and only a few passes over the block; the CPU log-softmax kernel reads each row before
    writing it, which makes ``out=`` aliasing its input safe.
    """
    vocab = logits.shape[1]
    if logits.device.type == "cpu":
        logp = torch.log_softmax(logits, dim=1, out=logits)
    else:
        logp = torch.log_softmax(logits, dim=1)
    lpy = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    if eps > 0.0:
        loss = -(1.0 - eps) * lpy - (eps / vocab) * logp.sum(dim=1)
    else:
        loss = -lpy
    if not want_grad:
        return loss, None
    g = logp.exp_()
    if eps > 0.0:
        g.sub_(eps / vocab)
    g.scatter_add_(1, y.unsqueeze(1), torch.full((g.shape[0], 1), eps - 1.0, dtype=g.dtype, device=g.device))
    return loss, g


def _process(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor | None,
    eps: float,
    chunk: int,
    use_triton: bool,
    scale: torch.Tensor | None,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None,
) -> torch.Tensor:
    """Chunked pass over the selected rows; returns per-row losses in the compute dtype.

    ``rows`` (None = all rows) lists the non-ignored rows and ``labels`` their targets.
    With ``grads = (grad_h, grad_w, grad_b)`` (any may be None) the gradients are accumulated,
    each row weighted by ``scale`` (a tensor of shape (n,) or (), None = 1).

    Row selection and scaling happen once, outside the chunk loop, so each chunk is just the
    logits GEMM, the in-place softmax pass and the two gradient GEMMs (few parallel regions per
    chunk, which matters on small, shared CPUs).
    """
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = labels.shape[0]
    losses = torch.empty(n, dtype=cdt, device=hidden.device)
    wt = weight.t()
    b = None if bias is None else bias.to(hidden.dtype)
    grad_h, grad_w, grad_b = grads if grads is not None else (None, None, None)
    want_grad = grads is not None
    h_all = hidden if rows is None else hidden.index_select(0, rows)
    h_w = h_all  # rows as they enter grad_weight, pre-multiplied by their scale
    row_scale = None  # (n, 1) per-row scale, or a 0-d scale
    if want_grad and scale is not None:
        row_scale = scale.unsqueeze(1) if scale.dim() else scale
        if grad_w is not None:
            h_w = h_all * row_scale.to(h_all.dtype)
    gh_all = None
    if grad_h is not None:
        gh_all = grad_h if rows is None else torch.empty_like(h_all)
    b_scale = None
    if grad_b is not None and scale is not None and scale.dim():
        b_scale = scale.to(grad_b.dtype)
    for s0 in range(0, n, chunk):
        s1 = min(s0 + chunk, n)
        h = h_all[s0:s1]
        y = labels[s0:s1]
        logits = torch.mm(h, wt) if b is None else torch.addmm(b, h, wt)
        if use_triton:
            loss, g = triton_linear_ce.ce_loss_and_grad_inplace(
                logits, y, eps, torch.ones((), device=logits.device) if want_grad else None
            )
        else:
            if logits.dtype != cdt:
                logits = logits.to(cdt)
            loss, g = _ce_rows_torch(logits, y, eps, want_grad)
        losses[s0:s1] = loss
        if not want_grad:
            del logits, g  # free this chunk's block before the next one is allocated
            continue
        gd = g if g.dtype == hidden.dtype else g.to(hidden.dtype)
        if gh_all is not None:
            torch.mm(gd, weight, out=gh_all[s0:s1])
        if grad_w is not None:
            if grad_w.dtype == gd.dtype:
                grad_w.addmm_(gd.t(), h_w[s0:s1])
            else:
                grad_w.add_(torch.mm(gd.t(), h_w[s0:s1]))
        if grad_b is not None:
            gf = g if g.dtype == grad_b.dtype else g.to(grad_b.dtype)
            if b_scale is None:
                grad_b.add_(gf.sum(0))
            else:
                grad_b.addmv_(gf.t(), b_scale[s0:s1])
        del logits, g, gd
    if want_grad:
        if gh_all is not None:
            if row_scale is not None:
                gh_all.mul_(row_scale.to(gh_all.dtype))
            if rows is not None:
                grad_h.index_copy_(0, rows, gh_all)
        if grad_b is not None and scale is not None and not scale.dim():
            grad_b.mul_(scale.to(grad_b.dtype))
    return losses


def _grad_buffers(hidden, weight, bias, needs, cdt):
    need_h, need_w, need_b = needs
    return (
        torch.zeros_like(hidden) if need_h else None,
        torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None,
        torch.zeros(weight.shape[0], dtype=cdt, device=weight.device)
        if (need_b and bias is not None)
        else None,
    )


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk, use_triton
    ):
        n_tok = hidden.shape[0]
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        valid = labels != ignore_index
        n_valid = int(valid.sum())
        if n_valid == n_tok:
            rows, sel = None, labels
        else:
            rows = valid.nonzero().squeeze(1)
            sel = labels.index_select(0, rows)
        if n_valid:
            lo, hi = int(sel.min()), int(sel.max())
            if lo < 0 or hi >= weight.shape[0]:
                raise ValueError(
                    f"labels must be in [0, {weight.shape[0]}) or ignore_index, got range [{lo}, {hi}]"
                )
        ctx.reduction = reduction
        ctx.meta = (label_smoothing, chunk, use_triton, n_valid, cdt)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        # Inputs only (no extra memory): lets backward recompute when the precomputed gradients
        # are unavailable (reduction="none", or a second backward through a retained graph).
        ctx.save_for_backward(hidden, weight, bias, sel, rows)
        # Precomputed gradients are a plain attribute, not saved tensors: backward hands them to
        # autograd and drops ctx's reference, so AccumulateGrad adopts the V x H buffer instead of
        # cloning it (a saved tensor would keep a second reference alive).  They carry no autograd
        # history, so this creates no reference cycle.
        ctx.grads = None

        if reduction == "none":
            out = torch.zeros(n_tok, dtype=cdt, device=hidden.device)
            if n_valid:
                losses = _process(
                    hidden, weight, bias, sel, rows, label_smoothing, chunk, use_triton, None, None
                )
                if rows is None:
                    out.copy_(losses)
                else:
                    out.index_copy_(0, rows, losses)
            return out.to(hidden.dtype)

        needs = tuple(ctx.needs_input_grad[:3])
        grads = _grad_buffers(hidden, weight, bias, needs, cdt) if any(needs) else None
        scale = None
        if reduction == "mean" and n_valid > 1:
            scale = torch.tensor(1.0 / n_valid, dtype=cdt, device=hidden.device)
        if n_valid:
            losses = _process(
                hidden, weight, bias, sel, rows, label_smoothing, chunk, use_triton, scale, grads
            )
            total = losses.sum()
            if reduction == "mean":
                total = total / n_valid
        else:
            total = torch.zeros((), dtype=cdt, device=hidden.device)
        ctx.grads = grads
        return total.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        h_dt, w_dt, b_dt = ctx.dtypes
        grads, ctx.grads = ctx.grads, None
        if grads is not None:
            gh, gw, gb = grads
            del grads
            if not bool(torch.all(grad_out == 1)):
                gh = None if gh is None else gh * grad_out.to(gh.dtype)
                gw = None if gw is None else gw * grad_out.to(gw.dtype)
                gb = None if gb is None else gb * grad_out.to(gb.dtype)
        else:
            hidden, weight, bias, sel, rows = ctx.saved_tensors
            eps, chunk, use_triton, n_valid, cdt = ctx.meta
            gh, gw, gb = _grad_buffers(hidden, weight, bias, ctx.needs_input_grad[:3], cdt)
            g = grad_out.to(cdt)
            if ctx.reduction == "none":
                scale = (g if rows is None else g.index_select(0, rows)).contiguous()
            else:
                scale = g / n_valid if ctx.reduction == "mean" and n_valid else g
            if n_valid:
                _process(hidden, weight, bias, sel, rows, eps, chunk, use_triton, scale, (gh, gw, gb))
        if gh is not None and gh.dtype != h_dt:
            gh = gh.to(h_dt)
        if gw is not None and gw.dtype != w_dt:
            gw = gw.to(w_dt)
        if gb is not None and gb.dtype != b_dt:
            gb = gb.to(b_dt)
        return gh, gw, gb, None, None, None, None, None, None


def _liger_loss(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction):
    cls = _liger_loss_cls()
    loss_fn = cls(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    out = loss_fn(weight, hidden, labels, bias)
    return out[0] if isinstance(out, tuple) else out


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the logits.

    ``hidden`` (N, H), ``weight`` (V, H), ``labels`` (N,) int64, optional ``bias`` (V,).  fp32,
    bf16 (fp32 softmax math and gradient accumulation, gradients returned in the input dtype)
    and fp64 are supported.  ``backend``: ``"auto"`` (see :func:`fused_linear_ce_available`),
    ``"torch-chunked"``, ``"triton"`` or ``"liger"``.
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden has H={hidden.shape[1]}, weight has H={weight.shape[1]}"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be (N,) with N={hidden.shape[0]}, got {tuple(labels.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) with V={weight.shape[0]}, got {tuple(bias.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    chosen = fused_linear_ce_available(hidden.device) if backend == "auto" else backend
    if chosen not in ("torch-chunked", "triton", "liger"):
        raise ValueError(f"unknown backend {backend!r}")
    if chosen != "torch-chunked" and not hidden.is_cuda:
        raise ValueError(f"backend {chosen!r} needs CUDA tensors")
    labels = labels.to(torch.int64)
    if chosen == "triton" and hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        chosen = "torch-chunked"  # the kernel computes in fp32; keep fp64 exact
    if chosen == "liger" and reduction != "none" and bool((labels != ignore_index).any()):
        return _liger_loss(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction)
    chunk = int(chunk_size or (_CUDA_CHUNK_SIZE if hidden.is_cuda else DEFAULT_CHUNK_SIZE))
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        bias,
        labels,
        int(ignore_index),
        float(label_smoothing),
        reduction,
        chunk,
        chosen == "triton",
    )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Naive reference: materialise the logits and call ``F.cross_entropy``."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(
        logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )
