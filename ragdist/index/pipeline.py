"""The distributed index build on Ray: corpus parts → chunk + embed on an actor pool → vectors staged
part by part → quantizer trained on a sample → shards added in parallel → one atomic snapshot.

    result = build_index(corpus_cfg, index_cfg, embedder_cfg, key=..., extra={...})
    result.snapshot                      # <index.root>/<version>, the format ShardServer loads

The driver never holds a document, a chunk or a vector: workers read their own byte (or row)
range of the corpus file, write `part_NNNNNN.{npy,parquet,json}` into a staging directory under
`index.root` named by the inputs (corpus digest, chunking, embedder), and return counts. The
quantizer is trained in a task on `index.train_sample` staged rows; each shard is a task that
reads only its rows from the staged parts, adds them, writes and checksums its files. The driver
keeps one small record per part, so its memory does not grow with the corpus.

Resume: a part is done once its `.json` marker exists (written last, by rename). A killed build
(a worker: Ray restarts it and re-runs its parts; the driver: run the same command again)
re-embeds only the parts without a marker. The staging directory goes once the snapshot is
committed (unless `index.build.keep_staging`).

Plain actors rather than Ray Data: resume needs a stable part → file mapping and the corpus line
of every document (for error messages and duplicate ids across parts), and the actors' results
must stay in corpus order for global ids; Ray Data's readers and writers give neither by default,
and on a 2-core machine its executor's own processes cost a noticeable share.
The corpus file and `index.root` must be on a filesystem every node sees.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.data.config import CorpusConfig
from ragdist.data.corpus import (
    SPILL_NAME,
    Chunk,
    chunk_documents,
    file_digest,
    path_digest,
    read_part,
    spill_gzip,
    split_corpus,
    where_in_corpus,
)
from ragdist.embed.config import EmbedderConfig
from ragdist.embed.embedder import embedder_name, encode_chunks
from ragdist.errors import ConfigError, DataError, IndexError_, RagdistError
from ragdist.index.builder import (
    _wants_vectors,
    exact_search,
    exact_search_index,
    held_out_queries,
    make_index,
    recall_entry,
    train_on_sample,
    training_rows,
)
from ragdist.index.config import BuildConfig, IndexConfig
from ragdist.index.reader import set_search_params
from ragdist.index.snapshot import SnapshotWriter, atomic_write_text

log = logging.getLogger(__name__)

STAGING_PREFIX = ".build-"
ROW_SCHEMA_COLUMNS = ("id", "doc_id", "text", "title", "source", "timestamp", "meta")


@dataclass
class BuildResult:
    snapshot: Path
    parts: int  # parts of the corpus
    parts_embedded: int  # embedded by this run (the rest were staged by an earlier, interrupted one)
    parts_reused: int
    parts_prefetched: int  # of those embedded, read and chunked while the worker encoded the one before
    documents: int
    chunks: int
    workers: int
    ready_s: float  # embedding actors placed and their model loaded
    embed_s: float  # wall time of the embedding stage (workers ready → last part staged)
    embed_chunks_per_s: float  # chunks embedded by this run / embed_s
    worker_cpu_s: float  # CPU seconds the workers spent on this run's parts (all their threads)
    train_s: float
    add_s: float  # shards added, written and checksummed, snapshot committed
    total_s: float
    driver_peak_rss_mb: float
    worker_peak_rss_mb: float

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["snapshot"] = str(self.snapshot)
        return d


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def staging_dir(root: str | Path, corpus: CorpusConfig, embedder: EmbedderConfig, name: str) -> Path:
    """Where the parts of these inputs are staged: anything that changes a vector changes the name."""
    ident = {
        "corpus": path_digest(corpus.path),
        "format": corpus.format,
        "fields": dataclasses.asdict(corpus.fields),
        "chunk": [corpus.chunk_tokens, corpus.chunk_overlap, corpus.max_docs],
        "embedder": [name, embedder.kind, embedder.max_length, embedder.normalize, embedder.dtype],
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return Path(root) / f"{STAGING_PREFIX}{digest}"


def _doc_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------ workers
class EmbedWorker:
    """One embedding actor: reads its parts of the corpus, chunks, embeds, stages the results.

    With `index.build.prefetch`, each call names the part that comes next to this worker (`ahead`); it
    is read and chunked on a thread while this call encodes, so the encoder (a GPU above all) does not
    wait on the corpus. A part read ahead raises its errors in its own call; a call whose part was not
    read ahead (the first, or any after a restart) reads it itself.
    """

    def __init__(self, cfg: EmbedderConfig, corpus: CorpusConfig, staging: str, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        from ragdist.embed import build_embedder

        if threads:
            try:
                threads = min(threads, len(os.sched_getaffinity(0)))
            except AttributeError:  # non-Linux
                pass
            import torch

            torch.set_num_threads(threads)
        self.threads = threads
        self.corpus = corpus
        self.staging = Path(staging)
        self.embedder = build_embedder(cfg)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-read")
        self._ahead: tuple[int, Any] | None = None  # (part id, future of _prepare)
        # Chunking runs beside the encoder's own tokenizer calls: a fast tokenizer's padding and
        # truncation settings are state of one object, so the two threads must not share it.
        self._chunk_tokenizer = copy.deepcopy(self.embedder.tokenizer)

    def ready(self) -> dict[str, Any]:
        return {"name": self.embedder.name, "dim": int(self.embedder.dim), "pid": os.getpid(), "threads": self.threads}

    def _prepare(self, part: dict[str, Any]) -> tuple[list[tuple[int, Any]], list[Chunk], list[Any], float, float]:
        t0 = time.perf_counter()
        c = self.corpus
        docs = read_part(c.path, c.format, part, c.fields)
        t1 = time.perf_counter()
        ids: list[Any] = []  # the chunker's tokens of each whole-document chunk: not tokenized twice
        chunks = chunk_documents([d for _, d in docs], self._chunk_tokenizer, c.chunk_tokens, c.chunk_overlap,
                                 token_ids=ids)
        return docs, chunks, ids, t1 - t0, time.perf_counter() - t1

    def embed_part(self, part: dict[str, Any], ahead: dict[str, Any] | None = None) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        pending, self._ahead = self._ahead, None
        prefetched = pending is not None and pending[0] == int(part["id"])
        if prefetched:
            docs, chunks, ids, read_s, chunk_s = pending[1].result()  # the prefetch's own error is raised here
        else:
            if pending is not None:  # read ahead for a part that went elsewhere: one chunker at a time
                pending[1].exception()
            docs, chunks, ids, read_s, chunk_s = self._prepare(part)
        if ahead is not None:
            self._ahead = (int(ahead["id"]), self._io.submit(self._prepare, ahead))
        t2 = time.perf_counter()
        vectors = encode_chunks(self.embedder, [ch.text for ch in chunks], ids)
        t3 = time.perf_counter()
        if len(chunks) and (vectors.shape != (len(chunks), self.embedder.dim) or not np.isfinite(vectors).all()):
            raise IndexError_(f"part {part['id']}: the embedder returned {vectors.shape} vectors with NaN/inf or "
                              f"the wrong shape for {len(chunks)} chunks")
        offset_of = {d.id: off for off, d in docs}
        write_part(self.staging, part, chunks, [offset_of[ch.doc_id] for ch in chunks],
                   vectors.reshape(len(chunks), self.embedder.dim), len(docs))
        return {
            "part": int(part["id"]), "chunks": len(chunks), "documents": len(docs), "bytes": int(part["bytes"]),
            "read_s": read_s, "chunk_s": chunk_s, "wait_s": t2 - t0, "embed_s": t3 - t2,
            "write_s": time.perf_counter() - t3, "cpu_s": time.process_time() - c0, "peak_rss_mb": peak_rss_mb(),
            "pid": os.getpid(), "prefetched": prefetched,
        }


def part_name(pid: int) -> str:
    return f"part_{pid:06d}"


def write_part(staging: Path, part: dict[str, Any], chunks: list[Chunk], offsets: list[int], vectors: np.ndarray,
               documents: int) -> None:
    """Stage one part: vectors (.npy), rows (.parquet), then the marker (.json) that says it is complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = staging / part_name(int(part["id"]))
    tmp = f".tmp-{os.getpid()}"
    with open(f"{base}.npy{tmp}", "wb") as fh:
        np.save(fh, np.ascontiguousarray(vectors, np.float32), allow_pickle=False)
    os.replace(f"{base}.npy{tmp}", f"{base}.npy")
    rows = [c.to_row() for c in chunks]
    crcs = {c.doc_id: zlib.crc32(c.doc_id.encode()) for c in chunks}
    hashes = {d: _doc_hash(d) for d in crcs}
    table = pa.table(
        {
            **{k: pa.array([r[k] for r in rows], pa.float64() if k == "timestamp" else pa.string())
               for k in ROW_SCHEMA_COLUMNS},
            "_offset": pa.array(offsets, pa.int64()),
            "_crc": pa.array([crcs[c.doc_id] for c in chunks], pa.int64()),
            "_h64": pa.array([hashes[c.doc_id] for c in chunks], pa.uint64()),
        }
    )
    pq.write_table(table, f"{base}.parquet{tmp}")
    os.replace(f"{base}.parquet{tmp}", f"{base}.parquet")
    marker = {"part": int(part["id"]), "chunks": len(chunks), "documents": documents, "dim": int(vectors.shape[1]),
              "start": int(part["start"]), "end": int(part["end"])}
    atomic_write_text(f"{base}.json", json.dumps(marker))


def staged_parts(staging: Path, parts: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Markers of the parts already staged (an interrupted build's work)."""
    done = {}
    for p in parts:
        base = staging / part_name(int(p["id"]))
        try:
            m = json.loads(Path(f"{base}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("start") == p["start"] and m.get("end") == p["end"] and Path(f"{base}.npy").is_file():
            done[int(p["id"])] = m
    return done


def _part_vectors(staging: Path, pid: int) -> np.ndarray:
    return np.load(staging / f"{part_name(pid)}.npy", mmap_mode="r", allow_pickle=False)


def gather_rows(staging: Path, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Vectors of global rows `rows` (sorted), read from the staged parts they fall in."""
    owner = np.searchsorted(offsets, rows, side="right") - 1
    out = []
    for pid in np.unique(owner):
        mine = rows[owner == pid] - offsets[pid]
        out.append(np.asarray(_part_vectors(staging, int(pid))[mine], np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ------------------------------------------------------------------------------------------ tasks
def find_duplicates(staging: str, pids: list[int], bucket: int, buckets: int) -> list[tuple[int, int, int]]:
    """Documents of one hash bucket whose id hash occurs at two corpus offsets: [(h64, off_a, off_b)]."""
    import pyarrow.parquet as pq

    hs, offs = [], []
    for pid in pids:
        t = pq.read_table(Path(staging) / f"{part_name(pid)}.parquet", columns=["_h64", "_offset"])
        h = t.column("_h64").to_numpy().astype(np.uint64)
        o = t.column("_offset").to_numpy().astype(np.int64)
        keep = (h % np.uint64(buckets)) == np.uint64(bucket)
        hs.append(h[keep])
        offs.append(o[keep])
    if not hs:
        return []
    pairs = np.unique(np.stack([np.concatenate(hs).view(np.int64), np.concatenate(offs)], axis=1), axis=0)
    h = pairs[:, 0]
    dup = np.flatnonzero(h[1:] == h[:-1])
    as_u64 = h.view(np.uint64)
    return [(int(as_u64[i]), int(pairs[i, 1]), int(pairs[i + 1, 1])) for i in dup[:10]]


def train_task(staging: str, offsets: np.ndarray, cfg: IndexConfig, n: int, out_name: str, gpu: bool) -> str:
    """Train the quantizer on `training_rows` of the staged vectors; write it into the staging dir."""
    import faiss

    from ragdist.index.reader import faiss_gpus

    path = Path(staging) / out_name
    if path.is_file():
        return str(path)  # trained by an earlier, interrupted run of the same build
    sample = gather_rows(Path(staging), offsets, training_rows(cfg, n))
    index = train_on_sample(cfg, sample, gpu=gpu and faiss_gpus() > 0)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return str(path)


def add_shard(
    staging: str,
    shard: int,
    num_shards: int,
    sharding: str,
    row_range: tuple[int, int],
    offsets: np.ndarray,
    counts: np.ndarray,
    template_path: str,
    cfg: IndexConfig,
    dim: int,
    out_dir: str,
    queries: np.ndarray | None,
    kk: int,
) -> dict[str, Any]:
    """Build one shard from the staged parts: add its vectors part by part, write index + rows (+ vectors).

    Returns the manifest's shard entry, the files' checksums and, for the recall figure, this
    shard's exact and approximate top-kk of `queries` (global ids).
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    staging_p, out = Path(staging), Path(out_dir)
    index = faiss.read_index(template_path) if template_path else make_index(cfg.factory, dim, cfg.metric)
    keep_vectors = _wants_vectors(cfg.store_vectors, index)
    stem = f"shard_{shard:04d}"
    idx_name, meta_name, vec_name = f"{stem}.faiss", f"{stem}.parquet", f"{stem}.vectors.npy"
    schema = pa.schema([(k, pa.float64() if k == "timestamp" else pa.string()) for k in ROW_SCHEMA_COLUMNS]
                       + [("gid", pa.int64())])
    keep_max = cfg.metric == "ip"
    exact = faiss.ResultHeap(len(queries), kk, keep_max=keep_max) if queries is not None else None
    vec_parts: list[tuple[int, np.ndarray]] = []  # (part, local rows) kept for the vectors file
    count = 0
    writer = pq.ParquetWriter(out / meta_name, schema)
    try:
        for pid in range(len(counts)):
            lo, n_p = int(offsets[pid]), int(counts[pid])
            if n_p == 0:
                continue
            if sharding == "contiguous":
                a, b = max(row_range[0], lo), min(row_range[1], lo + n_p)
                if a >= b:
                    continue
                local = np.arange(a - lo, b - lo)
                cols = None
            else:
                cols = pq.read_table(staging_p / f"{part_name(pid)}.parquet")
                crc = cols.column("_crc").to_numpy()
                local = np.flatnonzero(crc % num_shards == shard)
                if not len(local):
                    continue
            x = np.ascontiguousarray(_part_vectors(staging_p, pid)[local], np.float32)
            index.add(x)
            if exact is not None:
                D, ix = exact_search(x, queries, kk, cfg.metric)
                exact.add_result(D, np.where(ix >= 0, lo + local[np.clip(ix, 0, None)], -1).astype(np.int64))
            if cols is None:
                cols = pq.read_table(staging_p / f"{part_name(pid)}.parquet", columns=list(ROW_SCHEMA_COLUMNS))
            rows = cols.select(list(ROW_SCHEMA_COLUMNS)).take(pa.array(local))
            writer.write_table(rows.append_column("gid", pa.array(lo + local, pa.int64())).cast(schema))
            if keep_vectors:
                vec_parts.append((pid, local))
            count += len(local)
    finally:
        writer.close()
    faiss.write_index(index, str(out / idx_name))
    info: dict[str, Any] = {"id": shard, "index": idx_name, "meta": meta_name, "count": count}
    if keep_vectors:
        info["vectors"] = vec_name
        mm = np.lib.format.open_memmap(out / vec_name, mode="w+", dtype=np.float32, shape=(count, dim))
        at = 0
        for pid, local in vec_parts:
            mm[at : at + len(local)] = _part_vectors(staging_p, pid)[local]
            at += len(local)
        mm.flush()
        del mm
    digests = {name: file_digest(out / name) for name in (idx_name, meta_name, vec_name) if (out / name).is_file()}
    result: dict[str, Any] = {"info": info, "digests": digests}
    if exact is not None:
        exact.finalize()
        set_search_params(index, cfg.nprobe, cfg.efsearch)
        if index.ntotal:
            D, ix = index.search(np.ascontiguousarray(queries), kk)
            G = np.where(ix >= 0, _local_to_global(ix, offsets, counts, row_range, sharding, staging_p, shard,
                                                   num_shards), -1)
        else:
            D, G = np.full((len(queries), kk), np.nan, np.float32), np.full((len(queries), kk), -1, np.int64)
        result["exact"] = (exact.D, exact.I)
        result["approx"] = (D.astype(np.float32), G.astype(np.int64))
    return result


def _local_to_global(ix: np.ndarray, offsets: np.ndarray, counts: np.ndarray, row_range: tuple[int, int],
                     sharding: str, staging: Path, shard: int, num_shards: int) -> np.ndarray:
    """Shard positions → global ids (the shard's rows are its global ids in ascending order)."""
    import pyarrow.parquet as pq

    if sharding == "contiguous":
        return row_range[0] + np.clip(ix, 0, None)
    gids = []
    for pid in range(len(counts)):
        if counts[pid]:
            crc = pq.read_table(staging / f"{part_name(pid)}.parquet", columns=["_crc"]).column("_crc").to_numpy()
            gids.append(int(offsets[pid]) + np.flatnonzero(crc % num_shards == shard))
    g = np.concatenate(gids) if gids else np.zeros(0, np.int64)
    return g[np.clip(ix, 0, None)]


# ------------------------------------------------------------------------------------------ driver
def _remote_error(e: BaseException) -> BaseException:
    """The ragdist error a Ray task raised (bad input), else the Ray error itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, RagdistError) else e


def _cluster(build: BuildConfig) -> tuple[bool, int, int]:
    """(use GPUs, workers, torch threads per CPU worker) for this cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if build.device == "gpu" and not gpus:
        raise ConfigError("index.build.device=gpu but the Ray cluster has no GPU")
    use_gpu = gpus > 0 and build.device != "cpu"
    workers = build.workers or (gpus if use_gpu else 1)
    threads = build.threads or max(1, int(cpus // workers))
    return use_gpu, workers, threads


def embed_parts(
    corpus: CorpusConfig,
    embedder: EmbedderConfig,
    build: BuildConfig,
    staging: Path,
    parts: list[dict[str, Any]],
    todo: list[dict[str, Any]],
    expected_name: str,
    on_part: Callable[[dict[str, Any], list[Any]], None] | None = None,
    check_dim: Callable[[int], Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the parts `todo` on a pool of embedding actors: (per-part stats, {embed_s, ready_s, workers}).

    `embed_s` runs from the moment every worker has loaded its model to the last part staged.
    """
    import ray
    from tqdm.auto import tqdm

    use_gpu, workers, threads = _cluster(build)
    workers = min(workers, len(todo))
    cfg = dataclasses.replace(
        embedder,
        batch_size=build.batch_size or embedder.batch_size,
        progress=False,
        device="cuda" if use_gpu else "cpu",
        threads=0 if use_gpu else threads,
    )
    opts: dict[str, Any] = dict(num_cpus=build.num_cpus, max_restarts=build.max_retries,
                                max_task_retries=build.max_retries)
    if use_gpu:
        opts["num_gpus"] = 1
    Worker = ray.remote(EmbedWorker).options(**opts)
    t_ready = time.perf_counter()
    pool = [Worker.remote(cfg, corpus, str(staging), 0 if use_gpu else threads) for _ in range(workers)]
    try:
        try:
            ready = ray.get([w.ready.remote() for w in pool], timeout=build.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(
                f"index.build: {workers} worker(s) with {build.num_cpus} CPU{' and 1 GPU' if use_gpu else ''} each "
                f"were not up within {build.ready_timeout_s:.0f}s (cluster has {ray.available_resources()} free); "
                "lower index.build.workers or index.build.num_cpus"
            ) from None
        except ray.exceptions.RayTaskError as e:
            raise _remote_error(e) from None
        ready_s = time.perf_counter() - t_ready
        for r in ready:
            if r["name"] != expected_name:
                raise IndexError_(f"embedding worker {r['pid']} loaded {r['name']}, expected {expected_name}")
        if check_dim is not None:
            check_dim(int(ready[0]["dim"]))  # e.g. a factory FAISS cannot build at this dim: before any work
        log.info("index build: %d worker(s) (%s, %d thread(s) each), %d of %d part(s) to embed", workers,
                 "GPU" if use_gpu else "CPU", threads if not use_gpu else 0, len(todo), len(parts))
        done_bytes = sum(p["bytes"] for p in parts) - sum(p["bytes"] for p in todo)
        bar = tqdm(total=sum(p["bytes"] for p in parts), initial=done_bytes, unit="B", unit_scale=True,
                   desc="embed", disable=not embedder.progress, smoothing=0.1)
        queue = list(todo)
        pending: dict[Any, tuple[int, dict[str, Any]]] = {}
        per_worker = 2  # calls queued per worker: one running, one waiting, so none idles while the driver works
        # With prefetch, the part a worker gets next is fixed when its last call is submitted and named
        # in that call, which reads it while it encodes its own; only while every worker can still get
        # a part of its own, so that reading ahead never leaves a worker without one.
        following: dict[int, dict[str, Any]] = {}
        prefetch = build.prefetch == "always" or (build.prefetch == "auto" and use_gpu)

        def submit(w: int) -> None:
            p = following.pop(w) if w in following else queue.pop(0)
            if prefetch and len(queue) >= workers:
                following[w] = queue.pop(0)
            pending[pool[w].embed_part.remote(p, following.get(w))] = (w, p)

        t0 = time.perf_counter()
        for _ in range(per_worker):  # round by round: every worker has a part before any has two
            for w in range(workers):
                if queue or w in following:
                    submit(w)
        stats, chunks = [], 0
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            w, p = pending.pop(ref)
            try:
                st = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _remote_error(e) from None
            stats.append(st)
            chunks += st["chunks"]
            bar.update(p["bytes"])
            bar.set_postfix(chunks=chunks, rate=f"{chunks / max(time.perf_counter() - t0, 1e-9):.0f}/s")
            if on_part is not None:
                on_part(st, pool)
            if queue or w in following:
                submit(w)
        bar.close()
        return stats, {"embed_s": time.perf_counter() - t0, "ready_s": ready_s, "workers": workers}
    finally:
        for w in pool:
            ray.kill(w)


def check_duplicates(corpus: CorpusConfig, staging: Path, pids: list[int], buckets: int) -> None:
    """Refuse a corpus where two documents share an id (the in-process build refuses it too)."""
    import pyarrow.parquet as pq
    import ray

    task = ray.remote(find_duplicates).options(num_cpus=0.5)
    found = [d for part in ray.get([task.remote(str(staging), pids, b, buckets) for b in range(buckets)]) for d in part]
    for h, a, b in found:
        ids = {}
        for pid in pids:  # rare path: name the documents
            t = pq.read_table(staging / f"{part_name(pid)}.parquet", columns=["doc_id", "_h64", "_offset"])
            for d, hh, off in zip(*(t.column(c).to_pylist() for c in ("doc_id", "_h64", "_offset"))):
                if hh == h and off in (a, b):
                    ids[off] = d
        if len(ids) == 2 and ids[a] == ids[b]:
            spilled = staging / SPILL_NAME
            source = spilled if spilled.is_file() else None  # a gzip'd corpus: offsets into its copy
            raise DataError(f"{where_in_corpus(corpus.path, corpus.format, b, source)}: duplicate document id "
                            f"{ids[b]!r} (first at {where_in_corpus(corpus.path, corpus.format, a, source)})")


def build_index(
    corpus: CorpusConfig,
    index: IndexConfig,
    embedder: EmbedderConfig,
    *,
    key: str = "",
    extra: dict[str, Any] | None = None,
    on_part: Callable[[dict[str, Any], list[Any]], None] | None = None,
) -> BuildResult:
    """Corpus file → a new sharded snapshot version under `index.root`, built on the Ray cluster.

    Attaches to $RAY_ADDRESS or starts a loopback cluster when Ray is not initialized yet.
    `on_part(stats, workers)` is called in the driver after each part is staged.
    """
    import ray

    from ragdist.retrieval.cluster import init_ray

    t_start = time.perf_counter()
    build = index.build
    if not ray.is_initialized():
        init_ray()
    name = embedder_name(embedder)
    staging = staging_dir(index.root, corpus, embedder, name)
    staging.mkdir(parents=True, exist_ok=True)
    plan_path = staging / "parts.json"
    if plan_path.is_file():
        parts = json.loads(plan_path.read_text())["parts"]  # an interrupted build's cut, kept for its parts
        if any(p.get("source") for p in parts):
            # a gzip'd corpus's decompressed copy: made again if it went (the same bytes, so the same parts)
            source = spill_gzip(corpus.path, staging, corpus.max_docs)
            parts = [dict(p, source=str(source)) for p in parts]
    else:
        parts = split_corpus(corpus.path, corpus.format, int(build.part_mb * (1 << 20)), corpus.max_docs,
                             spill_dir=staging)  # fmt: skip
        atomic_write_text(plan_path, json.dumps({"corpus": str(corpus.path), "embedder": name, "parts": parts}))
    done = staged_parts(staging, parts)
    todo = [p for p in parts if int(p["id"]) not in done]
    reused = len(parts) - len(todo)
    stats: list[dict[str, Any]] = []
    run = {"embed_s": 0.0, "ready_s": 0.0, "workers": 0}
    try:
        if todo:
            stats, run = embed_parts(corpus, embedder, build, staging, parts, todo, name, on_part,
                                     check_dim=lambda d: make_index(index.factory, d, index.metric))
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)  # bad input: these parts will never be reused
        raise
    markers = staged_parts(staging, parts)
    missing = [p["id"] for p in parts if int(p["id"]) not in markers]
    if missing:
        raise IndexError_(f"{staging}: parts {missing[:5]} were not staged")
    counts = np.array([markers[int(p["id"])]["chunks"] for p in parts], np.int64)
    documents = int(sum(m["documents"] for m in markers.values()))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(counts.sum())
    if documents == 0 or n == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{corpus.path}: corpus is empty")
    dim = int(next(m["dim"] for m in markers.values() if m["chunks"]))
    pids = [int(p["id"]) for p in parts if counts[int(p["id"])]]
    try:
        check_duplicates(corpus, staging, pids, buckets=max(1, min(16, int(run["workers"]) or 1)))
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if index.num_shards > n:
        raise ConfigError(f"index.num_shards={index.num_shards}: more shards than the {n} chunks in the corpus")

    # -- quantizer, trained once on a sample of the staged vectors
    t_train = time.perf_counter()
    probe = make_index(index.factory, dim, index.metric)
    template_path = ""
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and build.device != "cpu"
    if not probe.is_trained:
        tname = "template-" + hashlib.sha256(json.dumps(
            [index.factory, index.metric, index.train_sample, index.seed, n]).encode()).hexdigest()[:16] + ".faiss"
        topts: dict[str, Any] = {"num_cpus": build.num_cpus}
        if use_gpu:
            topts["num_gpus"] = 1
        try:
            template_path = ray.get(ray.remote(train_task).options(**topts).remote(
                str(staging), offsets, index, n, tname, use_gpu))
        except ray.exceptions.RayTaskError as e:
            raise _remote_error(e) from None
    train_s = time.perf_counter() - t_train

    # -- held-out queries for recall@k of an approximate index (as build_snapshot measures it)
    approximate = not exact_search_index(probe)
    queries, qg = None, None
    if approximate and index.recall_queries > 0:
        qg = held_out_queries(n, index.recall_queries, index.seed, training_rows(index, n))
        queries = gather_rows(staging, offsets, qg)
    kk = index.recall_k + 1

    # -- shards, added in parallel, written straight into the new version's directory
    t_add = time.perf_counter()
    S = index.num_shards
    sizes = [n // S + (1 if s < n % S else 0) for s in range(S)]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    manifest = {
        "dim": dim,
        "factory": index.factory,
        "metric": index.metric,
        "sharding": index.sharding,
        "num_chunks": n,
        "embedder": name,
        **({"key": key} if key else {}),
        **(extra or {}),
    }
    if isinstance(manifest.get("corpus"), dict):
        manifest["corpus"] = dict(manifest["corpus"], documents=documents)
    task = ray.remote(add_shard).options(num_cpus=build.num_cpus, max_retries=build.max_retries)
    offsets_ref, counts_ref = ray.put(offsets), ray.put(counts)
    with SnapshotWriter(index.root) as w:
        refs = [
            task.remote(str(staging), s, S, index.sharding, (int(bounds[s]), int(bounds[s + 1])), offsets_ref,
                        counts_ref, template_path, index, dim, str(w.tmp), queries, kk)
            for s in range(S)
        ]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise _remote_error(e) from None
        digests = {k: v for r in results for k, v in r["digests"].items()}
        manifest.update(
            shards=[r["info"] for r in results],
            num_shards=S,
            search={"nprobe": index.nprobe, "efsearch": index.efsearch},
            next_gid=n,
        )
        if queries is not None:
            manifest["recall"] = recall_entry(
                _merge([r["exact"] for r in results], kk, index.metric),
                _merge([r["approx"] for r in results], kk, index.metric), index.recall_k, qg)
        add_s = time.perf_counter() - t_add
        manifest["build"] = {
            "parts": len(parts), "workers": run["workers"], "embed_s": round(run["embed_s"], 3),
            "train_s": round(train_s, 3), "add_s": round(add_s, 3),
        }
        path = w.commit(manifest, digests)
    if not build.keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
    embedded = int(sum(s["chunks"] for s in stats))
    return BuildResult(
        snapshot=path, parts=len(parts), parts_embedded=len(stats), parts_reused=reused,
        parts_prefetched=sum(bool(s.get("prefetched")) for s in stats), documents=documents,
        chunks=n, workers=int(run["workers"]), ready_s=float(run["ready_s"]), embed_s=float(run["embed_s"]),
        embed_chunks_per_s=embedded / run["embed_s"] if run["embed_s"] else 0.0,
        worker_cpu_s=float(sum(s["cpu_s"] for s in stats)),
        train_s=train_s, add_s=time.perf_counter() - t_add, total_s=time.perf_counter() - t_start,
        driver_peak_rss_mb=peak_rss_mb(),
        worker_peak_rss_mb=max((s["peak_rss_mb"] for s in stats), default=0.0),
    )


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str) -> np.ndarray:
    """Global top-k ids from every shard's (scores, ids)."""
    import faiss

    nq = len(parts[0][0])
    heap = faiss.ResultHeap(nq, k, keep_max=metric == "ip")
    for D, G in parts:
        D = np.where(G >= 0, D, -np.inf if metric == "ip" else np.inf).astype(np.float32)
        heap.add_result(np.ascontiguousarray(D), np.ascontiguousarray(G, np.int64))
    heap.finalize()
    return heap.I
