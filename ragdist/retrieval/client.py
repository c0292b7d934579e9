"""The retrieval client under its original names: `RetrievalClient` is the `ShardedRetriever` with the
service's admin verbs (load, canary, promote, rollback, update, …) on the same routing table.

New code imports from the modules themselves: api (Retriever, SearchResult), config, retriever,
admin, transport, view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ragdist.retrieval.admin import ServiceAdmin, start_service, stop_service
from ragdist.retrieval.api import Retriever, SearchResult
from ragdist.retrieval.config import (
    MODES,
    AutoModeConfig,
    HybridConfig,
    RerankConfig,
    RetrievalConfig,
    controller_name,
    retrieval_mode,
    validate_config,
)
from ragdist.retrieval.metrics import flat_metrics
from ragdist.retrieval.retriever import ShardedRetriever, normalize_query, rrf_fuse
from ragdist.retrieval.transport import merge_topk

__all__ = [
    "MODES",
    "AutoModeConfig",
    "retrieval_mode",
    "HybridConfig",
    "RerankConfig",
    "RetrievalClient",
    "RetrievalConfig",
    "Retriever",
    "SearchResult",
    "ServiceAdmin",
    "ShardedRetriever",
    "controller_name",
    "flat_metrics",
    "merge_topk",
    "normalize_query",
    "rrf_fuse",
    "start_service",
    "stop_service",
    "validate_config",
]


class RetrievalClient(ShardedRetriever):
    """A `ShardedRetriever` that can also run the service (`ServiceAdmin`'s verbs)."""

    def __init__(self, cfg: RetrievalConfig, embedder: Any | None = None):
        super().__init__(cfg, embedder)
        self.admin = ServiceAdmin(cfg, self.view)

    @property
    def primary(self) -> str:
        return self.view.primary

    @property
    def views(self) -> dict[str, dict[str, Any]]:
        """Each loaded version as the controller describes it (snapshot, dim, replicas' handles, …)."""
        return {vid: v.info for vid, v in self.view.versions.items()}

    def refresh(self) -> None:
        self.view.refresh()

    # ------------------------------------------------------------------ ServiceAdmin's verbs
    def load_version(self, snapshot: str, *, primary: bool = False) -> str:
        return self.admin.load_version(snapshot, primary=primary)

    def set_canary(self, version: str, fraction: float) -> None:
        self.admin.set_canary(version, fraction)

    def promote(self, version: str | None = None) -> str:
        return self.admin.promote(version)

    def rollback(self) -> str:
        return self.admin.rollback()

    def unload(self, version: str) -> None:
        self.admin.unload(version)

    def compact(self, version: str | None = None, *, promote: bool = True) -> dict[str, Any]:
        return self.admin.compact(version, promote=promote)

    def versions(self) -> dict[str, Any]:
        return self.admin.versions()

    def upsert(self, chunks: Sequence[Any], vectors: np.ndarray, **kw: Any) -> dict[str, Any]:
        return self.admin.upsert(chunks, vectors, **kw)

    def delete(self, ids: Sequence[str] = (), **kw: Any) -> dict[str, Any]:
        return self.admin.delete(ids, **kw)

    def update(self, **kw: Any) -> dict[str, Any]:
        return self.admin.update(**kw)
