"""Exact inner-product top-k: the hot loop of a Flat index shard.

The database is streamed in row blocks: ``S = Q @ X[block]ᵀ`` is written into one pre-allocated
``(nq, block)`` buffer, ``torch.topk`` keeps the block's best candidates, and a running ``(nq, kk)``
best list is merged with ``cat + topk``.  The ``nq x nb`` score matrix is never materialised.

Database dtypes
---------------
``fp32``
    Scores are plain fp32 GEMM results; same ids and scores (to fp32 rounding) as
    ``faiss.IndexFlatIP``.
``bf16``
    The scan runs on a bf16 copy of the database (half the bytes to stream, and the bf16 GEMM is
    several times faster than fp32 on CPUs with AVX512-BF16/AMX and on GPUs) and keeps
    ``kk = k + max(k, 16)`` candidates per query.  When the fp32 vectors are available the
    candidates are re-scored exactly in fp32 and the best ``k`` returned, so scores are exact fp32
    inner products and ids only differ from the fp32 scan when a true top-k item loses more than
    the candidate margin to bf16 rounding (none on the benchmark and test sets).  Without the fp32
    vectors the scores are fp32 inner products with the bf16-rounded database.

Padding follows FAISS: when ``k > nb`` the missing slots hold score ``-3.4028235e38`` (``-FLT_MAX``)
and id ``-1``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import triton_topk

#: FAISS's filler score for missing results of a max-inner-product search (``-FLT_MAX``).
FAISS_IP_PAD_SCORE = float(np.finfo(np.float32).min)
#: FAISS's filler id for missing results.
PAD_ID = -1

#: Default database rows per block, per database dtype and device.  Tuned on a 2-core AVX512
#: CPU (200k x 384, k=10): larger blocks amortise torch.topk's per-call, per-row cost; the
#: score buffer is capped separately by ``_SCORE_BUFFER_BYTES``.
_DEFAULT_BLOCK = {
    ("cpu", "fp32"): 16384,
    ("cpu", "bf16"): 32768,
    ("cuda", "fp32"): 65536,
    ("cuda", "bf16"): 65536,
}
#: Upper bound on the (query chunk x block) score buffer.
_SCORE_BUFFER_BYTES = 128 << 20

#: Largest query batch the Triton scan takes when the backend is chosen automatically; larger
#: batches go to torch's GEMM + topk on the GPU.  Measured on an H100 (1M x 384 database, k=10,
#: bench/search.py --gpu-only, two runs), Triton vs torch: bf16 database 3.3x and 2.8x at 16 queries,
#: 2.4x at 64, 1.16x and 0.88x at 256, 0.67x at 512, 0.59x at 1024; fp32 database 0.86x and 1.29x at
#: 16, 1.38x at 64, 0.77x and 0.76x at 256, 0.65-0.69x from 512 on.
#: ``device="triton"`` (or ``RAGDIST_TOPK_BACKEND=triton``) runs Triton for every batch.
TRITON_MAX_QUERIES = 128

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TopKConfig:
    """Knobs of :func:`exact_topk_ip` / :class:`TorchFlatIP`.

    ``block_size=0`` and ``threads=0`` mean "tuned default" and "torch's current setting";
    ``db_dtype`` is ``"fp32"`` (exact) or ``"bf16"`` (bf16 scan + fp32 re-scoring);
    ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    block_size: int = 0
    threads: int = 0
    db_dtype: str = "fp32"
    device: str = "auto"


def _preference(device_pref: str) -> str:
    """The device preference as asked: ``auto`` resolved through ``RAGDIST_TOPK_BACKEND``."""
    pref = (device_pref or "auto").lower()
    if pref == "auto":
        pref = os.environ.get("RAGDIST_TOPK_BACKEND", "auto").lower() or "auto"
    return pref


def select_backend(device_pref: str = "auto") -> str:
    """Pick the top-k implementation: ``"triton"``, ``"torch-cuda"`` or ``"torch-cpu"``.

    ``auto`` uses CUDA when ``torch.cuda.is_available()`` (Triton when it also imports, else torch
    on CUDA) and the CPU otherwise.  ``cpu`` forces the CPU path; ``cuda`` requires a GPU and
    raises ``RuntimeError`` without one.  The backend names themselves are accepted too.
    The environment variable ``RAGDIST_TOPK_BACKEND`` overrides ``auto``.
    """
    pref = _preference(device_pref)
    if pref in ("cpu", "torch-cpu"):
        return "torch-cpu"
    if pref not in ("auto", "cuda", "triton", "torch-cuda"):
        raise ValueError(f"unknown device preference {device_pref!r}; use auto, cpu or cuda")
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        if pref == "auto":
            return "torch-cpu"
        raise RuntimeError(f"device preference {device_pref!r} needs CUDA, which is not available")
    if pref == "torch-cuda":
        return "torch-cuda"
    if triton_topk.triton_available():
        return "triton"
    if pref == "triton":
        raise RuntimeError("triton backend requested but triton does not import")
    return "torch-cuda"


# --------------------------------------------------------------------------------------------
# input handling


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    # One cheap reduction first: a finite sum implies finite entries (NaN/inf propagate); only
    # a non-finite sum (bad entries, or overflow of huge finite ones) pays for the full check.
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_queries(q: torch.Tensor, d: int) -> None:
    if q.shape[1] != d:
        raise ValueError(f"dimension mismatch: queries have d={q.shape[1]}, database has d={d}")
    if not _all_finite(q):
        raise ValueError("queries contain NaN or infinite values")


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if not threads or threads <= 0 or threads == torch.get_num_threads():
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _candidates(k: int, bf16: bool) -> int:
    return k + max(k, 16) if bf16 else k


# --------------------------------------------------------------------------------------------
# core scan


def _scratch_buffer(
    scratch: dict | None, numel: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Flat score buffer; reused across calls when the caller keeps a ``scratch`` dict (large
    fresh allocations are mmap'ed and page-faulted on every call otherwise)."""
    if scratch is None:
        return torch.empty(numel, dtype=dtype, device=device)
    buf = scratch.get("scores")
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        scratch.pop("scores", None)
        buf = scratch["scores"] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _scan_torch(
    q: torch.Tensor, db: torch.Tensor, kk: int, block: int, scratch: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-``kk`` of ``q @ db.T`` over row blocks; ``q`` already has ``db``'s dtype/device.

    Returns (scores in db dtype, int64 ids), both (nq, min(kk, nb)), sorted descending.
    """
    nq = q.shape[0]
    nb = db.shape[0]
    kk = min(kk, nb)
    block = max(1, min(block, nb))
    flat = _scratch_buffer(scratch, nq * block, db.dtype, db.device)
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, nb, block):
        stop = min(start + block, nb)
        n = stop - start
        scores = flat[: nq * n].view(nq, n)
        torch.mm(q, db[start:stop].T, out=scores)
        v, i = torch.topk(scores, min(kk, n), dim=1)
        if start:
            i += start
        if best_v is None:
            best_v, best_i = v, i
        else:
            cv = torch.cat((best_v, v), dim=1)
            ci = torch.cat((best_i, i), dim=1)
            best_v, pos = torch.topk(cv, kk, dim=1)
            best_i = torch.gather(ci, 1, pos)
    assert best_v is not None and best_i is not None
    return best_v, best_i


def _scan_triton(q: torch.Tensor, db: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = db.shape[0]
    kk = min(kk, nb)
    step = triton_topk.rows_per_launch(q.shape[0], kk)
    best_v = best_i = None
    for start in range(0, nb, step):
        v, i = triton_topk.tile_topk_ip(q, db[start : start + step], kk, id_offset=start)
        if best_v is None:
            best_v, best_i = v, i
        else:
            best_v, pos = torch.topk(torch.cat((best_v, v), 1), kk, dim=1)
            best_i = torch.gather(torch.cat((best_i, i), 1), 1, pos)
    assert best_v is not None and best_i is not None
    return best_v, best_i


def _rescore(
    q32: torch.Tensor, vecs: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 scores of candidate ``ids`` (rows of ``vecs``); best ``k`` of them."""
    cand = vecs.index_select(0, ids.reshape(-1)).view(ids.shape[0], ids.shape[1], -1).float()
    scores = torch.bmm(cand, q32.unsqueeze(2)).squeeze(2)
    kk = min(k, ids.shape[1])
    v, pos = torch.topk(scores, kk, dim=1)
    return v, torch.gather(ids, 1, pos)


def _search(
    q32: torch.Tensor,
    scan_db: torch.Tensor,
    exact_db: torch.Tensor | None,
    k: int,
    *,
    block_size: int | None,
    backend: str,
    scratch: dict | None = None,
    triton_always: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on resident tensors; returns padded (nq, k) fp32 scores and int64 ids (on device)."""
    nq = q32.shape[0]
    nb = scan_db.shape[0]
    dev = scan_db.device
    out_v = torch.full((nq, k), FAISS_IP_PAD_SCORE, dtype=torch.float32, device=dev)
    out_i = torch.full((nq, k), PAD_ID, dtype=torch.int64, device=dev)
    if nq == 0 or nb == 0:
        return out_v, out_i
    bf16 = scan_db.dtype == torch.bfloat16
    kk = min(_candidates(k, bf16), nb)
    dkey = ("cuda" if dev.type == "cuda" else "cpu", "bf16" if bf16 else "fp32")
    block = block_size or _DEFAULT_BLOCK[dkey]
    itemsize = scan_db.element_size()
    qchunk = max(1, min(nq, _SCORE_BUFFER_BYTES // (itemsize * min(block, nb))))
    dtype_name = "bf16" if bf16 else "fp32"
    for s in range(0, nq, qchunk):
        qc = q32[s : s + qchunk]
        qx = qc if not bf16 else qc.to(torch.bfloat16)
        if scan_kernel(backend, qc.shape[0], k, dtype_name, forced=triton_always) == "triton":
            v, i = _scan_triton(qx.contiguous(), scan_db, kk)
        else:
            v, i = _scan_torch(qx, scan_db, kk, block, scratch)
        if bf16:
            v, i = _rescore(qc, exact_db if exact_db is not None else scan_db, i, k)
        else:
            v = v.float()
            v, i = v[:, :k], i[:, :k]
        n = v.shape[1]
        out_v[s : s + qchunk, :n] = v
        out_i[s : s + qchunk, :n] = i
    return out_v, out_i


def triton_forced(device_pref: str = "auto") -> bool:
    """Whether ``device_pref`` (or, for ``auto``, ``RAGDIST_TOPK_BACKEND``) asks for Triton on every batch."""
    return _preference(device_pref) == "triton"


def scan_kernel(backend: str, nq: int, k: int, db_dtype: str, *, forced: bool = False) -> str:
    """Which scan a batch of ``nq`` queries runs on: ``"triton"`` or ``"torch"``.

    Triton when the backend is ``triton`` and the candidates fit one tile, and then only where it was
    measured faster (at most ``TRITON_MAX_QUERIES`` queries) unless ``forced``.
    """
    if backend != "triton" or _candidates(k, db_dtype == "bf16") > triton_topk.MAX_TILE_K:
        return "torch"
    return "triton" if forced or nq <= TRITON_MAX_QUERIES else "torch"


def _resolve_device(backend: str) -> torch.device:
    return torch.device("cuda") if backend in ("triton", "torch-cuda") else torch.device("cpu")


def exact_topk_ip(
    queries,
    database,
    k: int,
    *,
    block_size: int | None = None,
    threads: int | None = None,
    db_dtype: str = "fp32",
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact max-inner-product top-``k`` of ``queries`` (nq, d) against ``database`` (nb, d).

    Both may be numpy arrays or torch tensors; a torch ``database`` is used where it lives (keep
    it resident to avoid copies).  Returns ``(D, I)``: float32 (nq, k) scores sorted descending and
    int64 (nq, k) ids, padded FAISS-style (``-FLT_MAX`` / ``-1``) when ``k > nb``.

    ``db_dtype="bf16"`` scans a bf16 copy and re-scores ``k + max(k, 16)`` candidates in fp32 from
    ``database`` (see module docs); a bf16 ``database`` tensor is scanned as is.  ``device`` is
    ``auto``/``cpu``/``cuda``; a CUDA ``database`` tensor selects CUDA.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if db_dtype not in _DTYPES:
        raise ValueError(f"db_dtype must be 'fp32' or 'bf16', got {db_dtype!r}")
    db = _as_tensor(database, "database")
    q = _as_tensor(queries, "queries")
    _check_queries(q, db.shape[1])
    if device == "auto" and db.is_cuda:
        device = "cuda"
    backend = select_backend(device)
    dev = _resolve_device(backend)
    with _num_threads(threads):
        exact: torch.Tensor | None
        if db.dtype == torch.bfloat16:
            scan, exact = db.to(dev), None
        else:
            exact = db.to(device=dev, dtype=torch.float32)
            scan = exact if db_dtype == "fp32" else exact.to(torch.bfloat16)
        q32 = q.to(device=dev, dtype=torch.float32)
        v, i = _search(q32, scan.contiguous(), exact, k, block_size=block_size, backend=backend,
                       triton_always=triton_forced(device))  # fmt: skip
    return v.cpu().numpy(), i.cpu().numpy()


class TorchFlatIP:
    """Exact inner-product index with FAISS-like ``add`` / ``search`` / ``reset`` / ``ntotal``.

    Vectors are appended to one contiguous resident tensor (grown geometrically).  With
    ``db_dtype="bf16"`` a bf16 copy is scanned and candidates are re-scored from the fp32
    vectors (``keep_fp32=True``, default: exact fp32 scores) or from the bf16 copy
    (``keep_fp32=False``: half the memory, scores of the bf16-rounded vectors).
    """

    def __init__(
        self,
        d: int,
        *,
        db_dtype: str = "fp32",
        device: str = "auto",
        block_size: int = 0,
        threads: int = 0,
        keep_fp32: bool = True,
        config: TopKConfig | None = None,
    ) -> None:
        if config is not None:
            db_dtype, device, block_size, threads = (
                config.db_dtype,
                config.device,
                config.block_size,
                config.threads,
            )
        if int(d) <= 0:
            raise ValueError(f"d must be positive, got {d}")
        if db_dtype not in _DTYPES:
            raise ValueError(f"db_dtype must be 'fp32' or 'bf16', got {db_dtype!r}")
        self.d = int(d)
        self.db_dtype = db_dtype
        self.backend = select_backend(device)
        self.triton_always = triton_forced(device)
        self.device = _resolve_device(self.backend)
        self.block_size = int(block_size) or None
        self.threads = int(threads) or None
        self.keep_fp32 = bool(keep_fp32) or db_dtype == "fp32"
        self.metric = "ip"
        self._scratch: dict = {}
        self.reset()

    # FAISS-compatible surface -------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def is_trained(self) -> bool:
        return True

    def reset(self) -> None:
        """Drop all vectors (capacity is released too)."""
        self._n = 0
        self._bufs: dict[str, torch.Tensor] = {}
        if self.keep_fp32:
            self._bufs["fp32"] = torch.empty((0, self.d), dtype=torch.float32, device=self.device)
        if self.db_dtype == "bf16":
            self._bufs["bf16"] = torch.empty((0, self.d), dtype=torch.bfloat16, device=self.device)

    def _view(self, name: str) -> torch.Tensor | None:
        buf = self._bufs.get(name)
        return None if buf is None else buf[: self._n]

    def add(self, xb) -> None:
        """Append vectors (ids continue from ``ntotal``)."""
        x = _as_tensor(xb, "xb")
        if x.shape[1] != self.d:
            raise ValueError(f"dimension mismatch: index has d={self.d}, vectors have d={x.shape[1]}")
        if x.shape[0] == 0:
            return
        x = x.to(device=self.device, dtype=torch.float32)
        if not _all_finite(x):
            raise ValueError("vectors contain NaN or infinite values")
        n_new = self._n + x.shape[0]
        for name, buf in list(self._bufs.items()):
            if n_new > buf.shape[0]:
                # geometric growth keeps repeated add() calls amortised O(n)
                grown = torch.empty(
                    (max(n_new, buf.shape[0] * 3 // 2), self.d), dtype=buf.dtype, device=buf.device
                )
                grown[: self._n] = buf[: self._n]
                buf = self._bufs[name] = grown
            buf[self._n : n_new] = x
        self._n = n_new

    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(D, I)`` like ``faiss.IndexFlatIP.search``."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = _as_tensor(xq, "queries")
        _check_queries(q, self.d)
        q32 = q.to(device=self.device, dtype=torch.float32)
        exact = self._view("fp32")
        scan = self._view("bf16") if self.db_dtype == "bf16" else exact
        assert scan is not None
        with _num_threads(self.threads):
            v, i = _search(
                q32,
                scan,
                exact,
                int(k),
                block_size=self.block_size,
                backend=self.backend,
                scratch=self._scratch,
                triton_always=self.triton_always,
            )
        return v.cpu().numpy(), i.cpu().numpy()

    def reconstruct(self, key: int) -> np.ndarray:
        if not 0 <= key < self._n:
            raise IndexError(f"id {key} out of range [0, {self._n})")
        src = self._view("fp32") if "fp32" in self._bufs else self._view("bf16")
        assert src is not None
        return src[key].float().cpu().numpy()

    def memory_bytes(self) -> int:
        """Bytes held by the stored vectors (allocated capacity)."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (
            f"TorchFlatIP(d={self.d}, ntotal={self._n}, db_dtype={self.db_dtype!r}, backend={self.backend!r})"
        )
