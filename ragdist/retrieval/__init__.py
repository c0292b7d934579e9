"""The retrieval service: shard actors on Ray, a controller, and a fan-out/merge client.

    service.py   controller actor: versions, replicas, canary, promote/rollback, update log
    shard.py     one shard: FAISS or torch flat search, filters, update epochs, BM25
    client.py    RetrievalConfig, RetrievalClient (balancing, retries, merge, cache, hybrid, rerank)
    filters.py   metadata filter specs → row masks;  rows.py  rows with update epochs
    lexical.py   BM25 (bm25s);  rerank.py  cross-encoder;  metrics.py  latency/QPS/queue/cache
    cluster.py   start or attach to Ray, loopback only unless an address is given
"""
