import json

import pytest

from ragdist.data.builtin import write_airports
from ragdist.data.corpus import chunk_documents, load_documents
from ragdist.data.qa import QAExample, check_disjoint, load_qa
from ragdist.errors import DataError


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
