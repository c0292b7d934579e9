"""The one bounded cache the project uses: a thread-safe LRU map over `cachetools.LRUCache`."""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import cachetools


class LRU:
    """At most `maxsize` entries, least recently used evicted first; `maxsize=0` stores nothing.

    Locked, because a trainer may prefetch retrieval from a thread while the step retrieves too.
    """

    def __init__(self, maxsize: int):
        self.maxsize = int(maxsize)
        self._data: cachetools.LRUCache | None = (
            cachetools.LRUCache(self.maxsize) if self.maxsize > 0 else None
        )
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        if self._data is None:
            return default
        with self._lock:
            return self._data.get(key, default)  # a hit counts as a use

    def put(self, key: Hashable, value: Any) -> None:
        if self._data is None:
            return
        with self._lock:
            self._data[key] = value

    def clear(self) -> None:
        if self._data is not None:
            with self._lock:
                self._data.clear()

    def __contains__(self, key: Hashable) -> bool:
        if self._data is None:
            return False
        with self._lock:
            return key in self._data

    def items(self) -> list[tuple[Hashable, Any]]:
        """A snapshot of the entries (e.g. to checkpoint a cache whose values must survive a resume)."""
        if self._data is None:
            return []
        with self._lock:
            return list(self._data.items())

    def __len__(self) -> int:
        return 0 if self._data is None else len(self._data)
