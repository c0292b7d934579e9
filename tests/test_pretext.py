"""The reader's pretext stage: reading tasks from the corpus, their batches, and the stage end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragdist.data.corpus import load_documents
from ragdist.errors import ConfigError, DataError
from ragdist.train.examples import ExampleBuilder, ExamplesConfig, PassageStore, select_passages
from ragdist.train.pretext import (
    BLANK,
    MixedSource,
    PretextConfig,
    PretextSource,
    ReadingTasks,
    make_query,
    salient_spans,
    target_of,
)
from ragdist.train.trainer import Position
from tests.conftest import DATA, run_cli

AIRPORT = (
    "Kokoda Airport is an airport serving Kokoda, Northern Province, PG. Its IATA code is KKD and its ICAO code "
    "is AYKO. The airport lies at an elevation of 1240 feet in the Pacific/Port_Moresby time zone."
)


def _store() -> PassageStore:
    docs = load_documents(DATA / "corpus.jsonl")
    return PassageStore([{"id": f"{d.id}#0", "doc_id": d.id, "title": d.title, "text": d.text} for d in docs])


def test_salient_spans_are_names_codes_and_numbers():
    got = [AIRPORT[s.start : s.end] for s in salient_spans(AIRPORT)]
    # sentence-initial words are not names by their capital alone; "Kokoda," ends its run at the comma
    assert got == ["Airport", "Kokoda", "Northern Province", "PG", "IATA", "KKD", "ICAO", "AYKO", "1240",
                   "Pacific/Port_Moresby"]  # fmt: skip
    text = "Iron (symbol Fe) has the configuration [Ar] 3d6 4s2. Its CAS number is 7439-89-6."
    assert [text[s.start : s.end] for s in salient_spans(text)] == ["Fe", "[Ar] 3d6 4s2", "CAS", "7439-89-6"]
    assert [text[s.start : s.end] for s in salient_spans(text, max_words=2)] == ["Fe", "CAS", "7439-89-6"]


def test_query_is_title_and_sentence_around_a_blank():
    cfg = PretextConfig(context_words=4)
    p = {"title": "Kokoda Airport", "text": AIRPORT}
    spans = {AIRPORT[s.start : s.end]: s for s in salient_spans(AIRPORT)}
    assert make_query(p, spans["KKD"], cfg) == f"Kokoda Airport: Its IATA code is {BLANK}"
    assert make_query(p, spans["AYKO"], cfg) == f"Kokoda Airport: its ICAO code is {BLANK}"
    # too little before the blank: the words after it say where it is
    text = "Seaborgium (symbol Sg) is the chemical element with atomic number 106."
    s = salient_spans(text)[0]
    assert make_query({"title": "", "text": text}, s, cfg) == f"Seaborgium (symbol {BLANK} ) is the chemical"


def test_prefix_task_continues_the_passage_from_the_span():
    cfg = PretextConfig(context_words=4, prefix_words=5, tasks=["prefix"])
    p = {"title": "Kokoda Airport", "text": AIRPORT}
    spans = {AIRPORT[s.start : s.end]: s for s in salient_spans(AIRPORT)}
    assert make_query(p, spans["KKD"], cfg, "prefix") == "Kokoda Airport: Its IATA code is"
    assert target_of(p, spans["KKD"], cfg, "prefix") == "KKD and its ICAO code"
    # across the sentence boundary, and never past the passage's end
    assert make_query(p, spans["1240"], cfg, "prefix") == "Kokoda Airport: at an elevation of"
    assert target_of(p, spans["Pacific/Port_Moresby"], cfg, "prefix") == "Pacific/Port_Moresby time zone."
    tasks = ReadingTasks(_store(), PretextConfig(tasks=["cloze", "prefix"]), seed=0)
    kinds = [tasks.task(i, 0).id.split("-")[1] for i in range(len(tasks))]
    assert set(kinds) == {"cloze", "prefix"}
    for i in range(len(tasks)):
        t = tasks.task(i, 0)
        assert (BLANK in t.question) == t.id.startswith("pretext-cloze")


def test_reading_tasks_are_rare_spans_copied_from_their_passage():
    store = _store()
    tasks = ReadingTasks(store, PretextConfig(), seed=0)
    seen = set()
    for i in range(len(store.passages)):
        t = tasks.task(i, epoch=0)
        gold = store.get(t.gold_ids[0])
        assert gold is not None and t.answers[0] in gold["text"]
        assert t.answers[0] not in t.question and BLANK in t.question and t.question.startswith(gold["title"])
        # template words and values shared by many passages are never the target
        assert t.answers[0] not in ("IATA", "ICAO", "Airport", "US")
        assert tasks.task(i, epoch=0) == t  # the same task whoever asks
        seen.add(t.answers[0])
    assert len(seen) >= 0.9 * len(store.passages)
    # a new epoch draws new spans for most passages
    assert sum(tasks.task(i, 1) != tasks.task(i, 0) for i in range(len(store.passages))) > len(store.passages) // 3


def test_no_usable_span_is_a_clear_error():
    store = PassageStore([{"id": f"d{i}#0", "doc_id": f"d{i}", "title": "", "text": "all lower case words here."}
                          for i in range(5)])  # fmt: skip
    with pytest.raises(DataError, match="trainer.pretext.steps=0"):
        ReadingTasks(store, PretextConfig())


@pytest.mark.parametrize("key,value", [("steps", -1), ("span_words", 0), ("drop_gold_p", 1.5), ("mix", -0.1)])
def test_bad_pretext_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"trainer.pretext.{key}"):
        PretextConfig(**{key: value})


def _retrieve_from(store: PassageStore):
    """Passages ranked by shared words with the query: a deterministic stand-in with the gold on top."""

    def retrieve(queries: list[str], k: int) -> list[list[dict]]:
        out = []
        for q in queries:
            words = set(q.lower().split())
            ranked = sorted(store.passages, key=lambda p: (-len(words & set(p["text"].lower().split())), p["id"]))
            out.append(ranked[:k])
        return out

    return retrieve


def test_pretext_batches_put_the_span_after_the_passages_and_drop_gold_on_request():
    import transformers

    from ragdist.train.model import ModelConfig, load_tokenizer

    transformers.logging.set_verbosity_error()
    tok = load_tokenizer(ModelConfig())
    store = _store()
    builder = ExampleBuilder(tok, ExamplesConfig(), top_k=3, max_len=256, retrieve=_retrieve_from(store), store=store)
    src = PretextSource(store, builder, PretextConfig(), seed=0)
    pos = Position(0, 0, (0, 1, 2, 3))
    batch = src.build(pos, src.fetch(pos))
    assert batch.tensors["input_ids"].shape[0] == 4
    tasks = src.examples_at(pos)
    for row, labels, i, pids in zip(batch.tensors["input_ids"], batch.tensors["labels"], pos.ids, batch.passage_ids):
        target = tok.decode(row[labels != -100], skip_special_tokens=True)
        assert target.replace(" ", "") == tasks[i].answers[0].lower().replace(" ", "")
        assert tasks[i].gold_ids[0] in pids
    # RAFT's share without the answer: with drop_gold_p=1 no example shows its gold passage
    fmt = ExamplesConfig(drop_gold_p=1.0)
    builder = ExampleBuilder(tok, fmt, top_k=3, max_len=256, retrieve=_retrieve_from(store), store=store)
    assert builder.fetch_k() == 6
    src = PretextSource(store, builder, PretextConfig(), seed=0)
    batch = src.build(pos, src.fetch(pos))
    for i, pids in zip(pos.ids, batch.passage_ids):
        assert len(pids) == 3 and tasks[i].gold_ids[0] not in pids


def test_made_up_spans_are_read_from_the_passages_shown():
    """trainer.pretext.made_up_p: the stage's span swaps (the builder's swap_answer_p, every one made up)
    put a span of the original's form that no passage holds into the passages shown and the target."""
    import transformers

    from ragdist.train.examples import answer_shape
    from ragdist.train.model import ModelConfig, load_tokenizer

    transformers.logging.set_verbosity_error()
    tok = load_tokenizer(ModelConfig())
    store = _store()
    fmt = ExamplesConfig(swap_answer_p=1.0, swap_made_up_p=1.0, swap_made_up="all")
    builder = ExampleBuilder(tok, fmt, top_k=3, max_len=256, retrieve=_retrieve_from(store), store=store)
    src = PretextSource(store, builder, PretextConfig(made_up_p=1.0), seed=0)
    pos = Position(0, 0, tuple(range(16)))
    batch = src.build(pos, src.fetch(pos))
    tasks = src.examples_at(pos)
    t = batch.tensors
    corpus = " ".join(p["text"].lower() for p in store.passages)
    made = 0
    for row, labels, mask, i in zip(t["input_ids"], t["labels"], t["attention_mask"], pos.ids):
        target = tok.decode(row[labels != -100], skip_special_tokens=True).strip()
        prompt = tok.decode(row[(labels == -100) & (mask == 1)], skip_special_tokens=True)
        span = tasks[i].answers[0]
        # (the test tokenizer is the uncased WordPiece: compared lower-cased, without spaces)
        assert answer_shape(target.replace(" ", "")) == answer_shape(span.lower().replace(" ", "")), (span, target)
        assert target.replace(" ", "") in prompt.replace(" ", ""), (target, prompt)
        if target.replace(" ", "") != span.lower().replace(" ", ""):
            made += 1
            if len(target.replace(" ", "")) >= 5:  # (a short one may be a piece of a real word)
                assert target.replace(" ", "") not in corpus.replace(" ", ""), target
    assert made >= 12, made
    with pytest.raises(ConfigError, match="made_up_p"):
        PretextConfig(made_up_p=2.0)


def test_drop_gold_leaves_defaults_untouched():
    ranked = [{"id": f"p{i}#0", "doc_id": f"p{i}", "text": str(i)} for i in range(6)]
    for seed in range(20):
        kw = dict(top_k=3, gold_ids=["p1#0"], store=None, train=True)
        plain = select_passages(ranked, fmt=ExamplesConfig(), rng=np.random.default_rng(seed), **kw)
        zero = select_passages(ranked, fmt=ExamplesConfig(drop_gold_p=0.0), rng=np.random.default_rng(seed), **kw)
        assert plain == zero
        half = select_passages(ranked, fmt=ExamplesConfig(drop_gold_p=0.5), rng=np.random.default_rng(seed), **kw)
        assert len(half) == 3
    dropped = [
        select_passages(ranked, top_k=3, gold_ids=["p1"], fmt=ExamplesConfig(drop_gold_p=0.5),
                        rng=np.random.default_rng(s), store=None, train=True)
        for s in range(200)
    ]  # fmt: skip
    share = np.mean([all(p["doc_id"] != "p1" for p in d) for d in dropped])
    assert 0.4 < share < 0.6


def test_mixed_source_replaces_a_share_of_questions_with_reading_tasks():
    from ragdist.data.qa import load_qa

    store = _store()
    train = load_qa(DATA / "train.jsonl")
    tasks = ReadingTasks(store, PretextConfig(), seed=0)
    src = MixedSource(train, builder=None, tasks=tasks, share=0.3, seed=0)  # type: ignore[arg-type]
    ids = tuple(range(len(train)))
    got = src.examples_at(Position(0, 0, ids))
    share = np.mean([got[i].id.startswith("pretext-") for i in ids])
    assert 0.15 < share < 0.45
    assert got == src.examples_at(Position(0, 0, ids))
    assert all(got[i] is train[i] for i in ids if not got[i].id.startswith("pretext-"))


@pytest.mark.slow
def test_pretext_then_rag_end_to_end(ray_cluster, tiny_index, tmp_path):
    """The reading recipe of a generator built from config (`recipe=auto`: corpus BPE, pretext stage with
    made-up spans, one passage per example, counterfactual answers), shortened: pretext through the
    engine with live retrieval (its loss falls), RAG fine-tuning from its weights, and on the test
    sample's held-out questions the RAG-fine-tuned model beats the closed-book one."""
    run = tmp_path / "run"
    p = run_cli(["ragdist-train", "+experiment=tiny", "recipe=auto", f"index.root={tiny_index}",
                 "trainer.pretext.steps=150", "trainer.max_steps=600", "trainer.micro_batch_size=16",
                 "trainer.warmup_steps=20", "trainer.log_every=100", "retrieval.service_name=pretext-e2e",
                 "eval.latency_samples=2", "eval.topk_sweep=[]", "eval.plots=false", f"hydra.run.dir={run}"],
                env={"RAY_ADDRESS": ray_cluster})  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    pre = json.loads((run / "train_pretext.json").read_text())
    assert pre["world_size"] == 2 and pre["steps"] == 150
    losses = [h["loss"] for h in pre["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert pre["retrieval_wait_s_per_step"] >= 0 and (run / "checkpoints" / "pretext" / "config.json").is_file()
    # each retrieval-trained checkpoint records how it reads its passages (ragdist-eval eval.checkpoint= checks it)
    reader = json.loads((run / "checkpoints" / "rag" / "ragdist_reader.json").read_text())
    assert reader["aggregation"] == "sequential" and reader["top_k"] == 3
    assert not (run / "checkpoints" / "closed_book" / "ragdist_reader.json").exists()
    report = json.loads((run / "report.json").read_text())
    res = report["results"]
    assert {"pretext", "rag", "closed_book"} <= set(res)
    print("EM", {k: v["em"] for k, v in res.items()})
    # 40 questions about 10 airports the QA steps never asked about: only reading answers them (on one
    # host 27.5, 20.0 and 5.0 EM at seeds 0, 1, 2, closed book 0 each)
    assert res["rag"]["em"] >= 0.05 and res["rag"]["em"] > res["closed_book"]["em"], res
    # rag starts from the pretext stage's weights (closed book from the random initialization)
    first = {v: json.loads((run / f"train_{v}.json").read_text())["history"][0]["loss"] for v in ("rag", "closed_book")}
    assert first["rag"] < first["closed_book"] - 1.0, first
    md = (run / "report.md").read_text()
    assert "## Reader pretext training" in md and "reader pretext only" in md


def test_answer_shape_groups_answers_of_one_form():
    from ragdist.train.examples import answer_shape

    assert answer_shape("KKD") == answer_shape("LAX") == "A"
    assert answer_shape("87") == answer_shape("1240") == "9"
    assert answer_shape("Port Moresby") == "Aa Aa" != answer_shape("Kokoda")
    assert answer_shape("7440-47-3") == "9-9-9"
    assert answer_shape("[Rn] 5f14 6d4 7s2") == "[Aa] 9a9 9a9 9a9"


def test_answer_swap_replaces_the_answer_in_question_passages_and_target():
    from ragdist.data.qa import QAExample, load_qa
    from ragdist.train.examples import AnswerSwap, answer_shape

    train = load_qa(DATA / "train.jsonl")
    swap = AnswerSwap(train, p=1.0)
    ex = QAExample(id="x", question="Which city does Kokoda Airport serve?", answers=["Kokoda"], gold_ids=["k"])
    shown = [{"id": "k#0", "title": "Kokoda Airport", "text": AIRPORT}, {"id": "o#0", "title": "Other", "text": "Kokodas."}]
    question, answer, passages = swap(ex, shown, np.random.default_rng(0))
    assert answer != "Kokoda" and answer_shape(answer) == answer_shape("Kokoda")
    assert answer in swap.pools[answer_shape("Kokoda")]
    assert question == f"Which city does {answer} Airport serve?"
    assert passages[0]["title"] == f"{answer} Airport" and AIRPORT.replace("Kokoda", answer) == passages[0]["text"]
    assert passages[1]["text"] == "Kokodas."  # whole words only
    assert shown[0]["text"] == AIRPORT  # the retrieved passages themselves are untouched
    # an answer no shown passage holds is left alone, and so is everything at p=0
    missing = QAExample(id="y", question="q?", answers=["ZZZ"], gold_ids=[])
    assert swap(missing, shown, np.random.default_rng(0)) == ("q?", "ZZZ", shown)
    assert AnswerSwap(train, p=0.0)(ex, shown, np.random.default_rng(0)) == (ex.question, "Kokoda", shown)


def test_made_up_answers_keep_the_form_and_are_read_from_the_passages():
    from ragdist.data.qa import QAExample, load_qa
    from ragdist.train.examples import AnswerSwap, answer_shape, made_up_answer, word_pieces
    from ragdist.train.model import ModelConfig, load_tokenizer

    pieces = word_pieces(load_tokenizer(ModelConfig()))
    assert pieces and all(p.isalpha() and p.islower() and len(p) >= 2 for p in pieces)
    rng = np.random.default_rng(0)
    for answer in ("KKD", "1240", "1,495 m", "7440-47-3", "Port Moresby", "Lai", "[Rn] 5f14 6d4 7s2"):
        made = [made_up_answer(answer, pieces, rng) for _ in range(20)]
        assert all(answer_shape(m) == answer_shape(answer) for m in made), (answer, made)
        assert len(set(made)) > 10 and answer not in made
    assert all(len(made_up_answer("1240", pieces, rng)) == 4 and made_up_answer("0", pieces, rng).isdigit()
               for _ in range(50))
    # made_up_p=1, made_up="all": every swap wholly made up, in question, passages and target alike
    train = load_qa(DATA / "train.jsonl")
    swap = AnswerSwap(train, p=1.0, made_up_p=1.0, pieces=pieces, made_up="all")
    ex = QAExample(id="x", question="Which city does Kokoda Airport serve?", answers=["Kokoda"], gold_ids=["k"])
    shown = [{"id": "k#0", "title": "Kokoda Airport", "text": AIRPORT}]
    question, answer, passages = swap(ex, shown, np.random.default_rng(1))
    assert answer_shape(answer) == "Aa" and answer not in swap.pools["Aa"]
    assert question == f"Which city does {answer} Airport serve?" and answer in passages[0]["text"]
    assert "Kokoda" not in passages[0]["text"]
    # made_up="words": another training answer with only its words made up; a number stays a real one
    words = AnswerSwap(train, p=1.0, made_up_p=1.0, pieces=pieces)  # made_up="words" by default
    _, answer, _ = words(ex, shown, np.random.default_rng(1))
    assert answer_shape(answer) == "Aa" and answer not in words.pools["Aa"]
    assert made_up_answer("USSR/United States", pieces, rng, words_only=True).startswith("USSR/")
    assert made_up_answer("1,240", pieces, rng, words_only=True) == "1,240"
    number = QAExample(id="n", question="How high is Kokoda Airport?", answers=["1240"], gold_ids=["k"])
    shown_n = [{"id": "k#0", "title": "Kokoda Airport", "text": "Kokoda Airport lies at 1240 feet."}]
    _, answer, passages = words(number, shown_n, np.random.default_rng(0))
    assert answer in words.pools["9"] and answer in passages[0]["text"]
    with pytest.raises(ConfigError, match="swap_made_up_p"):
        ExamplesConfig(swap_made_up_p=1.5)
    with pytest.raises(ConfigError, match="swap_made_up='some'"):
        ExamplesConfig(swap_made_up="some")


def test_builder_trains_on_swapped_answers_read_from_the_passages():
    from ragdist.data.qa import load_qa
    from ragdist.train.model import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig())

    store, train = _store(), load_qa(DATA / "train.jsonl")
    ids = tuple(range(len(train)))

    def targets(p: float, made_up_p: float = 0.0) -> tuple[list[str], list[str]]:
        fmt = ExamplesConfig(swap_answer_p=p, swap_made_up_p=made_up_p)
        builder = ExampleBuilder(tok, fmt, top_k=3, max_len=256, retrieve=_retrieve_from(store), store=store, seed=0)
        batch = builder.build(train, ids, epoch=0)
        t = batch.tensors
        answers = [tok.decode(r[lab != -100], skip_special_tokens=True).strip() for r, lab in zip(t["input_ids"], t["labels"])]
        prompts = [tok.decode(r[(lab == -100) & (m == 1)], skip_special_tokens=True) for r, lab, m in
                   zip(t["input_ids"], t["labels"], t["attention_mask"])]  # fmt: skip
        return answers, prompts

    plain, _ = targets(0.0)
    swapped, prompts = targets(1.0)
    assert swapped == targets(1.0)[0]  # deterministic in (seed, epoch, example)
    changed = [i for i, (a, b) in enumerate(zip(plain, swapped)) if a != b]
    assert len(changed) > len(train) // 2
    for i in changed:  # the new target is read from the prompt, the old one is gone from it
        assert swapped[i] in prompts[i]
    # made-up words: the city answers become names no training answer has, still read from the prompt
    made, made_prompts = targets(1.0, 1.0)
    cities = {ex.answers[0].lower() for ex in train if ex.id.endswith("-q2")}
    new_cities = [i for i, ex in enumerate(train) if ex.id.endswith("-q2") and made[i] != plain[i]]
    assert len(new_cities) >= len(cities) // 2 and not {made[i] for i in new_cities} & cities
    assert all(made[i] in made_prompts[i] for i in new_cities)
