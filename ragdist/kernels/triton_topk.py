"""Triton path for exact inner-product top-k on CUDA.

One program computes a ``BLOCK_M x BLOCK_N`` tile of ``Q @ Xᵀ`` in registers (fp32 accumulation;
``ieee`` precision for fp32 inputs, so no TF32 rounding) and extracts the tile's top-``K`` by ``K``
rounds of row-max + mask.  Only ``K`` candidates per tile reach global memory, never the score
matrix; the per-tile candidates of one launch are merged with ``torch.topk`` and launches over
database slices are merged by the caller's running merge.

Triton is imported lazily: this module is importable on machines without Triton or CUDA, and
:func:`triton_available` tells the dispatcher whether the path can be used.
"""

from __future__ import annotations

import functools

import torch

#: Largest per-tile k served by the kernel (K rounds of max/mask per tile); larger k falls back
#: to the torch-cuda path.
MAX_TILE_K = 64

_BLOCK_M = 64
_BLOCK_N = 128


@functools.lru_cache(maxsize=1)
def _import_triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return None
    return triton


def triton_available() -> bool:
    """True when Triton >= 3.0 imports (the kernels use ``tl.dot(..., input_precision=)``)."""
    triton = _import_triton()
    if triton is None:
        return False
    try:
        major = int(str(triton.__version__).split(".")[0])
    except (ValueError, AttributeError):
        return False
    return major >= 3


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _ip_tile_topk(
        Q,
        X,
        OUT_V,
        OUT_I,
        nq,
        nb,
        d,
        id_offset,
        stride_q,
        stride_x,
        stride_o,
        K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = rows < nq
        col_ok = cols < nb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < d
            q = tl.load(
                Q + rows.to(tl.int64)[:, None] * stride_q + dd[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            x = tl.load(
                X + cols.to(tl.int64)[:, None] * stride_x + dd[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if IEEE:
                acc = tl.dot(q, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(q, tl.trans(x), acc)
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        out_off = rows.to(tl.int64) * stride_o + pid_n * K
        for i in range(K):
            best = tl.max(acc, axis=1)
            arg = tl.argmax(acc, axis=1)
            col = pid_n * BLOCK_N + arg
            valid = best > float("-inf")
            gid = tl.where(valid, col.to(tl.int64) + id_offset, -1)
            tl.store(OUT_V + out_off + i, best, mask=row_ok)
            tl.store(OUT_I + out_off + i, gid, mask=row_ok)
            acc = tl.where(cols[None, :] == col[:, None], float("-inf"), acc)

    return _ip_tile_topk


def tile_topk_ip(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    *,
    id_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (fp32 scores, int64 ids) of ``queries @ database.T`` for one database slice.

    ``queries`` must already have the database dtype (fp32 or bf16) and both must be contiguous
    CUDA tensors; ``k <= MAX_TILE_K``.  Ids are offset by ``id_offset``.  Rows with fewer than
    ``k`` database entries come back padded with ``-inf`` / ``-1``.
    """
    if not triton_available():
        raise RuntimeError("triton is not available")
    if not (queries.is_cuda and database.is_cuda):
        raise ValueError("tile_topk_ip needs CUDA tensors")
    if k > MAX_TILE_K:
        raise ValueError(f"tile_topk_ip serves k <= {MAX_TILE_K}, got {k}")
    import triton

    queries = queries.contiguous()
    database = database.contiguous()
    nq, d = queries.shape
    nb = database.shape[0]
    n_tiles = triton.cdiv(nb, _BLOCK_N)
    out_v = torch.empty((nq, n_tiles * k), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((nq, n_tiles * k), dtype=torch.int64, device=queries.device)
    fp32 = database.dtype == torch.float32
    grid = (triton.cdiv(nq, _BLOCK_M), n_tiles)
    _kernel()[grid](
        queries,
        database,
        out_v,
        out_i,
        nq,
        nb,
        d,
        id_offset,
        queries.stride(0),
        database.stride(0),
        out_v.stride(0),
        K=k,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=32 if fp32 else 64,
        IEEE=fp32,
        num_warps=4,
    )
    kk = min(k, out_v.shape[1])
    vals, pos = torch.topk(out_v, kk, dim=1)
    ids = torch.gather(out_i, 1, pos)
    return vals, ids


def rows_per_launch(nq: int, k: int, budget_bytes: int = 256 << 20) -> int:
    """Database rows per launch so the (nq, tiles*k) candidate buffers stay under ``budget_bytes``."""
    per_tile = max(1, nq) * k * 12  # fp32 value + int64 id
    tiles = max(1, budget_bytes // per_tile)
    return int(tiles * _BLOCK_N)
