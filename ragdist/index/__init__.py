"""FAISS index building and versioned, checksummed, atomically written snapshots.

    builder.py   chunks + vectors → sharded snapshot (recall@k of approximate indexes in the manifest)
    snapshot.py  versions, LATEST, checksums, restore;  reader.py  verified shard reads (no unpickling)
    reshard.py   N → M shards and streaming updates folded into a new version, without re-embedding
"""
