"""A shard server: one FAISS shard and its passage rows, loaded from a verified snapshot.

Search backends. Any FAISS index is searched by FAISS. A Flat inner-product shard can instead be
searched by `ragdist.kernels.TorchFlatIP` (blocked GEMM + running top-k), which is several times
faster than faiss-cpu's flat scan at small query batches on some CPUs and slower on others:
`flat_backend="auto"` times both on the shard's own vectors when it loads and keeps the faster one
per batch-size class.

Deletes and filters never shrink the result below k while enough rows match: rows are masked
before top-k, by FAISS id selectors where the index supports them, else by over-fetching (all
masked-out rows plus k) or, when most rows are masked out, by an exact search over the rows left.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import ConfigError, RetrievalError
from ragdist.index.reader import (
    faiss_gpus,
    read_shard_index,
    read_shard_rows,
    reconstruct_all,
    set_search_params,
    to_gpu,
)
from ragdist.index.snapshot import read_manifest
from ragdist.retrieval.server.filters import FieldIndex, compile_filter, filter_mask
from ragdist.retrieval.server.rows import RowStore
from ragdist.utils.cache import LRU

log = logging.getLogger(__name__)

PAD_SCORE = float(np.finfo(np.float32).min)
WATCH_S = 5.0  # how often a replica checks that its controller still exists
AUTO_MIN_ROWS = 4096  # below this both backends answer in well under a millisecond: keep FAISS
CALIBRATION_ROWS = 32_768  # rows timed when choosing a backend (both scale linearly in rows)


def select_k(D: np.ndarray, ix: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First k kept entries of each (best-first) row, padded FAISS-style."""
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    D2 = np.take_along_axis(D, order, 1)
    ix2 = np.take_along_axis(ix, order, 1)
    ok = np.take_along_axis(keep, order, 1)
    D2 = np.where(ok, D2, PAD_SCORE).astype(np.float32)
    ix2 = np.where(ok, ix2, -1)
    if D2.shape[1] < k:
        pad = k - D2.shape[1]
        D2 = np.pad(D2, ((0, 0), (0, pad)), constant_values=PAD_SCORE)
        ix2 = np.pad(ix2, ((0, 0), (0, pad)), constant_values=-1)
    return D2, ix2


class FaissBackend:
    name = "faiss"

    def __init__(self, index: Any):
        import faiss

        self.index = index
        self.selectors = True  # cleared the first time the index refuses search parameters
        ivf = faiss.try_extract_index_ivf(index)
        self.nprobe = int(ivf.nprobe) if ivf is not None else 0
        base = faiss.downcast_index(index)
        self.efsearch = int(base.hnsw.efSearch) if isinstance(base, faiss.IndexHNSW) else 0
        self.is_ivf, self.is_hnsw = ivf is not None, isinstance(base, faiss.IndexHNSW)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, x: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(x, np.float32))

    def _params(self, bitmap: np.ndarray, n: int) -> Any:
        import faiss

        sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
        if self.is_ivf:
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe), sel
        if self.is_hnsw:
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.efsearch), sel
        return faiss.SearchParameters(sel=sel), sel

    def search(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            return self.index.search(q, k)
        if self.selectors:
            bitmap = np.packbits(mask, bitorder="little")
            params, _sel = self._params(bitmap, len(mask))  # keep `_sel` and `bitmap` alive during the call
            try:
                return self.index.search(q, k, params=params)
            except RuntimeError:
                self.selectors = False
        return deepen(lambda kk: self.index.search(q, kk), q.shape[0], k, mask, self.ntotal)


def deepen(search: Any, nq: int, k: int, mask: np.ndarray, ntotal: int) -> tuple[np.ndarray, np.ndarray]:
    """Over-fetch, drop masked rows, fetch deeper until every query has k rows or the index is exhausted."""
    allowed = int(mask.sum())
    if allowed == 0 or ntotal == 0:
        return np.full((nq, k), PAD_SCORE, np.float32), np.full((nq, k), -1, np.int64)
    want = min(k, allowed)
    kk = min(ntotal, k + (ntotal - allowed) if ntotal - allowed <= 4 * k else max(2 * k, 2 * k * ntotal // allowed))
    while True:
        D, ix = search(kk)
        keep = (ix >= 0) & mask[np.clip(ix, 0, None)]
        if kk >= ntotal or (keep.sum(axis=1) >= want).all():
            return select_k(D, ix, keep, k)
        kk = min(ntotal, kk * 4)


class TorchFlatBackend:
    name = "torch"

    def __init__(self, vectors: np.ndarray, *, dtype: str, device: str, threads: int = 0):
        import torch

        from ragdist.kernels import TorchFlatIP

        if threads:
            torch.set_num_threads(threads)  # process-wide: this actor serves one shard
        self.device = device
        self.flat = TorchFlatIP(vectors.shape[1], db_dtype=dtype, device=device)
        self.flat.add(vectors)
        self.vectors = np.ascontiguousarray(vectors, np.float32)  # exact rows for masked searches

    @property
    def ntotal(self) -> int:
        return int(self.flat.ntotal)

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, np.float32)
        self.flat.add(x)
        self.vectors = np.concatenate([self.vectors, x])

    def search(self, q: np.ndarray, k: int, mask: np.ndarray | None, query_block: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        if query_block and len(q) > query_block:
            parts = [self.search(q[i : i + query_block], k, mask) for i in range(0, len(q), query_block)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if mask is None:
            return self.flat.search(q, k)
        n = self.ntotal
        excluded = n - int(mask.sum())
        if excluded <= max(4 * k, 256):
            # Few rows masked out (recent deletes): the true top-k are among the top k + excluded.
            D, ix = self.flat.search(q, min(n, k + excluded))
            return select_k(D, ix, (ix >= 0) & mask[np.clip(ix, 0, None)], k)
        from ragdist.kernels import exact_topk_ip

        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            return np.full((len(q), k), PAD_SCORE, np.float32), np.full((len(q), k), -1, np.int64)
        D, J = exact_topk_ip(q, self.vectors[rows], k, device=self.device)
        return D, np.where(J >= 0, rows[np.clip(J, 0, None)], -1)


# Batch-size classes of the backend choice: (name, largest batch in it, probe batch when timing).
BATCH_CLASSES = (("small", 64, 32), ("medium", 512, 256), ("large", None, 1024))
# The torch scan's score buffer is (queries x block): past a few hundred queries it outgrows the
# caches, so splitting a big batch can pay. Whether it does is measured, like the rest.
QUERY_BLOCK = 256


def batch_class(nq: int) -> str:
    for name, top, _ in BATCH_CLASSES:
        if top is None or nq <= top:
            return name
    return BATCH_CLASSES[-1][0]


def run_choice(backends: dict[str, Any], choice: str, q: np.ndarray, k: int, mask: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """`choice` is "faiss", "torch" or "torch/<query block>"."""
    name, _, block = choice.partition("/")
    if block:
        return backends[name].search(q, k, mask, query_block=int(block))
    return backends[name].search(q, k, mask)


def _time_choices(backends: dict[str, Any], choices: list[str], queries: np.ndarray, k: int, rounds: int
                  ) -> dict[str, float]:
    times: dict[str, list[float]] = {c: [] for c in choices}
    for c in choices:
        run_choice(backends, c, queries, k, None)  # warm-up
    for _ in range(rounds):
        for c in choices:  # interleaved: load drift on a shared machine hits every candidate alike
            t0 = time.perf_counter()
            run_choice(backends, c, queries, k, None)
            times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(ts) for c, ts in times.items()}


def calibrate(vectors: np.ndarray, dtype: str, device: str, threads: int = 0, seed: int = 0
              ) -> tuple[dict[str, str], dict[str, Any]]:
    """Time FAISS and torch flat search on a sample of this shard's rows; the fastest per batch class."""
    import faiss

    rng = np.random.default_rng(seed)
    n = min(len(vectors), CALIBRATION_ROWS)
    sample = vectors[np.sort(rng.choice(len(vectors), n, replace=False))] if n < len(vectors) else vectors
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(sample)
    if device == "cuda" and faiss_gpus() > 0:
        flat = to_gpu(flat, 0)  # compare like with like: both candidates on the GPU
    backends = {"faiss": FaissBackend(flat), "torch": TorchFlatBackend(sample, dtype=dtype, device=device,
                                                                        threads=threads)}
    choice, timings = {}, {}
    for cls, _, nq in BATCH_CLASSES:
        cands = ["faiss", "torch"] + ([f"torch/{QUERY_BLOCK}"] if nq > QUERY_BLOCK else [])
        q = sample[rng.choice(n, nq)] + 0.01 * rng.standard_normal((nq, vectors.shape[1]), dtype=np.float32)
        t = _time_choices(backends, cands, np.ascontiguousarray(q, np.float32), 10, rounds=3 if nq <= 256 else 2)
        choice[cls] = min(t, key=t.get)
        timings[cls] = {c: round(nq / sec, 1) for c, sec in t.items()}  # queries per second
    return choice, {"rows": n, "qps": timings}


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class ShardServer:
    """Plain class so it can be tested in-process; the service wraps it with `ray.remote`."""

    def __init__(
        self,
        snapshot: str,
        shard_id: int,
        *,
        nprobe: int = 0,
        efsearch: int = 0,
        threads: int = 1,
        flat_backend: str = "faiss",
        flat_dtype: str = "fp32",
        device: str = "cpu",
        lexical: bool = False,
        controller: Any = None,
        version_id: str = "",
    ):
        import faiss

        t0 = time.perf_counter()
        self.snapshot = Path(snapshot)
        self.manifest = read_manifest(self.snapshot)
        self.shard_id = shard_id
        self.version = self.manifest["version"]
        self.version_id = version_id or self.version
        self.dim = int(self.manifest["dim"])
        self.metric = self.manifest.get("metric", "ip")
        self.threads = threads
        if threads:
            faiss.omp_set_num_threads(threads)
        if flat_backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"retrieval.flat_backend={flat_backend!r}: expected auto, faiss or torch")
        if flat_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"retrieval.flat_dtype={flat_dtype!r}: expected fp32 or bf16")
        index = read_shard_index(self.snapshot, self.manifest, shard_id)
        search = self.manifest.get("search", {})
        set_search_params(index, nprobe or int(search.get("nprobe", 16)), efsearch or int(search.get("efsearch", 64)))
        gids, cols = read_shard_rows(self.snapshot, self.manifest, shard_id)
        self.rows = RowStore(gids, cols)
        self.device = self._device(device)
        self.backends, self.choice, self.calibration = self._backends(index, flat_backend, flat_dtype)
        self.fields = FieldIndex()
        self._masks = LRU(32)  # filter masks, keyed by (filter, rows, epoch)
        self.lexical_enabled = lexical
        self._lexical: Any = None
        self._lexical_rows = -1
        if lexical:
            self._lexical_index()
        self.epoch = 0
        self.generation = 0  # the service's topology generation, as last pushed by the controller
        self.controller = controller
        self.calls = 0
        self.queries = 0
        self.busy_s = 0.0
        self.started = time.time()
        if controller is not None:
            self._catch_up(None)  # a restarted replica replays the updates it missed
            threading.Thread(target=self._watch_controller, daemon=True, name="controller-watch").start()
        self.load_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ setup
    def _device(self, device: str) -> str:
        if device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"retrieval.device={device!r}: expected auto, cpu or gpu")
        if device == "cpu":
            return "cpu"
        has = faiss_gpus() > 0
        if not has:
            try:
                import torch

                has = torch.cuda.is_available()
            except ImportError:  # pragma: no cover
                has = False
        if device == "gpu" and not has:
            raise ConfigError("retrieval.device=gpu but neither faiss nor torch sees a GPU here")
        return "gpu" if has else "cpu"

    def _backends(self, index: Any, flat_backend: str, flat_dtype: str) -> tuple[dict[str, Any], dict[str, str], dict]:
        import faiss

        flat_ip = isinstance(faiss.downcast_index(index), faiss.IndexFlat) and self.metric == "ip"
        torch_device = "cuda" if self.device == "gpu" else "cpu"
        if flat_backend == "torch" and not flat_ip:
            raise ConfigError(
                f"retrieval.flat_backend=torch needs a Flat inner-product index; {self.snapshot} shard "
                f"{self.shard_id} is {self.manifest['factory']} ({self.metric})"
            )
        if flat_ip and flat_backend == "torch":
            b = TorchFlatBackend(reconstruct_all(index), dtype=flat_dtype, device=torch_device, threads=self.threads)
            return {"torch": b}, {c: "torch" for c, _, _ in BATCH_CLASSES}, {}
        if flat_ip and flat_backend == "auto" and index.ntotal >= AUTO_MIN_ROWS:
            vectors = reconstruct_all(index)
            choice, calib = calibrate(vectors, flat_dtype, torch_device, self.threads, seed=self.shard_id)
            backends: dict[str, Any] = {}
            if any(c.startswith("torch") for c in choice.values()):
                backends["torch"] = TorchFlatBackend(vectors, dtype=flat_dtype, device=torch_device, threads=self.threads)
            if "faiss" in choice.values():
                backends["faiss"] = FaissBackend(self._place(index))
            return backends, choice, calib
        return {"faiss": FaissBackend(self._place(index))}, {c: "faiss" for c, _, _ in BATCH_CLASSES}, {}

    def _place(self, index: Any) -> Any:
        if self.device == "gpu" and faiss_gpus() > 0:
            return to_gpu(index, 0)  # Ray exposes the actor's own GPU(s) as device 0..
        return index

    def _lexical_index(self) -> Any:
        from ragdist.retrieval.server.lexical import LexicalIndex

        if self._lexical is None or self._lexical_rows != self.rows.n:
            # bm25s has no incremental add: re-index after appends (they are rare next to queries).
            texts = [f"{t}\n{x}" if t else x for t, x in zip(self.rows.titles, self.rows.texts)]
            self._lexical = LexicalIndex(texts)
            self._lexical_rows = self.rows.n
        return self._lexical

    # ------------------------------------------------------------------ updates
    def apply(self, epoch: int, ops: dict[str, Any]) -> int:
        """Apply one update epoch (idempotent; earlier missing epochs are fetched from the log first)."""
        if epoch <= self.epoch:
            return self.epoch
        if epoch > self.epoch + 1:
            self._catch_up(epoch - 1)
        self._apply_one(epoch, ops)
        return self.epoch

    def _apply_one(self, epoch: int, ops: dict[str, Any]) -> None:
        self.rows.kill(list(ops.get("delete_ids", ())), list(ops.get("delete_doc_ids", ())), epoch)
        add = ops.get("add")
        if add and len(add["gids"]):
            vecs = np.ascontiguousarray(add["vectors"], np.float32)
            for b in self.backends.values():
                b.add(vecs)
            self.rows.append(add["gids"], add["rows"], epoch)
        self.epoch = epoch

    def _catch_up(self, target: int | None) -> None:
        """Read the missed update epochs from the controller: at start (a restarted replica) and when an
        update arrives after a gap; never while answering a query."""
        import ray

        if self.controller is None:
            raise RetrievalError(f"shard {self.shard_id}: asked for update epoch {target} but it has no update log")
        gen, entries = ray.get(self.controller.log_since.remote(self.version_id, self.shard_id, self.epoch),
                               timeout=60)
        self.generation = max(self.generation, int(gen))
        for e, ops in entries:
            if e > self.epoch:
                self._apply_one(e, ops)
        if target is not None and self.epoch < target:
            raise RetrievalError(f"shard {self.shard_id}: update epoch {target} is not in the log (have {self.epoch})")

    def _watch_controller(self) -> None:
        """Remove this replica (and its placement group) once the controller is gone for good.

        Replicas are detached so that they outlive a controller restart; this is what still ties them
        to the service when its controller dies with its owner (the driver) or is killed for good.
        A controller Ray is restarting answers late, not with ActorDiedError."""
        import ray
        from ray.util.placement_group import remove_placement_group

        dead = 0
        while True:
            time.sleep(WATCH_S)
            try:
                ray.get(self.controller.ping.remote(), timeout=60)
                dead = 0
            except ray.exceptions.ActorDiedError:
                dead += 1
                if dead < 2:
                    continue
                log.warning("shard %d of %s: the controller is gone; removing this replica",
                            self.shard_id, self.version_id)  # fmt: skip
                pg = ray.util.get_current_placement_group()
                if pg is not None:
                    remove_placement_group(pg)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
            except Exception:  # noqa: BLE001 - restarting or slow: ask again later
                dead = 0

    # ------------------------------------------------------------------ search
    def _mask(self, epoch: int, flt: Any) -> np.ndarray | None:
        vis = self.rows.visible(epoch)
        if flt is None:
            return vis
        key = (flt.key, self.rows.n, epoch if vis is not None else -1)
        m = self._masks.get(key)
        if m is None:
            m = filter_mask(flt, self.rows, self.fields)
            if vis is not None:
                m &= vis
            self._masks.put(key, m)
        return m

    def _dense(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return run_choice(self.backends, self.choice[batch_class(len(q))], q, k, mask)

    def query(
        self,
        queries: np.ndarray,
        k: int,
        *,
        epoch: int | None = None,
        min_epoch: int = 0,
        filter: Any = None,
        texts: list[str] | None = None,
        lexical_k: int = 0,
        passages: bool = True,
    ) -> dict[str, Any]:
        """Top-k of this shard at one update epoch: scores, global ids, optionally BM25 hits and rows.

        `epoch` pins the epoch (the client reconciling shards); else the newest this shard has,
        at least `min_epoch` (a client never reads older than it has already seen). A shard that
        has not applied that epoch yet answers `{"behind": its epoch}` at once and the client asks
        again: the update is on its way from the controller. Every answer carries the generation.
        """
        t0 = time.perf_counter()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RetrievalError(f"query shape {tuple(q.shape)}: expected (n, {self.dim})")
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise RetrievalError(f"k={k!r}: must be a positive integer")
        want = epoch if epoch is not None else max(self.epoch, min_epoch)
        if want > self.epoch:
            return {"behind": self.epoch, "epoch": self.epoch, "gen": self.generation, "t": time.perf_counter() - t0}
        flt = compile_filter(filter)
        mask = self._mask(want, flt)
        D, ix = self._dense(q, int(k), mask)
        G = np.where(ix >= 0, self.rows.gids[np.clip(ix, 0, None)] if self.rows.n else -1, -1)
        out: dict[str, Any] = {"D": np.ascontiguousarray(D, np.float32), "G": G.astype(np.int64), "epoch": want,
                               "gen": self.generation}
        used = [ix]
        if lexical_k > 0:
            if texts is None or len(texts) != len(q):
                raise RetrievalError(f"hybrid search needs one text per query ({len(q)}), got {texts and len(texts)}")
            LS, LI = self._lexical_index().search(list(texts), int(lexical_k), mask)
            out["LS"] = LS
            out["LG"] = np.where(LI >= 0, self.rows.gids[np.clip(LI, 0, None)] if self.rows.n else -1, -1)
            used.append(LI)
        if passages:
            local = np.unique(np.concatenate([u.ravel() for u in used]))
            out["payload"] = {int(self.rows.gids[i]): self.rows.payload(int(i)) for i in local if i >= 0}
        self.calls += 1
        self.queries += len(q)
        dt = time.perf_counter() - t0
        self.busy_s += dt
        out["t"] = dt
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[dict[str, Any]]]]:
        """Top-k of this shard: scores, global ids, and the passages they point at."""
        r = self.query(queries, k)
        rows = [[r["payload"][int(g)] for g in row if g >= 0] for row in r["G"]]
        return r["D"], r["G"], rows

    def info(self) -> dict[str, Any]:
        return {
            "shard": self.shard_id,
            "version": self.version,
            "version_id": self.version_id,
            "count": int(self.rows.n),
            "visible": int(self.rows.alive_count(self.epoch)),
            "dim": self.dim,
            "epoch": self.epoch,
            "calls": self.calls,
            "queries": self.queries,
            "busy_s": self.busy_s,
            "backend": self.choice,
            "calibration": self.calibration,
            "device": self.device,
            "threads": self.threads,
            "pid": os.getpid(),
            "node_id": _node_id(),
            "load_s": self.load_s,
        }

    def set_generation(self, generation: int) -> int:
        self.generation = max(self.generation, int(generation))
        return self.generation

    def state(self) -> tuple[int, int]:
        """(generation, epoch): a cheap freshness check for a client about to answer from its cache."""
        return self.generation, self.epoch

    def ping(self) -> bool:
        return True

