"""Evaluation parts: perturbations, retrieval report, row planning, report, plots, NLI scorer, and one
strategy evaluated in-process against the real retrieval service with a tiny generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ragdist.errors import ConfigError
from ragdist.eval.compare import BASE, plan, retrieval_report
from ragdist.eval.robustness import (
    insert_at_random,
    is_distractor,
    pick_distractors,
    question_rng,
    reorder,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def P(pid: str, text: str, title: str = "") -> dict:
    return {"id": pid, "doc_id": pid.split("#")[0], "title": title, "text": text}


RANKED = [
    P("a#0", "Alpha airport has IATA code AAA."),  # gold
    P("b#0", "Bravo airport has IATA code BBB."),
    P("a#1", "Alpha airport lies at 100 feet."),  # gold document, other passage
    P("c#0", "Charlie field, code AAA (former)."),  # contains the answer: not a distractor
    P("d#0", "Delta airport has IATA code DDD."),
    P("e#0", "Echo airport has IATA code EEE."),
]


# --------------------------------------------------------------------------- robustness


def test_is_distractor() -> None:
    assert not is_distractor(RANKED[0], ["a#0"], ["AAA"])  # gold passage
    assert not is_distractor(RANKED[2], ["a"], ["zzz"])  # gold by document id
    assert not is_distractor(RANKED[3], ["a#0"], ["aaa"])  # holds the answer (normalized)
    assert is_distractor(RANKED[1], ["a#0"], ["AAA"])
    assert is_distractor(RANKED[1], [], ["AAA"])  # no gold ids: the answer test alone


def test_hard_distractors_skip_top_k_gold_and_answers() -> None:
    rng = question_rng(0, 0, 1)
    out = pick_distractors(RANKED, 2, 2, gold_ids=["a"], answers=["AAA"], source="hard", rng=rng)
    # below the top 2: a#1 (gold doc), c#0 (answer) are skipped -> d#0, e#0
    assert [p["id"] for p in out] == ["d#0", "e#0"]
    out = pick_distractors(RANKED, 2, 5, gold_ids=["a"], answers=["AAA"], source="hard", rng=rng)
    assert [p["id"] for p in out] == ["d#0", "e#0"]  # fewer exist: no padding, no repeats
    assert pick_distractors(RANKED, 2, 0, gold_ids=[], answers=["x"], source="hard", rng=rng) == []


def test_random_distractors_are_seeded_and_valid() -> None:
    pool = RANKED + [P(f"z{i}#0", f"Zulu {i} airport, code Z{i:02d}.") for i in range(30)]

    def pick(seed: int) -> list[str]:
        out = pick_distractors(
            RANKED,
            2,
            4,
            gold_ids=["a"],
            answers=["AAA"],
            source="random",
            pool=pool,
            rng=question_rng(seed, 3, 1),
        )
        return [p["id"] for p in out]

    first = pick(0)
    assert first == pick(0) and len(first) == 4 and len(set(first)) == 4
    assert not {"a#0", "a#1", "b#0", "c#0"} & set(first)  # no gold, no answer, nothing already shown
    assert any(pick(s) != first for s in range(1, 5))  # a different seed draws differently
    with pytest.raises(ConfigError, match="pool is empty"):
        pick_distractors(
            RANKED, 2, 1, gold_ids=[], answers=["x"], source="random", pool=[], rng=question_rng(0, 0, 0)
        )
    with pytest.raises(ConfigError, match="distractor_source"):
        pick_distractors(
            RANKED, 2, 1, gold_ids=[], answers=["x"], source="nearest", rng=question_rng(0, 0, 0)
        )


def test_insert_and_reorder() -> None:
    base, extra = RANKED[:3], RANKED[4:6]
    out = insert_at_random(base, extra, np.random.default_rng(1))
    assert len(out) == 5 and [p for p in out if p in base] == base  # retrieved order kept
    assert {p["id"] for p in out} == {p["id"] for p in base + extra}
    assert [p["id"] for p in reorder(base, "reversed")] == ["a#1", "b#0", "a#0"]
    shuffled = reorder(RANKED, "shuffled", np.random.default_rng(3))
    assert sorted(p["id"] for p in shuffled) == sorted(p["id"] for p in RANKED)
    assert shuffled == reorder(RANKED, "shuffled", np.random.default_rng(3))
    with pytest.raises(ValueError):
        reorder(base, "sideways")


# --------------------------------------------------------------------------- retrieval report


def test_retrieval_report_hand_checked() -> None:
    from ragdist.data.qa import QAExample

    exs = [
        QAExample("q1", "code of alpha?", ["AAA"], ["a"]),  # gold at rank 1
        QAExample("q2", "code of delta?", ["DDD"], ["d#0"]),  # gold at rank 5
        QAExample("q3", "code of echo?", ["EEE"], []),  # no gold ids: only answer recall
    ]
    rep = retrieval_report(exs, [RANKED, RANKED, RANKED], [1, 5])
    m = rep["metrics"]
    assert rep["questions_with_gold"] == 2 and rep["depth"] == 6
    assert m["recall@1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["precision@5"] == pytest.approx((1 / 5 + 1 / 5) / 2)  # a#1 is a repeat of document a
    assert m["mrr"] == pytest.approx((1 + 1 / 5) / 2)
    # answer in top-k over all 3: AAA at rank 1; DDD at rank 5; EEE at rank 6
    assert m["answer_recall@1"] == pytest.approx(1 / 3)
    assert m["answer_recall@5"] == pytest.approx(2 / 3)
    assert rep["recall_curve"] == pytest.approx([0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert rep["answer_recall_curve"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1.0])


# --------------------------------------------------------------------------- planning


def test_plan_rows() -> None:
    ck = {"rag": "/r", "closed_book": "/c"}
    rows = plan(
        ck,
        wanted=["closed_book", "base_rag", "closed_book_rag", "rag", "joint"],
        base=True,
        joint_checkpoint="/j",
    )
    assert [(s.name, s.model, s.retriever) for s in rows] == [
        ("closed_book", "/c", None),
        ("base_rag", BASE, "main"),
        ("closed_book_rag", "/c", "main"),
        ("rag", "/r", "main"),
        ("joint", "/j", "joint"),
    ]
    # one model for both (eval.checkpoint): no duplicate row; no base without a known base model
    same = plan(
        {"rag": "/m", "closed_book": "/m"},
        wanted=["closed_book", "base_rag", "closed_book_rag", "rag"],
        base=False,
        joint_checkpoint=None,
    )
    assert [s.name for s in same] == ["closed_book", "rag"]
    assert [s.name for s in plan(ck, wanted=["rag"], base=True, joint_checkpoint=None)] == ["rag"]
    with pytest.raises(ConfigError, match="rag_only"):
        plan(ck, wanted=["rag_only"], base=True, joint_checkpoint=None)


# --------------------------------------------------------------------------- report and plots


def _report() -> dict:
    """A report as run_comparison/write_report produce it, with made-up numbers."""
    lat = {"p50": 0.02, "p95": 0.03, "p99": 0.04, "mean": 0.021}
    common = {
        "n": 4,
        "f1": 0.5,
        "answered": 1.0,
        "prompt_tokens": 150.0,
        "prompt_tokens_p95": 170.0,
        "generated_tokens": 3.0,
        "generated_tokens_p95": 4.0,
        "question_tokens": 15.0,
        "generation_latency_s": lat,
        "e2e_latency_s": lat,
        "batched_generation_s_per_q": 0.004,
    }
    rag = dict(
        common,
        em=0.75,
        faithfulness=0.5,
        hallucination=0.25,
        top_k=3,
        **{"recall@3": 0.9},
        retrieval_added_tokens=135.0,
        tokens_per_q=153.0,
        retrieval_latency_s=lat,
        em_at_k={"0": 0.0, "1": 0.5, "3": 0.75},
        em_distractors={"1": 0.5, "3": 0.25},
        em_reversed=0.5,
        em_shuffled=0.75,
    )
    closed = dict(
        common,
        em=0.25,
        faithfulness=float("nan"),
        hallucination=0.75,
        top_k=0,
        retrieval_added_tokens=0.0,
        tokens_per_q=18.0,
        prompt_tokens=15.0,
        retrieval_latency_s={},
    )
    return {
        "results": {"closed_book": closed, "rag": rag},
        "strategies": {
            "closed_book": {"label": "fine-tune only (closed book)"},
            "rag": {"label": "RAG fine-tuned (with retrieval)"},
        },
        "retrieval": {
            "main": {
                "metrics": {
                    "recall@1": 0.5,
                    "precision@1": 0.5,
                    "ndcg@1": 0.5,
                    "answer_recall@1": 0.5,
                    "mrr": 0.7,
                },
                "depth": 4,
                "questions_with_gold": 4,
                "recall_curve": [0.5, 0.75, 0.9, 1.0],
                "answer_recall_curve": [0.5, 0.5, 1.0, 1.0],
            }
        },
        "latency_samples": {
            "closed_book": {"retrieval": [], "generation": [0.01, 0.02], "e2e": [0.01, 0.02]},
            "rag": {"retrieval": [0.01, 0.012], "generation": [0.02, 0.03], "e2e": [0.03, 0.04]},
        },
        "setup": {"top_k": 3, "distractor_source": "hard"},
    }


def test_report_files(tmp_path) -> None:
    from ragdist.eval.report import HEADER, write_report

    rep = _report()
    results = rep.pop("results")
    write_report(tmp_path, results, rep)
    md = (tmp_path / "report.md").read_text()
    assert HEADER in md
    assert "| fine-tune only (closed book) | 25.0 | 50.0 | – | 75.0 | – | 20 | 18 |" in md
    assert "| RAG fine-tuned (with retrieval) | 75.0 | 50.0 | 50.0 | 25.0 | 90.0 | 20 | 153 |" in md
    assert "| RAG fine-tuned (with retrieval) | 75.0 | 50.0 | 25.0 | 50.0 | 75.0 |" in md  # robustness row
    # strict JSON: NaN written as null
    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["results"]["closed_book"]["faithfulness"] is None
    assert data["results"]["rag"]["em_at_k"]["3"] == 0.75


def test_plots_are_valid_pngs(tmp_path) -> None:
    from matplotlib.image import imread

    from ragdist.eval.plots import PLOTS, write_plots
    from ragdist.eval.report import clean

    paths = write_plots(clean(_report()), tmp_path / "plots")
    assert sorted(p.stem for p in paths) == sorted(PLOTS)
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
        img = imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # something was drawn
    assert not list((tmp_path / "plots").glob(".*"))  # no temp files left behind


def test_flatten_metrics() -> None:
    from ragdist.utils.logger import flatten_metrics

    flat = flatten_metrics({"eval": {"rag": {"em": 0.5, "lat": {"p50": 0.1}, "label": "x", "ok": True}}})
    assert flat == {"eval/rag/em": 0.5, "eval/rag/lat/p50": 0.1}


def test_run_logger_gives_each_loop_its_own_step_axis(tmp_path, capfd) -> None:
    from ragdist.utils.logger import LoggerConfig, RunLogger

    lg = RunLogger(LoggerConfig(backend="wandb", mode="offline"), tmp_path)
    for variant in ("rag", "closed_book"):  # two loops, each counting steps from 1
        for step in (1, 2):
            lg.log({f"train/{variant}/loss": 1.0 / step}, step=step)
    lg.log_table("eval/comparison", ["strategy", "EM"], [["rag", 0.5]])
    lg.finish()
    assert "less than the current step" not in capfd.readouterr().err
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in recs[:4]] == [1, 2, 1, 2] and recs[4]["rows"] == [["rag", 0.5]]
    assert list(tmp_path.glob("wandb/offline-run-*/*.wandb"))


# --------------------------------------------------------------------------- NLI


def save_tiny_classifier(path, labels: list[str]):
    """A tiny random sequence classifier with the MiniLM tokenizer, saved as a local HF model dir."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ragdist.embed.embedder import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    conf = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    BertForSequenceClassification(conf).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    # labels in a non-default order, so the entailment index has to be looked up
    return {
        "nli": save_tiny_classifier(
            tmp_path_factory.mktemp("nli"), ["contradiction", "neutral", "entailment"]
        ),
        "ce": save_tiny_classifier(tmp_path_factory.mktemp("ce"), ["score"]),
    }


def test_nli_scorer_entailment_probability(tiny_nli) -> None:
    import torch

    from ragdist.eval.faithfulness import NLIScorer, claim

    s = NLIScorer(str(tiny_nli["nli"]), batch_size=2)
    assert s.label_index == 2
    prem = ["Alpha airport has IATA code AAA.", "Bravo airport has IATA code BBB.", "Nothing here."]
    hyp = [claim("code of alpha?", "AAA"), claim("code of bravo?", "CCC"), claim("q?", "x")]
    scores = s.scores(prem, hyp)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    enc = s.tokenizer(prem, hyp, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = torch.softmax(s.model(**enc).logits, -1)[:, 2].numpy()
    assert np.allclose(scores, want, atol=1e-5)  # batching of 2 gives the same as one batch


def test_nli_cross_encoder_and_errors(tiny_nli, tmp_path) -> None:
    import torch

    from ragdist.eval.faithfulness import NLIScorer

    ce = NLIScorer(str(tiny_nli["ce"]))
    assert ce.label_index is None
    got = ce.scores(["a b c"], ["a"])
    enc = ce.tokenizer(["a b c"], ["a"], return_tensors="pt")
    with torch.no_grad():
        assert math.isclose(float(got[0]), float(torch.sigmoid(ce.model(**enc).logits[0, 0])), abs_tol=1e-5)
    with pytest.raises(ConfigError, match="not a label"):
        NLIScorer(str(tiny_nli["nli"]), label="supports")
    with pytest.raises(ConfigError, match="no config.json"):
        NLIScorer(str(tmp_path / "none"))


# --------------------------------------------------------------------------- one strategy, real service


def test_evaluate_strategy_against_service(ray_cluster, tiny_snapshot, embedder) -> None:
    from ragdist.data.qa import load_qa
    from ragdist.eval import metrics as M
    from ragdist.eval.compare import ServiceRetriever, rank_all
    from ragdist.eval.robustness import passage_text
    from ragdist.eval.runner import EvalConfig, evaluate_strategy, retrieval_depth
    from ragdist.retrieval.client import RetrievalConfig, start_service, stop_service
    from ragdist.train.model import ModelConfig, build_generator, load_tokenizer
    from tests.conftest import DATA

    rcfg = RetrievalConfig(service_name="eval-units", address=ray_cluster)
    start_service(str(tiny_snapshot), rcfg)
    try:
        retrieve = ServiceRetriever(rcfg, embedder)
        cfg = EvalConfig(
            max_new_tokens=3,
            batch_size=4,
            topk_sweep=[0, 1, 2],
            distractors=[2],
            latency_samples=3,
            latency_warmup=1,
        )
        exs = load_qa(DATA / "eval.jsonl")[:6]
        mcfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        tok = load_tokenizer(mcfg)
        model = build_generator(mcfg, tok)
        ranked, _ = rank_all(retrieve, exs, retrieval_depth(cfg, 2), cfg.batch_size)
        out = evaluate_strategy(model, tok, exs, ranked=ranked, top_k=2, cfg=cfg, retrieve=retrieve)
        closed = evaluate_strategy(model, tok, exs, ranked=None, top_k=0, cfg=cfg)
    finally:
        stop_service(rcfg)
    m, rows = out["metrics"], out["rows"]
    assert m["n"] == 6 and m["top_k"] == 2 and len(rows) == 6
    # the aggregate is the mean of the per-question scores, recomputed here from the predictions
    for key in ("em", "f1", "hallucination"):
        want = np.mean(
            [
                M.score_answer(r["prediction"], r["answers"], [passage_text(p) for p in rk[:2]])[key]
                for r, rk in zip(rows, ranked)
            ]
        )
        assert m[key] == pytest.approx(want)
    assert all(r["retrieved"] == [p["id"] for p in rk[:2]] for r, rk in zip(rows, ranked))
    # tokens: the passages are what retrieval adds; generation stops at max_new_tokens
    assert m["retrieval_added_tokens"] > 50 and m["question_tokens"] == pytest.approx(
        closed["metrics"]["prompt_tokens"]
    )
    assert m["prompt_tokens"] == pytest.approx(m["question_tokens"] + m["retrieval_added_tokens"])
    assert 1 <= m["generated_tokens"] <= 3 and m["tokens_per_q"] == pytest.approx(
        m["prompt_tokens"] + m["generated_tokens"]
    )
    # the k=0 point of the sweep is the same model closed book; k=top_k is the main run
    assert m["em_at_k"]["0"] == closed["metrics"]["em"] and m["em_at_k"]["2"] == m["em"]
    assert m["distractors_added"]["2"] == 2.0 and set(m) >= {"em_reversed", "em_shuffled"}
    # latency: one sample per timed question; percentiles ordered; closed book has no retrieval stage
    assert len(out["latency"]["e2e"]) == 3 and len(closed["latency"]["retrieval"]) == 0
    lat = m["e2e_latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert m["retrieval_latency_s"]["p50"] > 0 and closed["metrics"]["retrieval_latency_s"] == {}
    assert math.isnan(closed["metrics"]["faithfulness"])


# --------------------------------------------------------------------------- one passage at a time


def test_sequential_model_is_asked_one_passage_at_a_time() -> None:
    import torch

    from ragdist.data.qa import QAExample
    from ragdist.eval.generation import generate_scored
    from ragdist.eval.runner import EvalConfig, generate_all, passage_prior, question_prompts
    from ragdist.prompts import prompt_ids
    from ragdist.train.config import ExamplesConfig
    from ragdist.train.model import ModelConfig, build_generator, load_tokenizer

    torch.manual_seed(0)
    mcfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tok = load_tokenizer(mcfg)
    model = build_generator(mcfg, tok).eval()
    seq, concat = ExamplesConfig(aggregation="sequential"), ExamplesConfig()

    exs = [QAExample(id=str(i), question=q, answers=["x"]) for i, q in enumerate(["Which code has Alpha?", "Where is Echo?"])]
    ctxs = [RANKED[:3], RANKED[3:6]]
    cfg = EvalConfig(max_new_tokens=4, batch_size=2, max_prompt_len=128)

    # each answer's log-probability is the model's own, summed over the tokens it generated
    prompt = prompt_ids(tok, exs[0].question, [RANKED[0]], 128, seq)
    longer = prompt_ids(tok, exs[0].question, RANKED[:3], 128, concat)
    assert len(longer) > len(prompt)
    texts, counts, logps = generate_scored(model, tok, [longer, prompt], 4)  # `prompt` is left-padded
    with torch.no_grad():
        full = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        gen = full[0, len(prompt) :][: counts[1]]
        logits = model(full[:, : len(prompt) + len(gen)]).logits[0, len(prompt) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(1, gen[:, None]).sum().item()
    assert logps[1] == pytest.approx(want, abs=1e-3) and want < 0

    # sequential: one prompt per passage; the answer is the most probable of them, whatever the order
    assert [len(question_prompts(tok, ex.question, c, 128, seq)) for ex, c in zip(exs, ctxs)] == [3, 3]
    assert len(question_prompts(tok, exs[0].question, ctxs[0], 128, concat)) == 1
    out = generate_all(model, tok, exs, ctxs, cfg, seq)
    rev = generate_all(model, tok, exs, [c[::-1] for c in ctxs], cfg, seq)
    assert out.predictions == rev.predictions
    for ex, c, pred, n_prompt in zip(exs, ctxs, out.predictions, out.prompt_tokens):
        prompts = question_prompts(tok, ex.question, c, 128, seq)
        t, _, lp = generate_scored(model, tok, prompts, 4)
        assert pred == t[int(np.argmax(lp))]
        assert n_prompt == sum(len(p) for p in prompts)
    # the retriever's posterior weighs each passage's answer: log p(z|q) + log p(y|z,q)
    scored = [[dict(p, score=s) for p, s in zip(c, (0.50, 0.52, 0.45))] for c in ctxs]
    prior = passage_prior(scored[0], cfg)
    z = np.array([0.50, 0.52, 0.45]) / cfg.retriever_temperature
    assert prior == pytest.approx(z - np.log(np.exp(z).sum()))
    assert np.exp(prior).sum() == pytest.approx(1.0)
    assert passage_prior(ctxs[0], cfg).tolist() == [0, 0, 0]  # no scores: uniform
    flat = EvalConfig(max_new_tokens=4, batch_size=2, max_prompt_len=128, passage_prior="uniform")
    assert passage_prior(scored[0], flat).tolist() == [0, 0, 0]
    weighed = generate_all(model, tok, exs, scored, cfg, seq)
    assert weighed.predictions == generate_all(model, tok, exs, [c[::-1] for c in scored], cfg, seq).predictions
    for ex, c, pred in zip(exs, scored, weighed.predictions):
        t, _, lp = generate_scored(model, tok, question_prompts(tok, ex.question, c, 128, seq), 4)
        assert pred == t[int(np.argmax(np.array(lp) + passage_prior(c, cfg)))]
    # a sharp enough posterior decides alone: the best-scored passage's answer
    sharp = [[dict(p, score=10.0 * (j == 2)) for j, p in enumerate(c)] for c in ctxs]
    for ex, c, pred in zip(exs, sharp, generate_all(model, tok, exs, sharp, cfg, seq).predictions):
        assert pred == generate_scored(model, tok, question_prompts(tok, ex.question, c[2:], 128, seq), 4)[0][0]
    assert generate_all(model, tok, exs, scored, flat, seq).predictions == out.predictions
    # concat: one prompt holding every passage, as before
    cat = generate_all(model, tok, exs, ctxs, cfg, concat)
    assert cat.prompt_tokens == [len(prompt_ids(tok, ex.question, c, 128, concat)) for ex, c in zip(exs, ctxs)]


def test_answer_budget_fits_the_longest_training_answer() -> None:
    from ragdist.data.qa import QAExample
    from ragdist.eval.generation import BUDGET_MARGIN, answer_budget
    from ragdist.prompts import answer_ids
    from ragdist.train.model import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig())
    long_answer = "[Rn] 5f14 6d10 7s2 7p4"
    train = [
        QAExample(id="a", question="symbol?", answers=["Lv"]),
        # a question counts by its shortest answer: the long alias does not raise the budget
        QAExample(id="b", question="configuration?", answers=[long_answer + " " + long_answer, long_answer]),
    ]
    need = len(answer_ids(tok, long_answer))
    assert need > len(answer_ids(tok, "Lv")) and need > 8
    evals = [
        QAExample(id="c", question="q1", answers=["Ts"]),
        QAExample(id="d", question="q2", answers=[" ".join([long_answer] * 3)]),
    ]
    auto = answer_budget(tok, train, evals, None)
    assert auto.longest == need and auto.tokens == math.ceil(need * BUDGET_MARGIN)
    assert (auto.over, auto.questions) == (1, 2)  # the eval answer three times as long cannot fit
    # a set budget is kept, and every eval answer longer than it is counted
    fixed = answer_budget(tok, train, evals, 3)
    assert fixed.tokens == 3 and fixed.over == 1 + (len(answer_ids(tok, "Ts")) > 3)


def test_step_notes_compare_the_rows_not_the_pretext_stage() -> None:
    from ragdist.recipes.evaluate import step_notes

    assert step_notes({"pretext": 500, "rag": 2000, "closed_book": 2000}) == []
    assert step_notes({"rag": 8, "closed_book": 6}) == ["rows were trained for different numbers of steps: {'rag': 8, 'closed_book': 6}"]
