"""Build the next batches (retrieval included) in a background thread while the current one trains.

The producer walks the same sequence of positions the loop would and builds each batch with
randomness keyed by its position, so prefetching changes when a batch is built, never what it
holds. The queue is bounded: at most `depth` batches wait, so a slow trainer never lets retrieval
run unboundedly ahead (or pile up memory).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

P = TypeVar("P")
T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher(Generic[P, T]):
    """Iterate `(produce(p), wait_s)` over `positions`; `wait_s` is how long the consumer was blocked.

    depth=0 produces inline (the consumer waits for all of it). Otherwise a background thread keeps
    up to `depth` results ready, refilling in bursts: it sleeps until the consumer has drained the
    queue to half, then fills it again. Each wake-up of a second Python thread takes the GIL from the
    training thread, so one wake-up per `depth/2` batches instead of one per batch.
    """

    def __init__(self, produce: Callable[[P], T], positions: Iterable[P], depth: int):
        self.produce = produce
        self.positions = iter(positions)
        self.depth = depth
        self.low = depth // 2  # refill when this few are left
        self._items: deque[object] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="ragdist-prefetch", daemon=True)
            self._thread.start()

    def _put(self, item: object) -> bool:
        with self._cond:
            if len(self._items) >= self.depth:
                self._cond.wait_for(lambda: self._stop or len(self._items) <= self.low)
            if self._stop:
                return False
            self._items.append(item)
            if len(self._items) == 1 or len(self._items) >= self.depth or item is _DONE or isinstance(item, _Failure):
                self._cond.notify_all()  # a consumer may be waiting on an empty queue
            return True

    def _run(self) -> None:
        try:
            for p in self.positions:
                if self._stop or not self._put(self.produce(p)):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it in the main thread
            self._put(_Failure(e))

    def __iter__(self) -> Iterator[tuple[T, float]]:
        if self._thread is None:
            for p in self.positions:
                t0 = time.perf_counter()
                item = self.produce(p)
                yield item, time.perf_counter() - t0
            return
        while True:
            t0 = time.perf_counter()
            with self._cond:
                while not self._items:
                    self._cond.wait(timeout=1.0)
                    if not self._items and not self._thread.is_alive():
                        raise RuntimeError("the prefetch thread stopped without a result")
                item = self._items.popleft()
                if len(self._items) == self.low:
                    self._cond.notify_all()  # the producer refills from here
            wait = time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item, wait  # type: ignore[misc]

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._items.clear()
            self._cond.notify_all()  # unblock a producer waiting for room
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Prefetcher[P, T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lookahead(Generic[P]):
    """Retrieval for several upcoming batches in one call.

    `positions` is re-yielded unchanged (hand `lookahead.positions()` to the Prefetcher); when a
    batch asks `retrieve(questions, k)` for questions not fetched yet, the questions of the next
    `window` positions are retrieved with them in one call (one embedding batch, one fan-out) and
    served from memory as their batches are built. Exact search gives every question the same
    passages in any batch, so this changes how often the service is called, never what a batch
    holds. The price: a batch may be served by the index version of up to `window` batches earlier.
    Single-threaded by design: the Prefetcher's producer both walks the positions and builds.
    """

    def __init__(
        self,
        retrieve: Callable[[list[str], int], list[list[dict]]],
        positions: Iterable[P],
        questions_of: Callable[[P], list[str]],
        window: int,
    ):
        if window < 1:
            raise ValueError(f"lookahead window must be at least 1, got {window}")
        self._retrieve, self._questions_of, self.window = retrieve, questions_of, window
        self._it = iter(positions)
        self._ahead: deque[P] = deque()
        self._memo: dict[tuple[str, int], list[dict]] = {}
        self.calls = 0

    def positions(self) -> Iterator[P]:
        while True:
            if self._ahead:
                yield self._ahead.popleft()
                continue
            try:
                yield next(self._it)
            except StopIteration:
                return

    def _peek(self, n: int) -> list[P]:
        while len(self._ahead) < n:
            try:
                self._ahead.append(next(self._it))
            except StopIteration:
                break
        return list(self._ahead)[:n]

    def __call__(self, questions: list[str], k: int) -> list[list[dict]]:
        if any((q, k) not in self._memo for q in questions):
            upcoming = [q for p in self._peek(self.window - 1) for q in self._questions_of(p)]
            wanted = list(dict.fromkeys([*questions, *upcoming]))
            self._memo = dict(zip(((q, k) for q in wanted), self._retrieve(wanted, k)))
            self.calls += 1
        return [self._memo[(q, k)] for q in questions]
