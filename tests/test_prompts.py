"""One prompt builder for training and evaluation: chat templates (the tokenizer's own, a file, a
string, or none) and plain prompts, with the loss on the answer tokens only."""

from __future__ import annotations

import json
import logging

import pytest

from ragdist.errors import ConfigError
from ragdist.prompts import IGNORE, chat_frame, encode_train, prompt_ids, stop_token_ids, uses_chat
from tests.tiny_hf import CHATML, MISTRAL, PHI3, build_tokenizer

PASSAGES = [
    {"title": "Oslo Airport", "text": "Oslo Gardermoen serves Oslo."},
    {"title": "Bergen Airport", "text": "Flesland serves Bergen."},
]
QUESTION = "Which city does Gardermoen serve?"


@pytest.fixture(scope="module")
def chatml():
    return build_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])


def _messages(answer=None):
    user = "".join(f"passage {n}: {p['title']}. {p['text']}\n" for n, p in enumerate(PASSAGES, 1))
    out = [{"role": "user", "content": user + f"question: {QUESTION}\nanswer:"}]
    return out + ([{"role": "assistant", "content": answer}] if answer else [])


def test_chat_prompt_is_the_templates_rendering_and_the_loss_covers_the_answer_only(chatml):
    tok = chatml
    assert uses_chat(tok)
    want = tok(tok.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert prompt_ids(tok, QUESTION, PASSAGES, 512) == want["input_ids"]
    row = encode_train(tok, QUESTION, PASSAGES, "Oslo", 512)
    full = tok.apply_chat_template(_messages("Oslo"), tokenize=False)  # ...<|im_start|>assistant\nOslo<|im_end|>\n
    assert tok.decode(row["input_ids"]) == full.removesuffix("\n")  # the turn ends at <|im_end|>
    learned = [t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE]
    assert tok.decode(learned) == "Oslo<|im_end|>"
    # what training puts before the answer is exactly what evaluation generates from
    n_prompt = row["labels"].index(learned[0])
    assert row["input_ids"][:n_prompt] == prompt_ids(tok, QUESTION, PASSAGES, 512)
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_chat_prompts_truncate_the_passages_to_the_budget(chatml):
    frame = chat_frame(chatml)
    full = prompt_ids(chatml, QUESTION, PASSAGES, 512)
    short = prompt_ids(chatml, QUESTION, PASSAGES, len(full) - 10)
    assert len(short) == len(full) - 10
    assert short[: len(frame.prefix)] == frame.prefix and short[-len(frame.prompt_end) :] == frame.prompt_end
    assert "question: Which city" in chatml.decode(short)
    row = encode_train(chatml, QUESTION, PASSAGES, "Oslo", 64)
    assert len(row["input_ids"]) <= 64 and chatml.decode(row["input_ids"]).endswith("Oslo<|im_end|>")
    with pytest.raises(ConfigError, match="chat template's own"):
        prompt_ids(chatml, QUESTION, PASSAGES, len(frame.prefix) + len(frame.prompt_end))


def test_templates_without_a_generation_prompt_or_with_a_trailer():
    # Mistral style: no generation prompt, the answer follows "[/INST]" after a space and ends with </s>
    tok = build_tokenizer(MISTRAL)
    row = encode_train(tok, QUESTION, PASSAGES, "Oslo", 512)
    learned = [t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE]
    assert tok.decode(learned) == " Oslo</s>" and stop_token_ids(tok) == [tok.eos_token_id]
    assert tok.decode(row["input_ids"]).startswith("<s>[INST] passage 1: Oslo Airport.")
    # Phi-3 style: "<|end|>\n</s>" closes a finished conversation; the turn is learned through <|end|>
    tok = build_tokenizer(PHI3, ["<|user|>", "<|assistant|>", "<|end|>"])
    row = encode_train(tok, QUESTION, PASSAGES, "Oslo", 512)
    learned = [t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE]
    assert tok.decode(learned) == "Oslo<|end|>"
    assert tok.decode(prompt_ids(tok, QUESTION, [], 512)).endswith("answer:<|end|>\n<|assistant|>\n")


def test_plain_prompts_without_a_template():
    tok = build_tokenizer(None)
    assert not uses_chat(tok)
    row = encode_train(tok, QUESTION, PASSAGES[:1], "Oslo", 512)
    text = tok.decode(row["input_ids"])
    assert text == "passage 1: Oslo Airport. Oslo Gardermoen serves Oslo.\nquestion: Which city does Gardermoen serve?\nanswer: Oslo</s>"
    learned = [t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE]
    assert tok.decode(learned) == " Oslo</s>"


def test_model_chat_template_from_file_string_or_none(tmp_path):
    from ragdist.train.model import ModelConfig, load_tokenizer

    saved = tmp_path / "tok"
    build_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"]).save_pretrained(saved)
    assert uses_chat(load_tokenizer(ModelConfig(name_or_path=str(saved))))  # the tokenizer's own
    assert not uses_chat(load_tokenizer(ModelConfig(name_or_path=str(saved), chat_template="none")))

    plain = tmp_path / "plain"
    build_tokenizer(None, ["<|im_start|>", "<|im_end|>"]).save_pretrained(plain)
    assert not uses_chat(load_tokenizer(ModelConfig(name_or_path=str(plain))))
    (tmp_path / "chatml.jinja").write_text(CHATML)
    for spec in (str(tmp_path / "chatml.jinja"), CHATML):
        tok = load_tokenizer(ModelConfig(name_or_path=str(plain), chat_template=spec))
        assert tok.chat_template == CHATML
        assert tok.decode(prompt_ids(tok, "Why?", [], 64)) == "<|im_start|>user\nquestion: Why?\nanswer:<|im_end|>\n<|im_start|>assistant\n"

    with pytest.raises(ConfigError, match="model.chat_template='/no/such.jinja'"):
        load_tokenizer(ModelConfig(name_or_path=str(plain), chat_template="/no/such.jinja"))
    # a template that drops the user's message cannot frame a training example
    with pytest.raises(ConfigError, match="verbatim"):
        load_tokenizer(ModelConfig(name_or_path=str(plain), chat_template="{% for m in messages %}{{ m['role'] }}{% endfor %}"))


def test_a_checkpoint_records_how_it_reads_and_evaluation_names_a_mismatch(tmp_path, caplog):
    from ragdist.prompts import READER_FILE, reader_mismatch, write_reader_format
    from ragdist.train.config import ExamplesConfig

    trained = ExamplesConfig(aggregation="sequential", sequential_rows="sample")
    write_reader_format(tmp_path, trained, top_k=3)
    assert json.loads((tmp_path / READER_FILE).read_text())["top_k"] == 3
    assert reader_mismatch(tmp_path, ExamplesConfig(aggregation="sequential")) == []
    asked = ExamplesConfig(aggregation="concat", question_template="Q: {question}\nA:")
    assert reader_mismatch(tmp_path, asked) == [
        "trainer.examples.aggregation='sequential'",
        f"trainer.examples.question_template={trained.question_template!r}",
    ]
    assert reader_mismatch(tmp_path / "no-record", asked) == []  # a model from elsewhere: nothing to compare
    # top-k is named only for a model that read its k passages in one prompt
    assert reader_mismatch(tmp_path, trained, top_k=5) == []
    concat = ExamplesConfig(aggregation="concat")
    write_reader_format(tmp_path, concat, top_k=3)
    assert reader_mismatch(tmp_path, concat, top_k=5) == ["retrieval.top_k=3"]
    assert reader_mismatch(tmp_path, concat, top_k=3) == []
    # a trainer that builds its rows its own way records that way (joint training: one passage a row)
    write_reader_format(tmp_path, concat, top_k=3, aggregation="sequential")
    assert reader_mismatch(tmp_path, concat) == ["trainer.examples.aggregation='sequential'"]
    # a run whose config does not say how its model reads (a joint run) is read the recorded way
    from ragdist.prompts import recorded_format

    assert recorded_format(tmp_path, concat).aggregation == "sequential"
    assert recorded_format(tmp_path, None).aggregation == "sequential"
    assert recorded_format(tmp_path / "no-record", concat) is concat
    # an unreadable record is named, and nothing is compared
    (tmp_path / READER_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ragdist.prompts"):
        assert reader_mismatch(tmp_path, asked) == []
    assert READER_FILE in caplog.text
