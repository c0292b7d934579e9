"""FAISS index building and versioned, checksummed, atomically written snapshots."""
