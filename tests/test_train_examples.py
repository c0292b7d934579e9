"""Examples built from retrieval: templates, aggregation modes, distractors, gold injection, shuffling,
and prefetching (live retrieval from the Ray service) that never changes what a batch holds."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from ragdist.data.qa import QAExample
from ragdist.errors import ConfigError
from ragdist.train.examples import (
    ExampleBuilder,
    ExamplesConfig,
    PassageStore,
    Summarizer,
    TokenMemo,
    encode_train,
    prompt_ids,
    select_passages,
)
from ragdist.train.model import IGNORE, ModelConfig, build_generator, load_tokenizer
from ragdist.train.prefetch import Lookahead, Prefetcher
from ragdist.train.trainer import positions


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def P(i: int) -> dict:
    return {"id": f"d{i}#0", "doc_id": f"d{i}", "title": f"T{i}", "text": f"text number {i}"}


STORE = PassageStore([P(i) for i in range(50)])
EXAMPLES = [QAExample(f"q{i}", f"question {i}?", [f"ans{i}"], [f"d{i}#0"]) for i in range(12)]


def top(k: int) -> list[dict]:
    return [P(20 + j) for j in range(k)]


def ranked(questions: list[str], k: int) -> list[list[dict]]:
    """A deterministic retriever for the selection logic: ranks 20.. for every question (never gold)."""
    return [top(k) for _ in questions]


def test_custom_templates_and_their_validation(tok):
    fmt = ExamplesConfig(passage_template="[{n}] {text}\n", question_template="Q: {question}\nA:")
    text = tok.decode(prompt_ids(tok, "who?", [P(1), P(2)], 128, fmt))
    assert text.index("[ 1 ] text number 1") < text.index("[ 2 ]") < text.index("q : who?")
    for bad, key in [
        (dict(passage_template="{n} {body}"), "passage_template"),
        (dict(question_template="no field"), "question_template"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(distractor_p=1.5), "distractor_p"),
    ]:
        with pytest.raises(ConfigError, match=key):  # refused as the config is built
            ExamplesConfig(**bad)


def test_selection_distractors_gold_and_order():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    base = ExamplesConfig(shuffle_passages=False)
    ret = top(6)
    assert select_passages(ret, top_k=3, gold_ids=[], fmt=base, rng=rng(), store=None, train=True) == ret[:3]
    # replace every slot with the lower ranks 3..5 (over-retrieved)
    rep = ExamplesConfig(shuffle_passages=False, distractor_p=1.0)
    assert select_passages(ret, top_k=3, gold_ids=[], fmt=rep, rng=rng(), store=None, train=True) == ret[3:6]
    add = ExamplesConfig(shuffle_passages=False, distractor_p=1.0, distractor_mode="add")
    assert select_passages(ret, top_k=3, gold_ids=[], fmt=add, rng=rng(), store=None, train=True) == ret
    rnd = ExamplesConfig(shuffle_passages=False, distractor_p=1.0, distractor_source="random")
    got = select_passages(ret, top_k=3, gold_ids=[], fmt=rnd, rng=rng(), store=STORE, train=True)
    assert len(got) == 3 and not {p["id"] for p in got} & {p["id"] for p in ret[:3]}
    # gold injected (into the lowest slot) when retrieval missed it; by doc id too; never at eval
    gold = ExamplesConfig(shuffle_passages=False, inject_gold_p=1.0)
    got = select_passages(ret, top_k=3, gold_ids=["d7"], fmt=gold, rng=rng(), store=STORE, train=True)
    assert got == ret[:2] + [P(7)]
    hit = select_passages([P(7)] + ret, top_k=3, gold_ids=["d7#0"], fmt=gold, rng=rng(), store=STORE, train=True)
    assert hit == [P(7)] + ret[:2]
    evalf = ExamplesConfig(shuffle_passages=True, inject_gold_p=1.0, distractor_p=1.0)
    assert select_passages(ret, top_k=3, gold_ids=["d7"], fmt=evalf, rng=rng(), store=STORE, train=False) == ret[:3]


def test_passage_order_is_shuffled_by_example_seed(tok):
    fmt = ExamplesConfig(shuffle_passages=True)
    b = ExampleBuilder(tok, fmt, top_k=4, max_len=128, retrieve=ranked, seed=3)
    first = b.build(EXAMPLES, range(12), epoch=0).passage_ids
    assert first == b.build(EXAMPLES, range(12), epoch=0).passage_ids
    assert any(ids != [p["id"] for p in top(4)] for ids in first)  # shuffled somewhere
    assert sorted(first[0]) == sorted(p["id"] for p in top(4))  # a permutation, nothing lost
    assert first != b.build(EXAMPLES, range(12), epoch=1).passage_ids  # a new order each epoch
    # the same example gets the same passages whichever batch it lands in
    alone = b.build(EXAMPLES, [5], epoch=0).passage_ids[0]
    assert alone == first[5]


def test_sequential_makes_one_example_per_passage(tok):
    fmt = ExamplesConfig(aggregation="sequential", shuffle_passages=False)
    b = ExampleBuilder(tok, fmt, top_k=3, max_len=128, retrieve=ranked)
    batch = b.build(EXAMPLES, [0, 1], epoch=0)
    ids = batch.tensors["input_ids"]
    assert ids.shape[0] == 6
    texts = [tok.decode(r) for r in ids]
    for j, t in enumerate(texts):
        assert t.count("passage") == 1 and f"text number {20 + j % 3}" in t
    answers = (batch.tensors["labels"] != IGNORE).sum(1)
    assert (answers > 0).all()


def test_sequential_sample_draws_one_passage_from_the_retrievers_posterior(tok):
    from ragdist.train.examples import passage_log_posterior

    scores = (0.60, 0.55, 0.40)
    ret = [dict(P(20 + j), score=s) for j, s in enumerate(scores)]
    z = np.array(scores) / 0.05
    want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.exp(passage_log_posterior(ret, 0.05)) == pytest.approx(want)
    assert passage_log_posterior([P(1), *ret], 0.05) is None  # a passage without a score: no posterior

    fmt = ExamplesConfig(aggregation="sequential", sequential_rows="sample")
    draws = [select_passages(ret, top_k=3, gold_ids=[], fmt=fmt, rng=np.random.default_rng(s), store=None, train=True)
             for s in range(3000)]  # fmt: skip
    assert all(len(d) == 1 for d in draws)
    freq = np.array([sum(d[0]["id"] == p["id"] for d in draws) for p in ret]) / len(draws)
    assert freq == pytest.approx(want, abs=0.03)
    assert select_passages(ret, top_k=3, gold_ids=[], fmt=fmt, rng=np.random.default_rng(0), store=None,
                           train=False) == ret  # evaluation reads every passage  # fmt: skip
    # no scores: uniform; one row per example, as with one passage, each with a passage and the answer
    plain = [select_passages(top(3), top_k=3, gold_ids=[], fmt=fmt, rng=np.random.default_rng(s), store=None,
                             train=True)[0]["id"] for s in range(600)]  # fmt: skip
    assert {i: plain.count(i) for i in set(plain)} == pytest.approx({p["id"]: 200 for p in top(3)}, abs=45)
    b = ExampleBuilder(tok, fmt, top_k=3, max_len=128, retrieve=ranked)
    batch = b.build(EXAMPLES, [0, 1], epoch=0)
    assert batch.tensors["input_ids"].shape[0] == 2 and [len(ps) for ps in batch.passage_ids] == [1, 1]
    assert all(tok.decode(r).count("passage") == 1 for r in batch.tensors["input_ids"])
    with pytest.raises(ConfigError, match="sequential_rows"):
        ExamplesConfig(sequential_rows="some")
    with pytest.raises(ConfigError, match="passage_temperature"):
        ExamplesConfig(passage_temperature=0)


def test_summarize_puts_the_generated_summary_before_the_question(tok):
    lm = build_generator(ModelConfig(hidden_size=32, num_heads=2, intermediate_size=64), tok)
    fmt = ExamplesConfig(aggregation="summarize", shuffle_passages=False, summary_max_new_tokens=5)
    summ = Summarizer(lm, tok, fmt)
    b = ExampleBuilder(tok, fmt, top_k=2, max_len=96, retrieve=ranked, summarizer=summ)
    batch = b.build(EXAMPLES, [0, 1, 2], epoch=0)
    summaries = summ([top(2)] * 3)
    assert len(summ.cache) == 1  # same passages: generated once
    for row, ex, s in zip(batch.tensors["input_ids"], EXAMPLES, summaries):
        ctx = [{"title": "summary", "text": s}] if s else []
        want = prompt_ids(tok, ex.question, ctx, 96 - 3)
        assert row[: len(want)].tolist() == want
    with pytest.raises(ConfigError, match="summarizer"):
        ExampleBuilder(tok, fmt, top_k=2, max_len=96, retrieve=ranked)


def test_store_needed_for_gold_and_random_distractors(tok):
    with pytest.raises(ConfigError, match="PassageStore"):
        ExampleBuilder(tok, ExamplesConfig(inject_gold_p=0.5), top_k=2, max_len=64, retrieve=ranked)
    ExampleBuilder(tok, ExamplesConfig(inject_gold_p=0.5), top_k=0, max_len=64, retrieve=None)  # closed book


def test_token_memo_gives_the_tokenizers_ids_and_stays_bounded(tok):
    memo = TokenMemo(tok, size=4)
    texts = [f"Passage {i}: the airport at elevation {17 * i} feet serves Ålesund." for i in range(6)]
    for t in texts + texts[-2:]:
        assert memo(t) == tok(t, add_special_tokens=False)["input_ids"]
    assert (memo.misses, memo.hits) == (6, 2) and len(memo._memo) == 4
    passages = [{"title": "t", "text": texts[0]}, {"title": "u", "text": texts[1]}]
    plain = encode_train(tok, "Which city?", passages, "Oslo", 64)
    assert encode_train(tok, "Which city?", passages, "Oslo", 64, ids=memo) == plain
    assert encode_train(tok, "Which city?", passages, "Oslo", 64, ids=memo) == plain  # from the memo now


def test_prefetcher_order_errors_and_close():
    with Prefetcher(lambda i: i * i, range(7), depth=2) as pf:
        assert [x for x, _ in pf] == [i * i for i in range(7)]

    def boom(i):
        if i == 3:
            raise ValueError("bad row 3")
        return i

    with pytest.raises(ValueError, match="bad row 3"):
        with Prefetcher(boom, range(7), depth=2) as pf:
            list(pf)
    pf = Prefetcher(lambda i: i, range(10**9), depth=2)  # stops a producer blocked on a full queue
    next(iter(pf))
    pf.close()
    assert pf._thread is None


@pytest.fixture(scope="module")
def live(ray_cluster, tiny_snapshot, embedder):
    from ragdist.retrieval.client import RetrievalConfig, start_service, stop_service

    cfg = RetrievalConfig(service_name="train-prefetch-test", address=ray_cluster)
    start_service(str(tiny_snapshot), cfg)
    yield cfg, embedder, tiny_snapshot
    stop_service(cfg)


def test_prefetch_never_changes_the_batches(live, tok):
    from ragdist.data.qa import load_qa
    from ragdist.retrieval.client import RetrievalClient
    from tests.conftest import DATA

    cfg, embedder, snapshot = live
    train = load_qa(DATA / "train.jsonl")
    store = PassageStore.from_snapshot(snapshot)
    assert store.get(train[0].gold_ids[0]) is not None
    fmt = ExamplesConfig(distractor_p=0.4, distractor_source="random", inject_gold_p=0.5, shuffle_passages=True)

    def batches(depth: int, rank: int, window: int = 1) -> list:
        # a fresh client each time: no cache shared between the runs
        client = RetrievalClient(cfg, embedder=embedder)
        stream = positions(len(train), rank, 2, 4, seed=7, epoch=0, index=0)
        retrieve = client.retrieve
        if window > 1:
            retrieve = Lookahead(client.retrieve, stream, lambda p: [train[i].question for i in p.ids], window)
            stream = retrieve.positions()
        b = ExampleBuilder(tok, fmt, top_k=3, max_len=128, retrieve=retrieve, store=store, seed=7)
        out = []
        with Prefetcher(lambda p: b.build(train, p.ids, p.epoch), stream, depth) as pf:
            for batch, _ in pf:
                out.append(batch)
                if len(out) == 18:  # more than one epoch of this rank's 15 micro-batches
                    break
        return out

    for rank in (0, 1):
        inline = batches(0, rank)
        for depth, window in ((3, 1), (3, 8), (0, 8)):
            ahead = batches(depth, rank, window)
            assert [b.passage_ids for b in inline] == [b.passage_ids for b in ahead]
            assert [b.example_ids for b in inline] == [b.example_ids for b in ahead]
            for x, y in zip(inline, ahead):
                for k in x.tensors:
                    assert torch.equal(x.tensors[k], y.tensors[k])
    assert any(len(ids) == 3 for b in inline for ids in b.passage_ids)


def test_lookahead_retrieves_upcoming_batches_in_one_call():
    seen = []

    def retrieve(questions, k):
        seen.append((list(questions), k))
        return [[{"id": f"{q}@{k}"}] for q in questions]

    pos = [["a", "b"], ["c", "a"], ["d", "e"], ["f", "g"], ["h", "i"]]
    la = Lookahead(retrieve, iter(range(len(pos))), lambda p: pos[p], window=3)
    walked = []
    for p in la.positions():
        walked.append(p)
        assert la(pos[p], 2) == [[{"id": f"{q}@2"}] for q in pos[p]]
    assert walked == list(range(len(pos)))  # every position, once, in order
    # positions 0-2 in one call (a repeated question fetched once), then 3-4
    assert seen == [(["a", "b", "c", "d", "e"], 2), (["f", "g", "h", "i"], 2)]
    la2 = Lookahead(retrieve, iter([0]), lambda p: pos[p], window=4)
    assert list(la2.positions()) == [0] and la2(["x"], 5) == [[{"id": "x@5"}]]  # a k not fetched yet: fetched
    with pytest.raises(ValueError, match="window"):
        Lookahead(retrieve, iter([]), lambda p: [], window=0)


def test_prefetch_hides_retrieval_behind_compute(live, tok):
    from ragdist.data.qa import load_qa
    from ragdist.retrieval.client import RetrievalClient
    from tests.conftest import DATA

    cfg, embedder, _ = live
    train = load_qa(DATA / "train.jsonl")
    # no cache: every batch really goes to the service
    client = RetrievalClient(dataclasses.replace(cfg, cache_size=0), embedder=embedder)
    b = ExampleBuilder(tok, ExamplesConfig(), top_k=3, max_len=128, retrieve=client.retrieve)
    stream = positions(len(train), 0, 1, 4, seed=0, epoch=0, index=0)
    inline_s = []
    for p in [next(stream) for _ in range(4)]:
        t0 = time.perf_counter()
        b.build(train, p.ids, p.epoch)
        inline_s.append(time.perf_counter() - t0)
    build_s = float(np.median(inline_s))
    compute_s = max(0.1, 4 * build_s)  # a "training step" comfortably longer than building a batch
    waits = []
    with Prefetcher(lambda p: b.build(train, p.ids, p.epoch), stream, depth=2) as pf:
        for n, (_, wait) in enumerate(pf):
            waits.append(wait)
            time.sleep(compute_s)
            if n == 6:
                break
    # after the first batch, the next one is always ready when the step ends
    assert float(np.median(waits[1:])) < 0.25 * build_s + 0.005, (waits, build_s)
