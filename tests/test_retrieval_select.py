"""Retrieval by measurement: mode=auto's choice on cases built for it, and the retrieval-only eval (CLI).

Two small corpora on the real service: in one, questions quote a rare reference code verbatim among
passages of shuffled everyday sentences (BM25 finds the one passage with the code; MiniLM mostly does
not); in the other, questions paraphrase their passage with synonyms and share no term with any
passage (BM25 finds nothing; MiniLM matches the meaning).
"""

from __future__ import annotations

import dataclasses
import json
import random
import string

import pytest
from omegaconf import OmegaConf

from ragdist.data.qa import QAExample
from ragdist.errors import ConfigError, RetrievalError
from ragdist.retrieval.client import (
    HybridConfig,
    RetrievalClient,
    RetrievalConfig,
    retrieval_mode,
    start_service,
    stop_service,
)
from ragdist.retrieval.select import CHOICES, choose_mode, resolve_mode
from tests.conftest import run_cli

SENTENCES = [
    "The harbour freezes over in the coldest weeks of winter.", "Fresh bread is baked every morning before dawn.",
    "The orchestra rehearses twice a week in the old town hall.", "Mountain trails close when heavy snow is forecast.",
    "Local farmers sell apples and pears at the Saturday market.", "The museum displays pottery from ancient cultures.",
    "A new bicycle lane connects the station with the university.", "The library lends telescopes on clear nights.",
    "Tea plantations cover the hills above the river valley.", "The football club trains on the field behind the school.",
    "Migrating geese stop at the lake every autumn.", "The bakery closes early on public holidays.",
    "Engineers inspect the bridge cables each spring.", "The ferry crosses the strait four times a day.",
    "Volunteers plant trees along the highway every year.", "The theatre stages a comedy during the summer festival.",
]
# (word in the passage, its synonym in the question): no question term occurs in any passage.
SYNONYMS = [
    ("automobile", "car"), ("physician", "doctor"), ("infant", "baby"), ("feline", "cat"), ("canine", "puppy"),
    ("attorney", "lawyer"), ("sofa", "couch"), ("boulder", "stone"), ("ocean", "sea"), ("garbage", "trash"),
    ("pupil", "schoolchild"), ("chef", "cook"), ("rabbit", "bunny"), ("vessel", "ship"), ("airplane", "jet"),
    ("professor", "lecturer"), ("cash", "money"), ("trousers", "pants"), ("highway", "motorway"), ("jewel", "gem"),
    ("forest", "woods"), ("bicycle", "bike"), ("stallion", "horse"), ("spectacles", "glasses"),
]
PLACES = ["fountain", "bakery", "lighthouse", "stadium", "orchard", "cathedral", "warehouse", "meadow", "pier",
          "tunnel", "greenhouse", "library", "castle", "canal", "market", "garage", "chapel", "quarry", "harbor",
          "mill", "cottage", "barn", "bridge", "tower"]


def _serve(name, docs, tmp_path_factory, embedder):
    from ragdist.data.corpus import Document, chunk_documents
    from ragdist.index.builder import IndexConfig, build_snapshot

    chunks = chunk_documents([Document(id=d["id"], text=d["text"]) for d in docs], embedder.tokenizer, 128, 32)
    root = tmp_path_factory.mktemp(f"select-{name}")
    snap = build_snapshot(chunks, embedder.encode([c.text for c in chunks]), IndexConfig(num_shards=2, root=str(root)),
                          embedder_name=embedder.name)
    cfg = RetrievalConfig(service_name=f"select-{name}", top_k=3)
    start_service(str(snap), dataclasses.replace(cfg, mode="hybrid"))
    return cfg


@pytest.fixture(scope="module")
def lexical_case(ray_cluster, tmp_path_factory, embedder):
    rng = random.Random(0)
    docs, qs = [], []
    for i in range(150):
        code = "".join(rng.choices(string.ascii_lowercase, k=3) + rng.choices(string.digits, k=4))
        a, b, c = rng.sample(SENTENCES, 3)
        docs.append({"id": f"rec-{i}", "text": f"{a} {b} Its register reference is {code}. {c}"})
        qs.append(QAExample(f"rec-{i}-q", f"Which record has the register reference {code}?", [code], [f"rec-{i}"]))
    cfg = _serve("lexical", docs, tmp_path_factory, embedder)
    yield cfg, qs
    stop_service(cfg)


@pytest.fixture(scope="module")
def semantic_case(ray_cluster, tmp_path_factory, embedder):
    docs, qs = [], []
    for i, ((word, synonym), place) in enumerate(zip(SYNONYMS, PLACES)):
        docs.append({"id": f"fact-{i}", "text": f"A {word} waited quietly beside the {place}."})
        qs.append(QAExample(f"fact-{i}-q", f"Which text tells of one {synonym}?", [place], [f"fact-{i}"]))
    cfg = _serve("semantic", docs, tmp_path_factory, embedder)
    yield cfg, qs, docs
    stop_service(cfg)


def _by_mode(table):
    return {r["mode"]: r for r in table["modes"]}


def test_auto_picks_bm25_when_questions_quote_rare_words(lexical_case, embedder):
    cfg, qs = lexical_case
    mode, table = choose_mode(dataclasses.replace(cfg, mode="auto"), embedder, qs)
    m = _by_mode(table)
    assert (table["metric"], table["k"], table["holdout_questions"], table["tune_questions"]) == ("recall@3", 3, 75, 75)
    assert mode == "bm25"
    assert m["bm25"]["recall@3"] == 1.0
    assert m["bm25"]["recall@3"] >= m["dense"]["recall@3"] + 0.5, m
    # The sweep reaches BM25's own order (a large lexical weight), so hybrid is not left behind.
    assert m["hybrid"]["recall@3"] >= m["bm25"]["recall@3"] - 0.01
    assert table["hybrid"]["lexical_weight"] > table["hybrid"]["dense_weight"]
    # The configured fusion (1, 1, rrf_k 60) is measured first; it is also a point of the grid.
    assert (table["sweep"][0]["lexical_weight"], table["sweep"][0]["rrf_k"]) == (1.0, 60)
    assert len(table["sweep"]) == len(cfg.auto.lexical_weights) * len(cfg.auto.rrf_ks)


def test_auto_picks_dense_when_questions_paraphrase(semantic_case, embedder):
    from ragdist.retrieval.server.lexical import _tokenize

    cfg, qs, docs = semantic_case
    passage_terms = {t for d in _tokenize([d["text"] for d in docs], ids=False) for t in d}
    assert not passage_terms & {t for q in _tokenize([q.question for q in qs], ids=False) for t in q}
    mode, table = choose_mode(dataclasses.replace(cfg, mode="auto"), embedder, qs)
    m = _by_mode(table)
    assert mode == "dense"
    assert m["bm25"]["recall@3"] == 0.0  # no shared term: BM25 returns nothing at all
    assert m["dense"]["recall@3"] >= 0.75, m
    assert mode == max(CHOICES, key=lambda c: (m[c]["recall@3"], m[c]["mrr"], -CHOICES.index(c)))


def test_resolve_mode_writes_the_choice_into_the_run_config(lexical_case, embedder, tmp_path):
    cfg, qs = lexical_case
    node = OmegaConf.structured(dataclasses.replace(cfg, mode="auto"))
    table = resolve_mode(node, embedder, qs, out=tmp_path / "retrieval_mode.json")
    assert node.mode == "bm25" == table["mode"]
    assert json.loads((tmp_path / "retrieval_mode.json").read_text())["mode"] == "bm25"
    fixed = OmegaConf.structured(cfg)
    assert resolve_mode(fixed, embedder, qs) is None and fixed.mode == "dense"
    # BM25 mode answers only passages sharing a term; an unresolved auto is refused.
    got = RetrievalClient(dataclasses.replace(cfg, mode="bm25"), embedder).retrieve([qs[0].question, "zzzz"], 3)
    assert got[0][0]["doc_id"] == qs[0].gold_ids[0] and got[1] == []
    with pytest.raises(RetrievalError, match="mode=auto"):
        RetrievalClient(dataclasses.replace(cfg, mode="auto"), embedder).retrieve(["x"], 3)


def test_mode_and_the_older_hybrid_switch():
    from ragdist.config import compose

    assert retrieval_mode(RetrievalConfig(hybrid=HybridConfig(enabled=True))) == "hybrid"
    with pytest.raises(ConfigError, match="retrieval.mode='lexical'"):
        retrieval_mode(RetrievalConfig(mode="lexical"))
    with pytest.raises(ConfigError, match="contradicts retrieval.mode=bm25"):
        retrieval_mode(RetrievalConfig(mode="bm25", hybrid=HybridConfig(enabled=True)))
    assert compose(["retrieval=hybrid", "run_dir=/tmp/x"]).retrieval.mode == "hybrid"
    assert compose(["retrieval.mode=auto", "run_dir=/tmp/x"]).retrieval.auto.k == 0


def test_retrieval_only_without_reranker_says_so(lexical_case, embedder):
    from ragdist.eval.retrieval_eval import evaluate_retrieval, markdown

    cfg, qs = lexical_case
    report = evaluate_retrieval(cfg, embedder, qs[:40], qs[40:], ks=[1, 5], batch_size=16)
    assert list(report["retrieval"]) == ["dense", "bm25", "hybrid", "hybrid_tuned"]
    assert any("re-rank not run" in n for n in report["notes"])
    assert report["retrieval"]["bm25"]["metrics"]["recall@1"] == 1.0
    assert report["selection"]["mode"] == "bm25"
    report["setup"].update(eval_file="e", train_file="t")
    assert "re-rank not run" in markdown(report)


def test_retrieval_only_cli_reports_every_mode(ray_cluster, tiny_index, tmp_path, tiny_cross_encoder):
    run = tmp_path / "run"
    r = run_cli([
        "ragdist-eval", "+experiment=tiny", "eval.retrieval_only=true", f"index.root={tiny_index}",
        f"retrieval.rerank.model={tiny_cross_encoder}", "retrieval.rerank.top_n=10", "retrieval.auto.questions=60",
        "retrieval.service_name=retrieval-only-cli",
        "model.name_or_path=/nonexistent/generator",  # any attempt to load a generator would fail
        f"hydra.run.dir={run}",
    ], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    modes = ["dense", "bm25", "hybrid", "hybrid_tuned", "hybrid_rerank"]
    assert list(report["retrieval"]) == modes
    for name in modes:
        m = report["retrieval"][name]["metrics"]
        for k in (1, 2, 3, 5, 10):
            assert 0.0 <= m[f"recall@{k}"] <= 1.0 and 0.0 <= m[f"precision@{k}"] <= 1.0 and f"ndcg@{k}" in m
        assert "mrr" in m and len(report["retrieval"][name]["recall_curve"]) == 10
    assert report["retrieval"]["dense"]["metrics"]["recall@5"] >= 0.9  # the tiny sample is easy for every mode
    assert report["retrieval"]["hybrid_rerank"]["config"]["rerank"] == tiny_cross_encoder
    assert report["selection"]["mode"] in CHOICES and report["setup"]["questions"] == 40
    md = (run / "report.md").read_text()
    for label in ("dense", "BM25", "hybrid (fusion tuned on train)", "hybrid tuned + re-rank", "R@5", "MRR", "nDCG@10"):
        assert label in md
    assert (run / "plots" / "recall_at_k.png").stat().st_size > 1000
    assert not (run / "predictions_rag.jsonl").exists()


@pytest.mark.slow
def test_train_resolves_auto_once_before_training(ray_cluster, tiny_index, tmp_path):
    run = tmp_path / "run"
    r = run_cli([
        "ragdist-train", "+experiment=tiny", "retrieval.mode=auto", "retrieval.auto.questions=60",
        f"index.root={tiny_index}", "retrieval.service_name=auto-train", "trainer.variants=[rag]",
        "trainer.max_steps=4", "eval.strategies=[rag]", "eval.max_questions=4", "eval.latency_samples=1",
        "eval.latency_warmup=0", "eval.topk_sweep=[]", "eval.distractors=[]", "eval.order_checks=false",
        "eval.plots=false", f"hydra.run.dir={run}",
    ], env={"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    chosen = json.loads((run / "retrieval_mode.json").read_text())
    assert chosen["mode"] in CHOICES and {m["mode"] for m in chosen["modes"]} == set(CHOICES)
    # The ranks trained with the resolved mode: it is what the run's config records.
    assert OmegaConf.load(run / "resolved.yaml").retrieval.mode == chosen["mode"]
    assert "retrieval.mode=auto -> " in r.stderr
    assert json.loads((run / "report.json").read_text())["results"]["rag"]["n"] == 4
