"""Reading one shard of a verified snapshot: FAISS index, passage rows, exact float32 vectors.

Every file is checksummed against the manifest before it is parsed, and nothing here unpickles:
FAISS binary, Parquet and `.npy` with `allow_pickle=False` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import IndexError_
from ragdist.index.snapshot import read_manifest, verify_file

# Row columns of a shard's Parquet file, in the order the service keeps them.
ROW_COLUMNS = ("id", "doc_id", "text", "title", "source", "timestamp", "meta")


def shard_info(snapshot: Path, manifest: dict[str, Any], shard_id: int) -> dict[str, Any]:
    shards = manifest["shards"]
    if not isinstance(shard_id, int) or not 0 <= shard_id < len(shards):
        raise IndexError_(f"{snapshot}: no shard {shard_id!r} (snapshot has {len(shards)})")
    return shards[shard_id]


def read_shard_index(snapshot: str | Path, manifest: dict[str, Any], shard_id: int) -> Any:
    import faiss

    snapshot = Path(snapshot)
    info = shard_info(snapshot, manifest, shard_id)
    path = verify_file(snapshot, manifest, info["index"])
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise IndexError_(f"{path}: not a readable FAISS index ({str(e).splitlines()[-1]})") from None
    if index.d != int(manifest["dim"]):
        raise IndexError_(f"{path}: shard {shard_id} has dim {index.d}, manifest says {manifest['dim']}")
    if index.ntotal != int(info["count"]):
        raise IndexError_(f"{path}: shard {shard_id} holds {index.ntotal} vectors, manifest says {info['count']}")
    return index


def read_shard_rows(snapshot: str | Path, manifest: dict[str, Any], shard_id: int) -> tuple[np.ndarray, dict]:
    """(global ids, columns): columns map each of ROW_COLUMNS to a list, `meta` parsed from JSON."""
    import pyarrow.parquet as pq

    snapshot = Path(snapshot)
    info = shard_info(snapshot, manifest, shard_id)
    path = verify_file(snapshot, manifest, info["meta"])
    cols = pq.read_table(path).to_pydict()
    missing = [c for c in (*ROW_COLUMNS, "gid") if c not in cols]
    if missing:
        raise IndexError_(f"{path}: rows lack columns {missing}")
    try:
        cols["meta"] = [json.loads(m) if m else {} for m in cols["meta"]]
    except json.JSONDecodeError as e:
        raise IndexError_(f"{path}: a row's meta is not JSON ({e})") from None
    gids = np.asarray(cols.pop("gid"), dtype=np.int64)
    if len(gids) != int(info["count"]):
        raise IndexError_(f"{path}: {len(gids)} rows, manifest says {info['count']}")
    return gids, {c: cols[c] for c in ROW_COLUMNS}


def iter_passage_ids(snapshot: str | Path) -> Iterator[str]:
    """Every passage id of a snapshot, shard by shard (each file checksummed; only the id column read)."""
    import pyarrow.parquet as pq

    snapshot = Path(snapshot)
    manifest = read_manifest(snapshot)
    for shard_id in range(len(manifest["shards"])):
        path = verify_file(snapshot, manifest, shard_info(snapshot, manifest, shard_id)["meta"])
        yield from pq.read_table(path, columns=["id"]).column("id").to_pylist()


def exactly_reconstructable(index: Any) -> bool:
    """True when the index stores the vectors themselves (Flat storage), so reconstruct is lossless."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexFlat):
        return True
    if isinstance(idx, faiss.IndexIVFFlat):
        return True
    if isinstance(idx, faiss.IndexHNSW):
        return isinstance(faiss.downcast_index(idx.storage), faiss.IndexFlat)
    return False


def reconstruct_all(index: Any) -> np.ndarray:
    """All vectors of an index whose storage is exact (see `exactly_reconstructable`)."""
    import faiss

    n = int(index.ntotal)
    if n == 0:
        return np.zeros((0, index.d), np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and not ivf.direct_map.type:
        ivf.make_direct_map()  # IVF lists are keyed by list, not id; the map makes ids addressable
    return np.ascontiguousarray(index.reconstruct_n(0, n), dtype=np.float32)


def read_shard_vectors(snapshot: str | Path, manifest: dict[str, Any], shard_id: int, index: Any = None) -> np.ndarray:
    """The shard's exact float32 vectors: stored beside a lossy index, else reconstructed from it."""
    snapshot = Path(snapshot)
    info = shard_info(snapshot, manifest, shard_id)
    if info.get("vectors"):
        path = verify_file(snapshot, manifest, info["vectors"])
        try:
            vecs = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise IndexError_(f"{path}: not a plain float32 .npy file ({e})") from None
        if vecs.dtype != np.float32 or vecs.ndim != 2 or vecs.shape != (int(info["count"]), int(manifest["dim"])):
            raise IndexError_(f"{path}: expected float32 ({info['count']}, {manifest['dim']}), got {vecs.dtype} {vecs.shape}")
        return vecs
    index = index if index is not None else read_shard_index(snapshot, manifest, shard_id)
    if not exactly_reconstructable(index):
        raise IndexError_(
            f"{snapshot}: shard {shard_id} ({manifest['factory']}) stores lossy codes and no vectors; "
            "rebuild it with index.store_vectors=always to reshard without re-embedding"
        )
    return reconstruct_all(index)


def set_search_params(index: Any, nprobe: int, efsearch: int) -> None:
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", efsearch)):
        if value and value > 0:
            try:
                ps.set_index_parameter(index, name, int(value))
            except RuntimeError:
                pass  # the parameter does not apply to this index type


def faiss_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def to_gpu(index: Any, gpu_id: int) -> Any:
    """A GPU copy of `index` (faiss-gpu only). HNSW has no GPU form: it stays on the CPU."""
    import faiss

    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return index
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, int(gpu_id), index)
    gpu.referenced_resources = res  # keep the resources alive as long as the index
    return gpu
