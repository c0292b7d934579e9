"""The one retrieval API every consumer asks: training, evaluation and joint training.

    class Retriever(Protocol):
        def retrieve(questions, k, version=None, vectors=None) -> list[list[passage dict]]
        version: str                                  # the index version served now

Implementations: `ragdist.retrieval.retriever.ShardedRetriever` (the Ray service; `RetrievalClient`
is its old name) and `ragdist.joint.refresh.IndexView` (joint training: pinned to the version every
rank serves this step). A passage dict has the snapshot row's keys: id, doc_id, text, title, source,
timestamp, meta (+ rerank_score when re-ranked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

Passage = dict[str, Any]


@runtime_checkable
class Retriever(Protocol):
    @property
    def version(self) -> str:
        """The index version that answers an unpinned call now."""
        ...

    def retrieve(
        self, questions: list[str], k: int, version: str | None = None, vectors: np.ndarray | None = None
    ) -> list[list[Passage]]:
        """The top-k passages of each question, best first.

        `version` pins a loaded index version (else the service routes: primary, or canary by share).
        `vectors` are the questions' query vectors when the caller computed them (a trainable query
        encoder): the retriever's own embedder is not called and its result cache is not used.
        """
        ...


@dataclass
class SearchResult:
    scores: np.ndarray  # (nq, k) float32, best first
    ids: np.ndarray  # (nq, k) int64 global row ids, -1 where fewer than k exist
    passages: list[list[Passage]]  # per query, the passages in rank order, each with its `score`
    partial: bool = False  # some shard answered from no replica: results cover the other shards only
    missing_shards: list[int] = field(default_factory=list)
    version: str = ""
    epoch: int = 0  # the update epoch every shard answered at
    lexical_ids: np.ndarray | None = None  # hybrid: BM25's global top list, -1 padded
    payload: dict[int, Passage] = field(default_factory=dict, repr=False)
