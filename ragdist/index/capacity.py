"""Capacity planning for a sharded index: bytes per vector from the FAISS factory string, memory per
shard / actor / GPU / node, build time from per-worker rates, a search-latency estimate, and a
refusal (naming the constraint) when the plan cannot fit. `ragdist-plan` prints it.

Sizes follow FAISS's serialization, which is also what a loaded index holds in memory:
    Flat       4·d per vector                     SQ8 / SQ4 / SQfp16   d, d/2, 2·d
    PQm[xb]    m·b/8 (b = 8 by default)           IVFn,<codes>         codes + 8-byte id per vector,
    HNSWM      storage + 4·(2M + M/(M-1)) links      + n·d·4 centroids + 8 bytes per list
               + 12 bytes of level/offset         PCA/OPQ/RR prefixes  change d; their matrices are fixed
    ,RFlat     + 4·d per vector (refinement)      IDMap                + 8 per vector
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ragdist.errors import ConfigError
from ragdist.index.config import PlanConfig  # noqa: F401 - the schema's home is index/config.py

GIB = 1 << 30

# Python objects per passage row in a shard actor (RowStore: id, doc_id, text, title, source, a
# 2-key meta dict, the id/doc maps, epochs), beyond the UTF-8 bytes of its strings. Measured with
# tracemalloc on the built-in airport passages: 1,000 bytes per row.
ROW_OVERHEAD_BYTES = 1000
# One shard actor process with FAISS, pyarrow and Ray loaded, before any shard: ~184 MB RSS,
# ~75 MB proportional (shared libraries counted once per node). Measured here.
ACTOR_BASE_BYTES = 184 * (1 << 20)
# CUDA context + FAISS StandardGpuResources temporary memory per GPU process (assumed, not measured:
# no GPU was lent here; FAISS reserves up to 1.5 GiB of scratch by default).
GPU_OVERHEAD_BYTES = 2 * GIB
HEADER = 64  # fourcc, d, ntotal, flags of one serialized FAISS index (generous)
HNSW_TABLES = 2 * HEADER + 8 * 10 + 4 * 11  # graph header, level probabilities, neighbours per level


# ------------------------------------------------------------------------------ factory → bytes
@dataclass
class IndexSize:
    per_vector: float  # bytes per stored vector (codes, ids, links)
    fixed: float  # bytes per shard independent of its size (trained parts, headers)
    per_list: float = 0.0  # IVF: bytes per inverted list
    lists: int = 0

    def bytes(self, n: int) -> float:
        return self.fixed + self.per_list * self.lists + self.per_vector * n


def _codes(token: str, d: int, factory: str) -> tuple[float, float]:
    """(bytes per vector, fixed trained bytes) of a code type: Flat, PQm[xb][fs], SQ4/6/8/fp16/bf16."""
    if token == "Flat":
        return 4.0 * d, 0.0
    m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs|fsr|np)?", token)
    if m:
        M, nbits = int(m.group(1)), int(m.group(2) or 8)
        if d % M:
            raise ConfigError(f"index.factory={factory!r}: PQ{M} needs a dim divisible by {M}, have {d}")
        return math.ceil(M * nbits / 8), 4.0 * d * (1 << nbits) + HEADER
    m = re.fullmatch(r"SQ(4|6|8|fp16|bf16)", token)
    if m:
        bits = {"4": 4, "6": 6, "8": 8, "fp16": 16, "bf16": 16}[m.group(1)]
        trained = 0.0 if bits == 16 else 2 * 4.0 * d
        return math.ceil(d * bits / 8), trained + HEADER
    raise ConfigError(f"index.factory={factory!r}: cannot size the component {token!r} "
                      "(known: Flat, PQm[xb], SQ4/6/8/fp16, IVFn, HNSWM, PCA/OPQ/RR prefixes, IDMap, RFlat)")


def index_size(factory: str, d: int) -> IndexSize:
    """Bytes of one shard of `factory` at dimension `d`, as a function of its vector count."""
    parts = [p.strip() for p in factory.split(",") if p.strip()]
    if not parts:
        raise ConfigError("index.factory is empty")
    fixed, per_vector = float(HEADER), 0.0
    d_in = d
    # vector transforms change the dimension the codes see; their matrices are fixed bytes
    while parts:
        p = parts[0]
        m = re.fullmatch(r"PCAW?R?(\d+)|OPQ\d+(?:_(\d+))?|RR(\d+)|L2norm", p)
        if not m:
            break
        out = int(next((g for g in m.groups() if g), d_in)) if p != "L2norm" else d_in
        pca = 4.0 * (d_in * d_in + 3 * d_in) if p.startswith("PCA") else 0.0
        fixed += 4.0 * (out * d_in + out) + pca + HEADER
        d_in = out
        parts.pop(0)
    if parts and parts[0] in ("IDMap", "IDMap2"):
        per_vector += 8.0 if parts[0] == "IDMap" else 24.0
        parts.pop(0)
    if parts and parts[-1] in ("RFlat", "Refine(Flat)"):
        per_vector += 4.0 * d  # the refinement keeps exact vectors of the input dimension
        fixed += HEADER
        parts.pop()
    if not parts:
        raise ConfigError(f"index.factory={factory!r}: no index after the prefixes")
    head, rest = parts[0], parts[1:]
    m = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", head)
    if m:
        nlist = int(m.group(1))
        if len(rest) != 1:
            raise ConfigError(f"index.factory={factory!r}: IVF needs one code type after it, e.g. IVF{nlist},PQ32")
        code, trained = _codes(rest[0], d_in, factory)
        quantizer = 4.0 * d_in * nlist
        if m.group(2):
            M = int(m.group(2))
            quantizer += nlist * (4.0 * (2 * M + M / max(M - 1, 1)) + 12) + HNSW_TABLES
        return IndexSize(per_vector=per_vector + code + 8.0, fixed=fixed + quantizer + trained + HEADER,
                         per_list=8.0, lists=nlist)
    m = re.fullmatch(r"HNSW(\d+)(?:_(.+))?", head)
    if m:
        M = int(m.group(1))
        storage = m.group(2) or (rest[0] if rest else "Flat")
        if len(rest) > (0 if m.group(2) else 1):
            raise ConfigError(f"index.factory={factory!r}: cannot size what follows {head!r}")
        code, trained = _codes(storage, d_in, factory)
        links = 4.0 * (2 * M + M / max(M - 1, 1)) + 4 + 8  # neighbours, level, offset
        return IndexSize(per_vector=per_vector + code + links, fixed=fixed + trained + HNSW_TABLES)
    if rest:
        raise ConfigError(f"index.factory={factory!r}: cannot size {head!r} followed by {rest}")
    code, trained = _codes(head, d_in, factory)
    return IndexSize(per_vector=per_vector + code, fixed=fixed + trained)


def ivf_lists(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------ the plan
def count_chunks(corpus: Any, tokenizer: Any, sample_docs: int = 0) -> tuple[int, float, int]:
    """(chunks, mean passage bytes, documents read) of a corpus file, part by part (bounded memory).

    With `sample_docs`, only the first documents are chunked and the count is scaled by the
    fraction of the file they span.
    """
    import tempfile

    from ragdist.data.corpus import split_corpus

    with tempfile.TemporaryDirectory() as tmp:
        # A gzip'd corpus counted whole is decompressed once (a sample reads only its first parts).
        parts = split_corpus(corpus.path, corpus.format, 4 << 20, corpus.max_docs,
                             spill_dir=None if sample_docs else tmp)  # fmt: skip
        return _count(corpus, parts, tokenizer, sample_docs)


def _count(corpus: Any, parts: list[dict[str, Any]], tokenizer: Any, sample_docs: int) -> tuple[int, float, int]:
    from pathlib import Path

    from ragdist.data.corpus import chunk_documents, read_part

    total_units = parts[-1]["end"] if parts else 0
    chunks, text_bytes, docs, seen_units = 0, 0, 0, 0
    for p in parts:
        part_docs = read_part(corpus.path, corpus.format, p, corpus.fields)
        if sample_docs and docs + len(part_docs) > sample_docs:
            part_docs = part_docs[: sample_docs - docs]
        cs = chunk_documents([d for _, d in part_docs], tokenizer, corpus.chunk_tokens, corpus.chunk_overlap)
        chunks += len(cs)
        text_bytes += sum(len(c.text.encode()) + len(c.title.encode()) + len(c.id) + len(c.doc_id) + len(c.source)
                          for c in cs)
        docs += len(part_docs)
        if sample_docs and docs >= sample_docs:
            nxt = part_docs[-1][0] + 1 if part_docs else p["end"]
            seen_units = nxt if Path(corpus.path).suffix not in (".parquet", ".pq") else docs
            break
        seen_units = p["end"]
    scale = total_units / seen_units if seen_units and seen_units < total_units else 1.0
    return int(round(chunks * scale)), (text_bytes / chunks if chunks else 0.0), docs


def availability_replicas(p_up: float, shards: int, target: float) -> int:
    """Fewest replicas per shard so that every shard has a live replica with probability >= target."""
    if not 0 < p_up < 1:
        return 1
    for r in range(1, 65):
        if (1 - (1 - p_up) ** r) ** shards >= target:
            return r
    return 64


def make_plan(
    plan: PlanConfig,
    *,
    factory: str,
    shards: int,
    replicas: int,
    shards_per_gpu: int,
    nprobe: int,
    store_vectors: str,
    passages: int,
    dim: int,
    passage_bytes: float,
    build_workers: int,
    train_sample: int,
) -> dict[str, Any]:
    """Every figure of the plan, and the constraints it violates (empty when it fits)."""
    if passages <= 0:
        raise ConfigError(f"plan.passages={passages}: must be > 0 (or give corpus.path)")
    if shards < 1 or replicas < 1 or plan.nodes < 1:
        raise ConfigError("index.num_shards, retrieval.replicas and plan.nodes must be >= 1")
    size = index_size(factory, dim)
    per_shard_n = math.ceil(passages / shards)
    shard_index = size.bytes(per_shard_n)
    exact_codes = size.per_vector >= 4.0 * dim
    keeps_vectors = store_vectors == "always" or (store_vectors == "auto" and not exact_codes)
    shard_vectors_disk = 4.0 * dim * per_shard_n if keeps_vectors else 0.0
    shard_rows = per_shard_n * (passage_bytes + ROW_OVERHEAD_BYTES)
    shard_rows_disk = per_shard_n * passage_bytes * 0.5  # Parquet: compressed text, measured ~2x here
    actors = shards * replicas
    gpu = plan.gpus > 0
    gpu_slots = plan.gpus * max(1, shards_per_gpu)
    per_gpu = (max(1, shards_per_gpu) * shard_index + GPU_OVERHEAD_BYTES) if gpu else 0.0
    actor_ram = ACTOR_BASE_BYTES + shard_rows + (0.0 if gpu else shard_index)
    actors_per_node = math.ceil(actors / plan.nodes)
    node_ram = actors_per_node * actor_ram
    violations = []
    usable_gpu = plan.gpu_memory_gb * GIB * plan.headroom
    usable_node = plan.node_memory_gb * GIB * plan.headroom
    if gpu and actors > gpu_slots:
        violations.append(f"GPU slots: {shards} shards x {replicas} replicas = {actors} shard actors, but "
                          f"plan.gpus={plan.gpus} x retrieval.shards_per_gpu={shards_per_gpu} = {gpu_slots} slots")
    if gpu and per_gpu > usable_gpu:
        need = math.ceil(shards * per_gpu / usable_gpu)
        violations.append(f"GPU memory: {max(1, shards_per_gpu)} shard(s) of {shard_index / GIB:.1f} GiB + "
                          f"{GPU_OVERHEAD_BYTES / GIB:.0f} GiB overhead = {per_gpu / GIB:.1f} GiB per GPU > "
                          f"plan.gpu_memory_gb={plan.gpu_memory_gb:g} x headroom {plan.headroom:g} = "
                          f"{usable_gpu / GIB:.1f} GiB; use index.num_shards >= {need} or a smaller code")
    if node_ram > usable_node:
        violations.append(f"node memory: {actors_per_node} shard actors x {actor_ram / GIB:.2f} GiB = "
                          f"{node_ram / GIB:.1f} GiB per node > plan.node_memory_gb={plan.node_memory_gb:g} x "
                          f"headroom {plan.headroom:g} = {usable_node / GIB:.1f} GiB; add nodes or shards")
    lists = ivf_lists(factory)
    if lists and per_shard_n < lists:
        violations.append(f"IVF lists: {per_shard_n} vectors per shard < {lists} lists; fewer lists or shards")
    if lists and train_sample < 39 * lists:
        violations.append(f"IVF training: index.train_sample={train_sample} < 39 x {lists} lists "
                          f"(FAISS's minimum for k-means); raise index.train_sample")

    # build time: embedding at the per-worker rate; k-means + add as GEMM work; writes ignored
    rate = plan.embed_rate or (plan.gpu_embed_rate if gpu else plan.cpu_embed_rate)
    embed_s = passages / (rate * build_workers)
    sample = min(train_sample, passages)
    train_flops = 2.0 * sample * max(lists, 1) * dim * 25  # 25 k-means iterations
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if pq:
        train_flops += 2.0 * sample * (1 << int(pq.group(2) or 8)) * dim * 25
    train_s = train_flops / ((plan.gpu_gflops if gpu else plan.cpu_gflops) * 1e9)
    add_flops = 2.0 * per_shard_n * dim * ((lists if lists else 0) + ((1 << int(pq.group(2) or 8)) if pq else 0))
    add_s = add_flops / ((plan.add_gflops or plan.cpu_gflops) * 1e9)  # shards are added in parallel

    # search: per shard scan + coarse assignment; fan-out cost a + b·S
    if lists:
        scanned = per_shard_n * min(nprobe, lists) / lists * (size.per_vector - 8)
        coarse = 2.0 * lists * dim / (plan.cpu_gflops * 1e9)
    else:
        scanned = per_shard_n * (size.per_vector if not exact_codes else 4.0 * dim)
        coarse = 0.0
    if factory.startswith("HNSW") or "_HNSW" in factory or ",HNSW" in factory:
        scanned = 64 * 32 * size.per_vector  # efSearch x neighbours visited, order of magnitude
    shard_ms = 1000.0 * (scanned / (plan.scan_gbps * 1e9) + coarse)
    fanout_ms = plan.fanout_ms + plan.fanout_ms_per_shard * shards + plan.fanout_ms_per_shard_sq * shards**2
    need_r = availability_replicas(plan.replica_availability, shards, plan.target_availability)
    return {
        "fits": not violations,
        "violations": violations,
        "inputs": {"passages": passages, "dim": dim, "factory": factory, "shards": shards, "replicas": replicas,
                   "gpus": plan.gpus, "nodes": plan.nodes, "shards_per_gpu": shards_per_gpu, "nprobe": nprobe,
                   "passage_bytes": round(passage_bytes, 1), "build_workers": build_workers,
                   "embed_rate_per_worker": rate},
        "bytes_per_vector": round(size.per_vector, 2),
        "fixed_bytes_per_shard": round(size.fixed + size.per_list * size.lists),
        "vectors_per_shard": per_shard_n,
        "index_bytes_per_shard": round(shard_index),
        "index_bytes_total": round(shard_index * shards),
        "vectors_file_bytes_per_shard": round(shard_vectors_disk),
        "rows_memory_bytes_per_shard": round(shard_rows),
        "snapshot_disk_bytes": round(shards * (shard_index + shard_vectors_disk + shard_rows_disk)),
        "shard_actors": actors,
        "memory_per_actor_bytes": round(actor_ram),
        "memory_per_gpu_bytes": round(per_gpu),
        "actors_per_node": actors_per_node,
        "memory_per_node_bytes": round(node_ram),
        "build_s": {"embed": round(embed_s, 1), "train": round(train_s, 1), "add": round(add_s, 1),
                    "total": round(embed_s + train_s + add_s, 1)},
        "search_ms": {"per_shard": round(shard_ms, 3), "fanout": round(fanout_ms, 3),
                      "total": round(shard_ms + fanout_ms, 3)},
        "replicas_for_target_availability": need_r,
    }


def table(p: dict[str, Any]) -> str:
    """The plan as an aligned text table."""
    gib = lambda b: f"{b / GIB:,.2f} GiB"  # noqa: E731
    i = p["inputs"]
    rows = [
        ("passages x dim", f"{i['passages']:,} x {i['dim']}"),
        ("factory", i["factory"]),
        ("shards x replicas", f"{i['shards']} x {i['replicas']} = {p['shard_actors']} actors"),
        ("bytes per vector", f"{p['bytes_per_vector']:,}"),
        ("fixed bytes per shard", f"{p['fixed_bytes_per_shard']:,}"),
        ("index per shard / total", f"{gib(p['index_bytes_per_shard'])} / {gib(p['index_bytes_total'])}"),
        ("passage rows per shard (RAM)", gib(p["rows_memory_bytes_per_shard"])),
        ("memory per actor", gib(p["memory_per_actor_bytes"])),
        ("memory per GPU", gib(p["memory_per_gpu_bytes"]) if i["gpus"] else "- (CPU serving)"),
        ("memory per node", f"{gib(p['memory_per_node_bytes'])} ({p['actors_per_node']} actors)"),
        ("snapshot on disk", gib(p["snapshot_disk_bytes"])),
        ("build: embed / train / add", "{embed:,.0f} s / {train:,.0f} s / {add:,.0f} s".format(**p["build_s"])),
        ("search: shard + fan-out", "{per_shard:.2f} + {fanout:.2f} = {total:.2f} ms".format(**p["search_ms"])),
        ("replicas for availability", str(p["replicas_for_target_availability"])),
        ("fits", "yes" if p["fits"] else "NO: " + "; ".join(p["violations"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)
