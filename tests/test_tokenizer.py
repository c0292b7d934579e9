"""The byte-level BPE for generators built from config: lossless, cached by its inputs, saved as HF."""

import json
import shutil

import pytest
import torch

from ragdist.errors import ConfigError, DataError
from ragdist.train.model import (
    ModelConfig,
    build_generator,
    load_generator,
    load_tokenizer,
    save_pretrained_atomic,
)
from ragdist.train.tokenizer import TokenizerData, bpe_tokenizer, round_trip_failures
from tests.conftest import DATA, run_cli


def _passages_and_answers() -> list[str]:
    texts = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts += json.loads(line).get("answers", [])
    return texts


@pytest.fixture(scope="module")
def data():
    return TokenizerData(corpus=str(DATA / "corpus.jsonl"), qa=[str(DATA / "train.jsonl")])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, data):
    return load_tokenizer(ModelConfig(tokenizer="bpe", bpe_cache_dir=str(tmp_path_factory.mktemp("tok"))), data)


def test_bpe_round_trips_every_passage_and_answer(bpe):
    texts = _passages_and_answers()
    assert len(texts) == 40 + 4 * 40
    assert round_trip_failures(bpe, texts) == []
    # what the lossless tokenizer fixes: the embedder's WordPiece drops case and spaces punctuation
    wordpiece = load_tokenizer(ModelConfig())
    assert len(round_trip_failures(wordpiece, texts)) > 100
    for s in ("1,495 m", "25.8 years", "Zürich-Kloten (ZRH)", "  two  spaces\tand a tab\n", "日本"):
        assert bpe.decode(bpe(s, add_special_tokens=False)["input_ids"]) == s


def test_bpe_special_tokens_and_training_example(bpe):
    from ragdist.train.examples import encode_train

    assert bpe.pad_token == "<pad>" and bpe.eos_token == "</s>" and bpe.bos_token == "<s>"
    assert len({bpe.pad_token_id, bpe.eos_token_id, bpe.bos_token_id}) == 3
    row = encode_train(bpe, "What is the ICAO code of Farah Airport?", [{"title": "Farah Airport", "text": "x"}],
                       "OAFR", 64)
    answer = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert answer[-1] == bpe.eos_token_id
    assert bpe.decode(answer, skip_special_tokens=True) == " OAFR"


def test_bpe_cache_is_keyed_by_inputs(tmp_path, data):
    cache = tmp_path / "cache"
    first = bpe_tokenizer(data, 600, cache)
    (entry,) = cache.iterdir()
    stamp = (entry / "tokenizer.json").stat().st_mtime_ns
    again = bpe_tokenizer(data, 600, cache)
    assert (entry / "tokenizer.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert again.get_vocab() == first.get_vocab() and len(first) <= 600
    bpe_tokenizer(data, 700, cache)  # another vocab size: another entry
    qa = tmp_path / "train.jsonl"
    shutil.copy(DATA / "train.jsonl", qa)
    with qa.open("a") as fh:
        fh.write(json.dumps({"question": "What is new?", "answers": ["Quixotic"]}) + "\n")
    bpe_tokenizer(TokenizerData(corpus=data.corpus, qa=[str(qa)]), 600, cache)  # other content: another entry
    assert len([p for p in cache.iterdir() if p.name.startswith("bpe-")]) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_bpe_errors_name_the_cause(tmp_path, data):
    with pytest.raises(ConfigError, match="model.tokenizer=bpe"):
        load_tokenizer(ModelConfig(tokenizer="bpe", bpe_cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.bpe_vocab_size=100"):
        bpe_tokenizer(data, 100, tmp_path)
    with pytest.raises(DataError, match="nope.jsonl"):
        bpe_tokenizer(TokenizerData(corpus=str(tmp_path / "nope.jsonl")), 600, tmp_path)


def test_checkpoint_with_bpe_loads_with_auto_tokenizer(tmp_path, bpe):
    from transformers import AutoTokenizer

    cfg = ModelConfig(tokenizer="bpe")
    lm = build_generator(cfg, bpe)
    assert lm.config.vocab_size == len(bpe) and lm.config.pad_token_id == bpe.pad_token_id
    out = save_pretrained_atomic(lm, bpe, tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == bpe.get_vocab() and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert round_trip_failures(tok, _passages_and_answers()) == []
    lm2, tok2 = load_generator(out)
    ids = tok2("Its IATA code is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert lm2(input_ids=ids).logits.shape[-1] == len(tok2)


@pytest.mark.slow
def test_train_with_bpe_end_to_end(ray_cluster, tiny_index, tmp_path):
    from transformers import AutoTokenizer

    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            "ragdist-train",
            "+experiment=tiny",
            "model.tokenizer=bpe",
            f"model.bpe_cache_dir={tmp_path / 'tok'}",
            f"index.root={tiny_index}",
            "retrieval.service_name=bpe-test",
            "trainer.max_steps=5",
            f"hydra.run.dir={run_dir}",
        ],
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (cached,) = (tmp_path / "tok").iterdir()
    for variant in ("rag", "closed_book"):
        tok = AutoTokenizer.from_pretrained(run_dir / "checkpoints" / variant)
        assert tok.get_vocab() == AutoTokenizer.from_pretrained(cached).get_vocab()
        assert round_trip_failures(tok, _passages_and_answers()) == []
    first = json.loads((run_dir / "report.json").read_text())["results"]
    # evaluating the finished run again rebuilds the base row's tokenizer from the cache: same figures
    proc = run_cli(["ragdist-eval", f"eval.run_dir={run_dir}", "retrieval.service_name=bpe-eval-test"],
                   env={"RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((run_dir / "report.json").read_text())["results"]
    assert {k: again[k]["f1"] for k in again} == {k: first[k]["f1"] for k in first}
