"""Triton path for the chunked linear + cross-entropy on CUDA.

The token chunk's logits ``h @ Wᵀ`` come from cuBLAS; one Triton program per row then walks the
vocabulary in ``BLOCK_V`` slices twice: an online max / sum-exp pass (plus the logit sum needed
by label smoothing), and a pass that overwrites the logits in place with the scaled gradient
``scale * (softmax - (1 - eps) * onehot - eps / V)``.  The chunk's logits buffer is therefore the
only ``(chunk, V)`` tensor alive, and the grads of hidden / weight are two more GEMMs on it.

Triton is imported lazily (see :func:`ragdist.kernels.triton_topk.triton_available`).
"""

from __future__ import annotations

import functools

import torch

from .triton_topk import triton_available

__all__ = ["triton_available", "ce_loss_and_grad_inplace"]


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_fwd_bwd(
        LOGITS,
        stride_row,
        LABELS,
        LOSS,
        SCALE,
        V,
        eps,
        HAS_SCALE_VEC: tl.constexpr,
        SMOOTH: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        y = tl.load(LABELS + row).to(tl.int64)
        m = float("-inf")
        s = 0.0
        zsum = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            ok = offs < V
            z = tl.load(base + offs, mask=ok, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
            m = new_m
            if SMOOTH:
                zsum += tl.sum(tl.where(ok, z, 0.0), axis=0)
        lse = m + tl.log(s)
        zy = tl.load(base + y).to(tl.float32)
        if SMOOTH:
            loss = lse - (1.0 - eps) * zy - (eps / V) * zsum
        else:
            loss = lse - zy
        tl.store(LOSS + row, loss)
        if WRITE_GRAD:
            if HAS_SCALE_VEC:
                scale = tl.load(SCALE + row).to(tl.float32)
            else:
                scale = tl.load(SCALE).to(tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                ok = offs < V
                z = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
                g = tl.exp(z - lse)
                if SMOOTH:
                    g = g - eps / V
                g = tl.where(offs == y, g - (1.0 - eps), g) * scale
                tl.store(base + offs, g.to(LOGITS.dtype.element_ty), mask=ok)

    return _ce_fwd_bwd


def ce_loss_and_grad_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy losses (fp32) of a ``(rows, V)`` CUDA logits chunk.

    Returns ``(loss, grad)``.  When ``scale`` is given (a 0-d or per-row tensor) the logits are
    overwritten with the scaled gradient of the loss w.r.t. the logits and returned as ``grad``
    (the same storage unless the input had a non-unit column stride and had to be copied).
    All ``labels`` must be valid class ids.
    """
    if not triton_available():
        raise RuntimeError("triton is not available")
    import triton

    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss, logits
    write = scale is not None
    if scale is None:
        scale_t = torch.ones((), dtype=torch.float32, device=logits.device)
    else:
        scale_t = scale.to(device=logits.device, dtype=torch.float32).contiguous()
    block_v = min(triton.next_power_of_2(vocab), 4096)
    _kernel()[(rows,)](
        logits,
        logits.stride(0),
        labels.contiguous(),
        loss,
        scale_t,
        vocab,
        float(label_smoothing),
        HAS_SCALE_VEC=scale_t.dim() == 1,
        SMOOTH=label_smoothing > 0.0,
        WRITE_GRAD=write,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss, logits
