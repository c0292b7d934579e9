"""Compute kernels: exact inner-product top-k (Flat index shards) and chunked linear + cross-entropy.

Each kernel has a torch reference path that runs everywhere, a Triton path for CUDA (imported
lazily; Triton is optional) and a dispatch function choosing between them.  See
``kernels/README.md`` at the repository root for the dispatch rules and measured figures.
"""

from .linear_ce import (
    fused_linear_ce_available,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from .topk import (
    FAISS_IP_PAD_SCORE,
    TopKConfig,
    TorchFlatIP,
    exact_topk_ip,
    scan_kernel,
    select_backend,
)
from .triton_topk import triton_available

__all__ = [
    "FAISS_IP_PAD_SCORE",
    "TopKConfig",
    "TorchFlatIP",
    "exact_topk_ip",
    "fused_linear_ce_available",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "scan_kernel",
    "select_backend",
    "triton_available",
]
