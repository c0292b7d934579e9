"""The retrieval service: shard actors on Ray, a controller, and small client modules around one API.

Client side (imports the server side, never the reverse):
    api.py        Retriever (the protocol every consumer asks), SearchResult
    config.py     RetrievalConfig (+ hybrid, rerank), controller_name, validate_config
    retriever.py  ShardedRetriever: text -> passages (embed, cache, hybrid, rerank, pinned version)
    transport.py  replica choice, retry, hedge, deadline, fan-out, one update epoch, exact top-k merge
    view.py       the routing table: versions, canary, epochs; refreshed only when a shard says it moved
    admin.py      start/stop the service; load, canary, promote, rollback, unload, compact, update
    client.py     RetrievalClient = ShardedRetriever + admin verbs (the original name)
    metrics.py    latency/QPS/queue/cache;  rerank.py  cross-encoder;  cluster.py  Ray, loopback only
Server side, server/ (Ray actors; no client imports):
    controller.py versions, replicas, canary, promote/rollback, update log, generation pushes
    shard.py      one shard: FAISS or torch flat search, filters, update epochs, BM25
    filters.py    metadata filter specs -> row masks;  rows.py  rows with update epochs
    lexical.py    BM25 (bm25s)
"""
