"""BM25 over one shard's passages (the `bm25s` package), for hybrid lexical + dense retrieval.

Each shard indexes its own rows, so term statistics are per shard (as in a sharded search engine
without a global statistics pass); the client fuses ranks, not raw scores, which keeps that benign.
"""

from __future__ import annotations

import numpy as np

STOPWORDS = "en"


def _tokenize(texts: list[str], *, ids: bool):
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=ids, show_progress=False)


class LexicalIndex:
    def __init__(self, texts: list[str]):
        import bm25s

        self.n = len(texts)
        self.retriever = bm25s.BM25()
        if self.n:
            self.retriever.index(_tokenize(texts, ids=True), show_progress=False)

    def search(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), both (nq, k): best first, padded with -inf / -1. Only rows sharing a term count."""
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, np.float32)
        rows = np.full((nq, k), -1, np.int64)
        kk = min(k, self.n)
        if kk == 0 or nq == 0:
            return scores, rows
        weights = None if mask is None else mask.astype(np.float32)
        found, s = self.retriever.retrieve(
            _tokenize(queries, ids=False), k=kk, show_progress=False, n_threads=0, weight_mask=weights
        )
        found = np.asarray(found, np.int64)
        s = np.asarray(s, np.float32)
        hit = s > 0  # a masked row or one without any query term scores 0: not a lexical match
        for i in range(nq):
            m = int(hit[i].sum())
            scores[i, :m] = s[i][hit[i]]
            rows[i, :m] = found[i][hit[i]]
        return scores, rows
