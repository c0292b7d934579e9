"""Reshard a snapshot from N to M shards without re-embedding.

The vectors come back out of the shards themselves (exact reconstruction from Flat, IVF-Flat and
HNSW-Flat storage; the `.npy` kept beside PQ/SQ shards otherwise), the trained quantizer is reused
(an emptied clone of shard 0), and global ids are preserved so that every passage keeps its id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import ConfigError
from ragdist.index import snapshot as snap
from ragdist.index.builder import assign_doc_ids, held_out_queries, measure_recall, write_shards
from ragdist.index.reader import read_shard_index, read_shard_rows, read_shard_vectors

# Manifest entries that describe the inputs of one particular build: a resharded snapshot is a
# different layout, so it must not be mistaken for (and reused as) the original build.
_BUILD_ONLY = {"key", "shards", "files", "format", "version", "created", "recall", "num_shards", "sharding",
               "search", "num_chunks"}


def load_all(snapshot: str | Path) -> tuple[dict[str, Any], Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(manifest, empty trained template, global ids, vectors, rows) of a whole snapshot, in gid order."""
    import faiss

    src = snap.resolve(snapshot)
    m = snap.read_manifest(src)
    template = None
    gids, vecs, rows = [], [], []
    for s in range(int(m["num_shards"])):
        index = read_shard_index(src, m, s)
        if template is None:
            template = faiss.clone_index(index)
            template.reset()
        vecs.append(read_shard_vectors(src, m, s, index))
        g, cols = read_shard_rows(src, m, s)
        gids.append(g)
        for i in range(len(g)):
            row = {c: cols[c][i] for c in cols}
            row["meta"] = json.dumps(row["meta"], sort_keys=True)
            rows.append(row)
    gid = np.concatenate(gids) if gids else np.zeros(0, np.int64)
    order = np.argsort(gid, kind="stable")
    allv = np.concatenate(vecs) if vecs else np.zeros((0, int(m["dim"])), np.float32)
    return m, template, gid[order], allv[order], [rows[i] for i in order]


def reshard(
    snapshot: str | Path,
    num_shards: int,
    *,
    sharding: str | None = None,
    root: str | Path | None = None,
    store_vectors: str = "auto",
) -> Path:
    """A new snapshot version holding the same vectors, rows and ids in `num_shards` shards.

    Written atomically under `root` (default: the source's root) and made its LATEST.
    """
    m, template, gids, vectors, rows = load_all(snapshot)
    sharding = sharding or m.get("sharding", "contiguous")
    if template is None:
        raise ConfigError(f"{snapshot}: snapshot has no shards to reshard")
    positions = assign_doc_ids([r["doc_id"] for r in rows], num_shards, sharding)
    src = snap.resolve(snapshot)
    search = m.get("search", {})
    manifest = {k: v for k, v in m.items() if k not in _BUILD_ONLY}
    manifest.update(sharding=sharding, resharded_from={"version": m["version"], "num_shards": m["num_shards"]})
    old = m.get("recall") or {}

    def recall(indexes: list[Any], shard_gids: list[np.ndarray]) -> dict[str, Any] | None:
        # Same held-out rows as the original build when it recorded them, so the figures compare.
        k = int(old.get("k", 10))
        pos_of = {int(g): i for i, g in enumerate(gids)}
        qg = np.array([pos_of[g] for g in old.get("query_gids", []) if g in pos_of], np.int64)
        if not len(qg):
            qg = held_out_queries(len(vectors), 256, 0, None)
        # measure_recall indexes vectors by global id; map positions <-> gids around it.
        dense = {int(g): i for i, g in enumerate(gids)}
        local = [np.array([dense[int(g)] for g in sg], np.int64) for sg in shard_gids]
        out = measure_recall(indexes, local, vectors, k, m["metric"], query_gids=qg)
        out["query_gids"] = [int(gids[p]) for p in qg]
        return out

    return write_shards(
        root or src.parent, template, positions, vectors, rows, manifest, gids=gids,
        store_vectors=store_vectors, nprobe=int(search.get("nprobe", 16)), efsearch=int(search.get("efsearch", 64)),
        recall=recall,
    )


def fold_updates(
    snapshot: str | Path,
    updates: list[dict[str, Any]],
    *,
    next_gid: int,
    root: str | Path | None = None,
) -> Path:
    """A new snapshot version = `snapshot` with streaming updates applied, in order.

    Each update is {"delete_ids", "delete_doc_ids", "add": {"gids", "vectors", "rows"}} — one epoch
    of the service's log, with a chunk's deletion applied before the epoch's additions (an upsert
    is a delete plus an add). Global ids are kept, so cached ids and passages stay meaningful.
    """
    m, template, gids, vectors, rows = load_all(snapshot)
    if template is None:
        raise ConfigError(f"{snapshot}: snapshot has no shards")
    alive = np.ones(len(rows), dtype=bool)
    by_id: dict[str, list[int]] = {}
    by_doc: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_id.setdefault(r["id"], []).append(i)
        by_doc.setdefault(r["doc_id"], []).append(i)
    new_vecs, new_gids = [vectors], [gids]
    for u in updates:
        for table, keys in ((by_id, u.get("delete_ids", ())), (by_doc, u.get("delete_doc_ids", ()))):
            for key in keys:
                for i in table.get(key, ()):
                    alive[i] = False
        add = u.get("add") or {}
        for row in add.get("rows", ()):
            i = len(rows)
            rows.append({**row, "meta": json.dumps(row.get("meta") or {}, sort_keys=True),
                         "timestamp": row.get("timestamp")})
            by_id.setdefault(row["id"], []).append(i)
            by_doc.setdefault(row["doc_id"], []).append(i)
        if len(add.get("gids", ())):
            new_vecs.append(np.asarray(add["vectors"], np.float32))
            new_gids.append(np.asarray(add["gids"], np.int64))
            alive = np.concatenate([alive, np.ones(len(add["gids"]), dtype=bool)])
    keep = np.flatnonzero(alive)
    vectors = np.concatenate(new_vecs)[keep]
    gids = np.concatenate(new_gids)[keep]
    rows = [rows[i] for i in keep]
    src = snap.resolve(snapshot)
    positions = assign_doc_ids([r["doc_id"] for r in rows], int(m["num_shards"]), m.get("sharding", "contiguous"))
    search = m.get("search", {})
    manifest = {k: v for k, v in m.items() if k not in _BUILD_ONLY}
    manifest.update(sharding=m.get("sharding", "contiguous"), next_gid=int(next_gid),
                    updated_from={"version": m["version"], "updates": len(updates)})
    return write_shards(
        root or src.parent, template, positions, vectors, rows, manifest, gids=gids,
        nprobe=int(search.get("nprobe", 16)), efsearch=int(search.get("efsearch", 64)),
    )
