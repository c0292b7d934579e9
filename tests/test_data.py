import datetime
import gzip
import json
import logging

import pytest

from ragdist.data.builtin import materialize, write_airports
from ragdist.data.corpus import CorpusFields, chunk_documents, load_documents, path_digest
from ragdist.data.elements import write_elements
from ragdist.data.qa import DataConfig, QAExample, QAFields, check_disjoint, check_gold_ids, load_qa
from ragdist.errors import DataError
from ragdist.index.snapshot import read_manifest
from tests.conftest import run_cli

DOCS = [{"id": "a", "text": "alpha text", "title": "A"}, {"id": "b", "text": "beta text", "title": "B"}]
QA = [
    {"id": "q1", "question": "What is alpha?", "answers": ["alpha"], "gold_ids": ["a#0"]},
    {"id": "q2", "question": "What is beta?", "answers": ["beta"], "gold_ids": ["b"]},
]


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


@pytest.mark.parametrize("kind", ["sentence-transformers", "hf"])
def test_chunk_token_ids_encode_as_their_text(tmp_path, embedder, kind):
    """A chunk that is its whole document brings its tokens, and the embedder encodes them to its
    text's vector (cut to the embedder's max_length alike); a window of a longer document brings
    none (its text, cut inside a word, may tokenize otherwise) and is encoded from its text."""
    import numpy as np

    from ragdist.embed import EmbedderConfig, build_embedder
    from ragdist.embed.embedder import encode_chunks

    texts = ["Élévation 1,495 m (4,905 ft) — Zürich's ICAO code is LSZH.", "a", "?",
             " ".join(f"token{i}" for i in range(15)), "tab\tand\nnewline  spaces"]
    rows = [json.dumps({"id": "long", "text": " ".join(f"w{i}" for i in range(300))})]
    rows += [json.dumps({"id": f"s{i}", "text": t}) for i, t in enumerate(texts)]
    enc = embedder if kind == "sentence-transformers" else build_embedder(
        EmbedderConfig(kind="hf", max_length=24, progress=False))
    ids: list = []
    chunks = chunk_documents(load_documents(write(tmp_path / "c.jsonl", rows)), enc.tokenizer, 64, 16, token_ids=ids)
    assert len(ids) == len(chunks) and enc.accepts_ids
    assert sum(c.doc_id == "long" for c in chunks) > 2
    assert all(i is None for c, i in zip(chunks, ids) if c.doc_id == "long")
    for c, i in zip(chunks, ids):
        if c.doc_id != "long":
            assert i == enc.tokenizer(c.text, add_special_tokens=False)["input_ids"], c.text
    got = encode_chunks(enc, [c.text for c in chunks], ids)
    np.testing.assert_allclose(got, enc.encode([c.text for c in chunks]), atol=1e-5)
    only_ids = [i for i in ids if i is not None]
    np.testing.assert_allclose(enc.encode_ids(only_ids),
                               enc.encode([c.text for c, i in zip(chunks, ids) if i is not None]), atol=1e-5)


def test_chunk_rejects_bad_overlap(tiny_docs, embedder):
    with pytest.raises(DataError, match="chunk_overlap"):
        chunk_documents(tiny_docs, embedder.tokenizer, 32, 32)


def test_qa_loading_and_errors(tmp_path):
    p = write(tmp_path / "q.jsonl", ['{"question": "q?", "answers": ["a"], "gold_ids": ["d#0"]}'])
    (ex,) = load_qa(p)
    assert ex.answers == ["a"] and ex.gold_ids == ["d#0"]
    bad = write(tmp_path / "b.jsonl", ['{"question": "q?", "answers": ["a"]}', '{"question": "q2?", "answers": []}'])
    with pytest.raises(DataError, match=r"b\.jsonl:2: key 'answers': expected a non-empty list"):
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


# ---------------------------------------------------------------- formats


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def summary(docs):
    return [(d.id, d.text, d.title) for d in docs]


EXPECTED_DOCS = [("a", "alpha text", "A"), ("b", "beta text", "B")]


def test_jsonl_gz(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl_bytes(DOCS)))
    assert summary(load_documents(p)) == EXPECTED_DOCS
    q = tmp_path / "q.jsonl.gz"
    q.write_bytes(gzip.compress(jsonl_bytes(QA)))
    assert [(e.id, e.gold_ids) for e in load_qa(q)] == [("q1", ["a#0"]), ("q2", ["b"])]


def test_gzip_detected_from_bytes_and_truncation_named(tmp_path):
    # gzip'd content under a plain .jsonl name still reads: compression comes from the bytes
    p = tmp_path / "c.jsonl"
    p.write_bytes(gzip.compress(jsonl_bytes(DOCS * 1)))
    assert summary(load_documents(p)) == EXPECTED_DOCS
    bad = tmp_path / "t.jsonl.gz"
    data = gzip.compress(jsonl_bytes([{"id": str(i), "text": "x" * 50 + str(i)} for i in range(200)]))
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz:\d+: cannot decompress"):
        load_documents(bad)


def test_utf8_bom(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(DOCS))
    assert summary(load_documents(p)) == EXPECTED_DOCS
    q = tmp_path / "q.jsonl"
    q.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(QA))
    assert [e.question for e in load_qa(q)] == ["What is alpha?", "What is beta?"]


def test_parquet_qa_and_timestamp_column(tmp_path):
    q = write_parquet(tmp_path / "q.parquet", QA)
    assert [(e.id, e.answers, e.gold_ids) for e in load_qa(q)] == [("q1", ["alpha"], ["a#0"]), ("q2", ["beta"], ["b"])]
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    c = write_parquet(tmp_path / "c.parquet", [{"id": 7, "text": "t", "timestamp": when}])
    (doc,) = load_documents(c)
    assert doc.id == "7" and doc.timestamp == when.replace(tzinfo=datetime.timezone.utc).timestamp()


def test_datasets_save_to_disk_dir(tmp_path):
    c = save_dataset(tmp_path / "corpus_ds", [dict(d, meta=json.dumps({"k": 1})) for d in DOCS])
    docs = load_documents(c)
    assert summary(docs) == EXPECTED_DOCS and docs[0].meta == {"k": 1}
    q = save_dataset(tmp_path / "qa_ds", QA)
    assert [(e.id, e.gold_ids) for e in load_qa(q)] == [("q1", ["a#0"]), ("q2", ["b"])]
    # the digest that keys index snapshots covers a directory's files
    d1 = path_digest(c)
    save_dataset(tmp_path / "corpus_ds2", [dict(d, text=d["text"] + "!") for d in DOCS])
    assert d1 == path_digest(c) != path_digest(tmp_path / "corpus_ds2")


def test_datasets_dict_one_split_or_refused(tmp_path):
    import datasets

    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(DOCS)}).save_to_disk(str(one))
    assert summary(load_documents(one)) == EXPECTED_DOCS
    two = tmp_path / "two"
    split = datasets.Dataset.from_list(DOCS)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(two))
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]; point the path at one split"):
        load_documents(two)
    assert summary(load_documents(two / "test")) == EXPECTED_DOCS


def test_format_errors_name_path_and_key(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n")
    with pytest.raises(DataError, match=r"c\.csv: cannot tell the format.*corpus\.format=jsonl\|parquet\|datasets"):
        load_documents(tmp_path / "c.csv")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a `datasets` save_to_disk one"):
        load_documents(tmp_path / "plain")
    with pytest.raises(DataError, match="corpus.format='csv'"):
        load_documents(tmp_path / "c.csv", fmt="csv")
    with pytest.raises(DataError, match="data.format='tsv'"):
        load_qa(tmp_path / "c.csv", fmt="tsv")
    # an explicit format overrides the extension
    p = tmp_path / "corpus.txt"
    p.write_bytes(jsonl_bytes(DOCS))
    assert summary(load_documents(p, fmt="jsonl")) == EXPECTED_DOCS


# ---------------------------------------------------------------- column mapping


def test_corpus_column_mapping(tmp_path):
    rows = [{"doc_id": 1, "body": "alpha text", "name": "A", "when": 10, "extra": {"x": 1}}]
    fields = CorpusFields(id="doc_id", text="body", title="name", timestamp="when", meta="extra")
    for path in (write(tmp_path / "c.jsonl", [json.dumps(r) for r in rows]), write_parquet(tmp_path / "c.parquet", rows),
                 save_dataset(tmp_path / "c_ds", rows)):
        (doc,) = load_documents(path, fields=fields)
        assert (doc.id, doc.text, doc.title, doc.timestamp, doc.meta) == ("1", "alpha text", "A", 10.0, {"x": 1})
    # default names: each format says which key or column is missing and which config key maps it
    with pytest.raises(DataError, match=r"c\.jsonl:1: no key 'id' \(set corpus\.fields\.id .*keys here: doc_id, body"):
        load_documents(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match=r"c\.parquet: no column 'text' \(set corpus\.fields\.text .*columns here: doc_id, body"):
        load_documents(tmp_path / "c.parquet", fields=CorpusFields(id="doc_id"))
    with pytest.raises(DataError, match=r"c_ds: no column 'id' \(set corpus\.fields\.id"):
        load_documents(tmp_path / "c_ds")


def test_qa_column_mapping(tmp_path):
    rows = [{"qid": "x1", "prompt": "Where?", "targets": ["here"], "positives": ["a#0", "b"]}]
    fields = QAFields(id="qid", question="prompt", answers="targets", gold_ids="positives")
    for path in (write(tmp_path / "q.jsonl", [json.dumps(r) for r in rows]), write_parquet(tmp_path / "q.parquet", rows),
                 save_dataset(tmp_path / "q_ds", rows)):
        (ex,) = load_qa(path, fields=fields)
        assert (ex.id, ex.question, ex.answers, ex.gold_ids) == ("x1", "Where?", ["here"], ["a#0", "b"])
    with pytest.raises(DataError, match=r"q\.jsonl:1: no key 'question' \(set data\.fields\.question"):
        load_qa(tmp_path / "q.jsonl")
    with pytest.raises(DataError, match=r"q_ds: row 0: no answers \(key 'answers'\)"):
        load_qa(tmp_path / "q_ds", fields=QAFields(question="prompt"))


def test_config_fields_reach_the_readers(tmp_path):
    from ragdist.config import compose
    from ragdist.recipes.common import load_qa_file

    q = write_parquet(tmp_path / "q.parquet", [{"prompt": "Where?", "answers": ["here"]}])
    cfg = compose(["data.fields.question=prompt"])
    (ex,) = load_qa_file(cfg, str(q))
    assert ex.question == "Where?" and ex.id == "q-0"


# ---------------------------------------------------------------- wrong types


def test_wrong_types_named_with_file_row_and_key(tmp_path):
    p = write(tmp_path / "c.jsonl", [json.dumps(DOCS[0]), json.dumps({"id": "b", "text": 5})])
    with pytest.raises(DataError, match=r"c\.jsonl:2: key 'text': expected a string, got int$"):
        load_documents(p)
    p = write_parquet(tmp_path / "corpus.parquet", [{"id": "a", "text": 1}, {"id": "b", "text": 3}])
    with pytest.raises(DataError, match=r"corpus\.parquet: row 0: key 'text': expected a string, got int$"):
        load_documents(p)
    d = save_dataset(tmp_path / "c_ds", [{"id": 1.5, "text": "x"}])
    with pytest.raises(DataError, match=r"c_ds: row 0: key 'id': expected a string or an integer, got float$"):
        load_documents(d)
    p = write(tmp_path / "m.jsonl", [json.dumps(DOCS[0]), json.dumps(DOCS[1]), json.dumps({"id": "c", "text": "x", "meta": [1]})])
    with pytest.raises(DataError, match=r"m\.jsonl:3: key 'meta': expected an object, got list$"):
        load_documents(p)
    p = write(tmp_path / "t.jsonl", [json.dumps({"id": "a", "text": "x", "timestamp": "yesterday"})])
    with pytest.raises(DataError, match=r"t\.jsonl:1: key 'timestamp': expected a number \(unix seconds\), got str$"):
        load_documents(p)
    p = write(tmp_path / "n.jsonl", [json.dumps({"id": "a", "text": "x", "title": 3})])
    with pytest.raises(DataError, match=r"n\.jsonl:1: key 'title': expected a string, got int$"):
        load_documents(p)


def test_qa_wrong_types_named(tmp_path):
    p = write_parquet(tmp_path / "q.parquet", [{"question": 7, "answers": ["a"]}])
    with pytest.raises(DataError, match=r"q\.parquet: row 0: key 'question': expected a string, got int$"):
        load_qa(p)
    p = write(tmp_path / "q.jsonl", [json.dumps(QA[0]), json.dumps({"question": "q?", "answers": ["a", 2]})])
    with pytest.raises(DataError, match=r"q\.jsonl:2: key 'answers\[1\]': expected a string, got int$"):
        load_qa(p)
    p = save_dataset(tmp_path / "q_ds", [{"question": "q?", "answers": ["a"], "gold_ids": [[1.0]]}])
    with pytest.raises(DataError, match=r"q_ds: row 0: key 'gold_ids\[0\]': expected a string or an integer, got list$"):
        load_qa(p)
    p = write(tmp_path / "g.jsonl", [json.dumps({"question": "q?", "answers": ["a"], "gold_ids": {"a": 1}})])
    with pytest.raises(DataError, match=r"g\.jsonl:1: key 'gold_ids': expected a list of passage or document ids, got dict$"):
        load_qa(p)


# ---------------------------------------------------------------- gold ids against the index


def test_gold_ids_unmatched_warn_with_count(caplog):
    examples = [QAExample("1", "q1", ["a"], ["a#0"]), QAExample("2", "q2", ["b"], ["b"]),
                QAExample("3", "q3", ["c"], ["zz#0", "yy"]), QAExample("4", "q4", ["d"], [])]
    with caplog.at_level(logging.WARNING, logger="ragdist"):
        assert check_gold_ids(examples, iter(["a#0", "a#1", "b#0", "b#1"]), "eval.jsonl") == 2
    (rec,) = [r for r in caplog.records if "gold ids" in r.getMessage()]
    msg = rec.getMessage()
    assert msg.startswith("eval.jsonl: 2 of 4 gold ids match no passage or document id") and "'yy', 'zz#0'" in msg
    assert "1 question(s) have no gold passage" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ragdist"):
        assert check_gold_ids(examples[:2], ["a#0", "b#3"], "eval.jsonl") == 0
        assert check_gold_ids([QAExample("5", "q", ["a"])], [], "eval.jsonl") == 0  # no labels: nothing to check
    assert not caplog.records


def test_gold_ids_matching_nothing_is_an_error():
    examples = [QAExample("1", "q1", ["a"], ["doc-1#0"]), QAExample("2", "q2", ["b"], ["doc-2"])]
    with pytest.raises(DataError, match=r"eval\.parquet: none of the 2 gold ids matches a passage or document id"):
        check_gold_ids(examples, ["airport-A#0", "airport-B#0"], "eval.parquet")


def test_gold_ids_checked_against_a_real_snapshot(tiny_snapshot):
    from ragdist.index.reader import iter_passage_ids
    from tests.conftest import DATA

    ids = list(iter_passage_ids(tiny_snapshot))
    assert len(ids) == len(set(ids)) > 0 and all("#" in i for i in ids)
    evals = load_qa(DATA / "eval.jsonl")
    assert check_gold_ids(evals, iter_passage_ids(tiny_snapshot), "eval.jsonl") == 0
    stale = [QAExample(e.id, e.question, e.answers, [g.replace("airport-", "apt-") for g in e.gold_ids]) for e in evals]
    with pytest.raises(DataError, match="none of the"):
        check_gold_ids(stale, iter_passage_ids(tiny_snapshot), "eval.jsonl")


def test_index_cli_reads_a_mapped_datasets_dir(tmp_path):
    from tests.conftest import DATA, run_cli

    rows = [{"doc_id": d.id, "body": d.text, "title": d.title} for d in load_documents(DATA / "corpus.jsonl")[:12]]
    ds = save_dataset(tmp_path / "ds", rows)
    args = ["ragdist-index", f"corpus.path={ds}", f"data.train={DATA / 'train.jsonl'}", f"data.eval={DATA / 'eval.jsonl'}",
            f"index.root={tmp_path / 'idx'}"]
    first = run_cli([*args, "corpus.fields.id=doc_id", "corpus.fields.text=body"], timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli([*args, "corpus.fields.id=doc_id", "corpus.fields.text=body"], timeout=300)
    assert second.returncode == 0 and "reusing snapshot" in second.stderr
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]
    unmapped = run_cli(args, timeout=300)
    assert unmapped.returncode == 2
    assert f"ragdist: error: {ds}: no column 'id' (set corpus.fields.id" in unmapped.stderr
