"""A shard's passage rows with multi-version visibility for streaming updates.

Every row carries the update epoch that created it (`born`, 0 for rows from the snapshot) and
the one that deleted it (`dead`). A query reads at one epoch e and sees exactly the rows with
born <= e < dead, so a reader sees the whole of an update or none of it; rows are never moved
or renumbered, which keeps the FAISS positions of existing rows valid while updates land.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ALIVE = np.iinfo(np.int64).max


class RowStore:
    def __init__(self, gids: np.ndarray, cols: dict[str, list[Any]]):
        self.gids = np.asarray(gids, dtype=np.int64)
        self.ids: list[str] = list(cols["id"])
        self.doc_ids: list[str] = list(cols["doc_id"])
        self.texts: list[str] = list(cols["text"])
        self.titles: list[str] = list(cols["title"])
        self.sources: list[str] = list(cols["source"])
        self.timestamps = np.array([_ts(t) for t in cols["timestamp"]], dtype=np.float64)
        self.metas: list[dict[str, Any]] = list(cols["meta"])
        n = len(self.gids)
        self.born = np.zeros(n, dtype=np.int64)
        self.dead = np.full(n, ALIVE, dtype=np.int64)
        self.n_dead = 0
        self.max_born = 0
        self._by_id: dict[str, list[int]] = {}
        self._by_doc: dict[str, list[int]] = {}
        for i in range(n):
            self._by_id.setdefault(self.ids[i], []).append(i)
            self._by_doc.setdefault(self.doc_ids[i], []).append(i)
        self._vis: tuple[int, int, int, np.ndarray | None] | None = None

    @property
    def n(self) -> int:
        return len(self.gids)

    def column(self, name: str) -> list[Any]:
        return {"id": self.ids, "doc_id": self.doc_ids, "source": self.sources, "title": self.titles}[name]

    def payload(self, i: int) -> dict[str, Any]:
        ts = self.timestamps[i]
        return {
            "id": self.ids[i],
            "doc_id": self.doc_ids[i],
            "text": self.texts[i],
            "title": self.titles[i],
            "source": self.sources[i],
            "timestamp": None if math.isnan(ts) else float(ts),
            "meta": self.metas[i],
        }

    def visible(self, epoch: int) -> np.ndarray | None:
        """Rows visible at `epoch`, or None when every row is (the common, fast case)."""
        if self.n_dead == 0 and self.max_born <= epoch:
            return None
        key = (epoch, self.n, self.n_dead)
        if self._vis is not None and self._vis[:3] == key:
            return self._vis[3]
        mask = (self.born <= epoch) & (self.dead > epoch)
        self._vis = (*key, mask)
        return mask

    def alive_count(self, epoch: int) -> int:
        mask = self.visible(epoch)
        return self.n if mask is None else int(mask.sum())

    def kill(self, ids: list[str], doc_ids: list[str], epoch: int) -> int:
        """Mark the live rows of these chunk ids / document ids deleted as of `epoch`."""
        killed = 0
        for table, keys in ((self._by_id, ids), (self._by_doc, doc_ids)):
            for key in keys:
                for i in table.get(key, ()):
                    if self.dead[i] == ALIVE:
                        self.dead[i] = epoch
                        killed += 1
        self.n_dead += killed
        return killed

    def append(self, gids: np.ndarray, rows: list[dict[str, Any]], epoch: int) -> None:
        start = self.n
        self.gids = np.concatenate([self.gids, np.asarray(gids, np.int64)])
        for j, r in enumerate(rows):
            i = start + j
            self.ids.append(r["id"])
            self.doc_ids.append(r["doc_id"])
            self.texts.append(r.get("text", ""))
            self.titles.append(r.get("title", ""))
            self.sources.append(r.get("source", ""))
            self.metas.append(dict(r.get("meta") or {}))
            self._by_id.setdefault(r["id"], []).append(i)
            self._by_doc.setdefault(r["doc_id"], []).append(i)
        self.timestamps = np.concatenate([self.timestamps, np.array([_ts(r.get("timestamp")) for r in rows])])
        self.born = np.concatenate([self.born, np.full(len(rows), epoch, np.int64)])
        self.dead = np.concatenate([self.dead, np.full(len(rows), ALIVE, np.int64)])
        self.max_born = max(self.max_born, epoch)


def _ts(t: Any) -> float:
    return float("nan") if t is None else float(t)
