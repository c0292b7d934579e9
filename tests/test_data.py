import json

import pytest

from ragdist.data.builtin import materialize, write_airports
from ragdist.data.corpus import chunk_documents, load_documents
from ragdist.data.elements import write_elements
from ragdist.data.qa import DataConfig, QAExample, check_disjoint, load_qa
from ragdist.errors import DataError
from ragdist.index.snapshot import read_manifest
from tests.conftest import run_cli


def write(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_load_jsonl_keeps_metadata(tmp_path):
    p = write(tmp_path / "c.jsonl", [json.dumps({"id": "a", "text": "hello", "title": "T", "source": "s",
                                                 "timestamp": 5, "meta": {"tags": ["x"]}})])
    (doc,) = load_documents(p)
    assert (doc.id, doc.title, doc.source, doc.timestamp, doc.meta) == ("a", "T", "s", 5.0, {"tags": ["x"]})


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "1", "text": "x y"}, {"id": "2", "text": "z"}]), p)
    assert [d.id for d in load_documents(p)] == ["1", "2"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_documents(tmp_path / "nope.jsonl")


def test_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_documents(write(tmp_path / "c.jsonl", ["", "  "]))


def test_malformed_line_names_file_and_line(tmp_path):
    p = write(tmp_path / "c.jsonl", ['{"id": "a", "text": "ok"}', '{"id": "b", "text": '])
    with pytest.raises(DataError, match=r"c\.jsonl:2: malformed JSON"):
        load_documents(p)


def test_document_without_text(tmp_path):
    p = write(tmp_path / "c.jsonl", ['{"id": "a", "text": "ok"}', '{"id": "b", "text": "  "}'])
    with pytest.raises(DataError, match=r"c\.jsonl:2: document 'b' has no text"):
        load_documents(p)


def test_non_utf8(tmp_path):
    p = write(tmp_path / "c.jsonl", ['{"id": "a", "text": "ok"}', b'{"id": "b", "text": "caf\xe9"}'])
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid UTF-8"):
        load_documents(p)


def test_duplicate_ids(tmp_path):
    p = write(tmp_path / "c.jsonl", ['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'])
    with pytest.raises(DataError, match="duplicate document id 'a'"):
        load_documents(p)


def test_chunks_windows_overlap_and_ids(tmp_path, embedder):
    words = " ".join(f"w{i}" for i in range(300))
    p = write(tmp_path / "c.jsonl", [json.dumps({"id": "d", "text": words, "meta": {"k": 1}, "source": "s"})])
    chunks = chunk_documents(load_documents(p), embedder.tokenizer, window=64, overlap=16)
    assert [c.id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]
    assert len(chunks) > 2
    assert all(c.meta == {"k": 1} and c.source == "s" and c.doc_id == "d" for c in chunks)
    tok = embedder.tokenizer
    lens = [len(tok(c.text, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(lens) <= 64
    # consecutive windows share their overlap: the end of one is the start of the next
    a = tok(chunks[0].text, add_special_tokens=False)["input_ids"]
    b = tok(chunks[1].text, add_special_tokens=False)["input_ids"]
    assert a[-16:] == b[:16]
    assert chunks[-1].text.endswith("w299")


def test_chunk_rejects_bad_overlap(tiny_docs, embedder):
    with pytest.raises(DataError, match="chunk_overlap"):
        chunk_documents(tiny_docs, embedder.tokenizer, 32, 32)


def test_qa_loading_and_errors(tmp_path):
    p = write(tmp_path / "q.jsonl", ['{"question": "q?", "answers": ["a"], "gold_ids": ["d#0"]}'])
    (ex,) = load_qa(p)
    assert ex.answers == ["a"] and ex.gold_ids == ["d#0"]
    bad = write(tmp_path / "b.jsonl", ['{"question": "q?", "answers": ["a"]}', '{"question": "q2?", "answers": []}'])
    with pytest.raises(DataError, match=r"b\.jsonl:2: 'answers'"):
        load_qa(bad)


def test_eval_overlap_is_refused():
    a = [QAExample("1", "What is X?", ["x"])]
    b = [QAExample("2", "what is  x", ["x"])]
    with pytest.raises(DataError, match="also appear"):
        check_disjoint(a, b, "train.jsonl", "eval.jsonl")


def test_builtin_answers_in_gold_and_split_by_entity(tmp_path):
    paths = write_airports(tmp_path, 30, 0.2, seed=3)
    docs = {d.id: d.text for d in load_documents(paths["corpus"])}
    train, evals = load_qa(paths["train"]), load_qa(paths["eval"])
    for ex in train + evals:
        (gold,) = ex.gold_ids
        assert ex.answers[0] in docs[gold.split("#")[0]]
    train_docs = {g.split("#")[0] for ex in train for g in ex.gold_ids}
    eval_docs = {g.split("#")[0] for ex in evals for g in ex.gold_ids}
    assert train_docs and eval_docs and not (train_docs & eval_docs)
    assert len(eval_docs) == 6


def _entity(gold: str) -> str:
    return gold.split("#")[0].removesuffix("-history")


@pytest.fixture(scope="module")
def elements(tmp_path_factory):
    return write_elements(tmp_path_factory.mktemp("elements"), 118, 0.2, seed=0)


def test_elements_split_by_element_with_answers_in_the_gold_chunk(elements, embedder):
    docs = load_documents(elements["corpus"])
    assert len(docs) == 2 * 118 and all(d.source == "mendeleev" for d in docs)
    # the gold ids are chunk ids: check against the chunks the index really makes (default corpus.*)
    chunks = {c.id: c.text for c in chunk_documents(docs, embedder.tokenizer, 128, 32)}
    train, evals = load_qa(elements["train"]), load_qa(elements["eval"])
    for ex in train + evals:
        (gold,) = ex.gold_ids
        assert ex.answers[0] in chunks[gold], (ex.question, ex.answers, chunks[gold])
    train_els = {_entity(g) for ex in train for g in ex.gold_ids}
    eval_els = {_entity(g) for ex in evals for g in ex.gold_ids}
    assert len(eval_els) == round(118 * 0.2) and len(train_els) == 118 - len(eval_els)
    assert not train_els & eval_els
    check_disjoint(train, evals, elements["train"], elements["eval"])
    # several facts per passage, several templates, the source's own sentences kept
    assert len({ex.id.rsplit("-q", 1)[0] for ex in train + evals}) == 118
    names = {d.id: d.title.lower() for d in docs}
    templates = {ex.question.replace(names[_entity(ex.gold_ids[0])], "{}") for ex in train + evals}
    assert len(templates) == 8, templates
    iron = next(d for d in docs if d.id == "element-Fe")
    assert "Its standard atomic weight is 55.845 and its electron configuration is [Ar] 3d6 4s2." in iron.text
    assert "fourth most abundant element in the earth's crust" in iron.text
    hydrogen = next(d for d in docs if d.id == "element-H-history")
    assert hydrogen.text.startswith("Hydrogen was discovered by Henry Cavendish in England in 1766.")


def test_elements_same_seed_same_files_and_bad_sizes(tmp_path, elements):
    again = write_elements(tmp_path, 118, 0.2, seed=0)
    for key in ("corpus", "train", "eval"):
        assert open(again[key], "rb").read() == open(elements[key], "rb").read()
    with pytest.raises(DataError, match="data.num_entities=500: the element data has only 118"):
        write_elements(tmp_path, 500, 0.2, seed=0)
    with pytest.raises(DataError, match="data.eval_fraction=1.5"):
        write_elements(tmp_path, 20, 1.5, seed=0)


def test_materialize_picks_the_builtin_and_caches_by_parameters(tmp_path):
    cfg = DataConfig(builtin="elements", builtin_dir=str(tmp_path), num_entities=10, eval_fraction=0.2)
    paths = materialize(cfg)
    assert paths["corpus"] == str(tmp_path / "elements-v1-n10-e0.2-s0" / "corpus.jsonl")
    assert len(load_documents(paths["corpus"])) == 20
    assert materialize(cfg) == paths
    with pytest.raises(DataError, match="data.builtin='cities'.*airports, elements"):
        materialize(DataConfig(builtin="cities", builtin_dir=str(tmp_path)))


def test_data_elements_composes():
    from ragdist.config import as_object, compose

    cfg = as_object(compose(["data=elements", "run_dir=/tmp/x"]))
    assert cfg.data.builtin == "elements" and cfg.data.num_entities == 118 and not cfg.data.train
    assert cfg.corpus.path == ""


@pytest.mark.slow
def test_index_cli_builds_the_elements_dataset(tmp_path):
    proc = run_cli(["ragdist-index", "data=elements", f"data.builtin_dir={tmp_path / 'data'}",
                    f"index.root={tmp_path / 'idx'}", "index.num_shards=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    snapshot = proc.stdout.strip().splitlines()[-1]
    manifest = read_manifest(snapshot)
    assert len(manifest["shards"]) == 2 and sum(int(s["count"]) for s in manifest["shards"]) >= 236
    assert (tmp_path / "data" / "elements-v1-n118-e0.2-s0" / "eval.jsonl").is_file()
