"""Work done once, on rank 0, that every rank depends on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from ragdist.errors import RagdistError

T = TypeVar("T")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (picklable, small)."""
    if _world() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn: Callable[[], T], *, what: str) -> T | None:
    """Run `fn` on rank 0 and share its outcome: its result on every rank, or its error raised on
    every rank (a bare barrier after a failure would leave the other ranks waiting forever).

    Only `RagdistError`s carry their message across; any other exception is named by type and text.
    """
    result: Any = None
    err: str | None = None
    if _world() == 1 or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            err = str(e) if isinstance(e, RagdistError) else f"{type(e).__name__}: {e}"
            if _world() == 1:
                raise
    ok, payload = broadcast_object((err is None, result if err is None else err))
    if not ok:
        raise RagdistError(f"rank 0 could not {what}: {payload}")
    return payload
