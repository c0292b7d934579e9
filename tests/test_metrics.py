"""Hand-checked cases for ragdist.eval.metrics."""

from __future__ import annotations

import math

import pytest

from ragdist.eval.metrics import (
    _matches,
    aggregate,
    answer_in_passages,
    answer_recall_at_k,
    exact_match,
    faithfulness,
    is_hallucination,
    mrr,
    ndcg_at_k,
    normalize_answer,
    percentiles,
    precision_at_k,
    recall_at_k,
    retrieval_scores,
    score_answer,
    token_f1,
)

# --------------------------------------------------------------------------- normalize_answer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # case, articles, whitespace
        ("The Cat", "cat"),
        ("  A   quick\tbrown\nfox  ", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("Theory of the universe", "theory of universe"),  # "the" only as a whole word
        ("the", ""),
        ("", ""),
        # punctuation
        ("Paris!", "paris"),
        ("\"Hello,\" she said.", "hello she said"),
        ("don't", "dont"),
        ("U.S.A.", "usa"),
        ("«Bonjour»", "bonjour"),
        # thousands separators
        ("1,026", "1026"),
        ("1,000,000", "1000000"),
        ("1\u2009026", "1026"),  # thin space
        ("1\u00a0026", "1026"),  # no-break space
        ("1\u202f026", "1026"),  # narrow no-break space
        ("1 026", "1 026"),  # ordinary space: two numbers
        ("3, 4", "3 4"),
        ("3,4", "3 4"),  # not a 3-digit group: separator, not thousands
        # decimals and currency
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("It is 3.", "it is 3"),
        ("$1,000.50", "1000.50"),
        ("10:30", "10 30"),
        ("1-2", "1 2"),
        # unicode
        ("Ｃａｔ", "cat"),  # full-width -> ASCII via NFKC
        ("cafe\u0301", "caf\u00e9"),  # decomposed -> composed
        ("ﬁsh", "fish"),  # ligature
        ("zero\u200bwidth", "zerowidth"),
        ("ÉCOLE", "école"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_thousands_variants_agree() -> None:
    assert normalize_answer("1,026") == normalize_answer("1026") == normalize_answer("1\u2009026")


def test_normalize_idempotent() -> None:
    for s in ["The $1,000.50 Cat!", "3, 4", "Ｃａｔ", "1\u2009026 and a half"]:
        once = normalize_answer(s)
        assert normalize_answer(once) == once


# --------------------------------------------------------------------------- exact_match


def test_exact_match_basic() -> None:
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert exact_match("1,026", ["1026"]) == 1.0
    assert exact_match("$1,000.50", ["1000.50"]) == 1.0


def test_exact_match_max_over_answers() -> None:
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0
    assert exact_match("Boston", ["New York City", "nyc"]) == 0.0


def test_exact_match_bare_string_is_one_answer() -> None:
    assert exact_match("a", "abc") == 0.0
    assert exact_match("abc", "abc") == 1.0


def test_exact_match_empty_answers_raises() -> None:
    with pytest.raises(ValueError):
        exact_match("x", [])


# --------------------------------------------------------------------------- token_f1


def test_token_f1_partial_overlap() -> None:
    # pred "the cat sat" -> [cat, sat]; gold "cat sat down" -> [cat, sat, down]
    # common = 2; p = 2/2 = 1; r = 2/3; F1 = 2*1*(2/3) / (1 + 2/3) = (4/3)/(5/3) = 0.8
    assert token_f1("the cat sat", ["cat sat down"]) == pytest.approx(0.8)


def test_token_f1_counts_duplicates_as_bags() -> None:
    # pred "cat cat cat" -> [cat, cat, cat]; gold "cat dog" -> [cat, dog]
    # common = min(3,1) = 1; p = 1/3; r = 1/2; F1 = 2*(1/6)/(5/6) = 0.4
    assert token_f1("cat cat cat", ["cat dog"]) == pytest.approx(0.4)


def test_token_f1_max_over_answers_and_extremes() -> None:
    assert token_f1("the cat sat", ["dog", "cat sat down", "cat sat"]) == pytest.approx(1.0)
    assert token_f1("dog", ["cat"]) == 0.0
    assert token_f1("", [""]) == 1.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to empty
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", [""]) == 0.0
    with pytest.raises(ValueError):
        token_f1("cat", [])


# --------------------------------------------------------------------------- passages / faithfulness


PASSAGES = [
    "The Eiffel Tower is 330 metres tall and was completed in 1889.",
    "Its population was 1,026 in the 2010 census.",
]


def test_answer_in_passages() -> None:
    assert answer_in_passages("Eiffel Tower", PASSAGES)
    assert answer_in_passages("the eiffel tower.", PASSAGES)
    assert answer_in_passages("1026", PASSAGES)  # separator removed on both sides
    assert answer_in_passages("330 metres", PASSAGES)
    assert not answer_in_passages("metres 330", PASSAGES)  # must be contiguous, in order
    assert not answer_in_passages("Eiff", PASSAGES)  # token boundary
    assert not answer_in_passages("188", PASSAGES)  # not a prefix of 1889
    assert not answer_in_passages("Louvre", PASSAGES)
    assert not answer_in_passages("", PASSAGES)
    assert not answer_in_passages("the", PASSAGES)  # normalises to empty
    assert not answer_in_passages("Eiffel", [])


def test_faithfulness() -> None:
    assert faithfulness("1889", PASSAGES) == 1.0
    assert faithfulness("1890", PASSAGES) == 0.0
    assert faithfulness("1889", []) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answers", "passages", "expected"),
    [
        # answered | supported | wrong -> hallucination
        ("1889", ["1889"], PASSAGES, False),  # yes | yes | no
        ("1889", ["1887"], PASSAGES, False),  # yes | yes | yes (grounded but wrong)
        ("1887", ["1887"], PASSAGES, False),  # yes | no  | no  (parametric, correct)
        ("1890", ["1887"], PASSAGES, True),  # yes | no  | yes
        ("", ["1887"], PASSAGES, False),  # abstention
        ("The.", ["1887"], PASSAGES, False),  # normalises to empty: abstention
        # closed-book (no passages)
        ("1890", ["1887"], [], True),
        ("1887", ["1887"], [], False),
        ("", ["1887"], [], False),
    ],
)
def test_is_hallucination_truth_table(
    prediction: str, answers: list[str], passages: list[str], expected: bool
) -> None:
    assert is_hallucination(prediction, answers, passages) is expected


# --------------------------------------------------------------------------- retrieval

# Ranked ids and document-level gold used by the hand computations below.
#   rank 1 "d3"   -> no
#   rank 2 "d1#2" -> hits gold d1
#   rank 3 "d5"   -> no
#   rank 4 "d2#1" -> hits gold d2
#   rank 5 "d1#7" -> d1 already credited -> not relevant again
# gold d4 is never retrieved.
RANKING = ["d3", "d1#2", "d5", "d2#1", "d1#7"]
GOLD = {"d1", "d2", "d4"}


def test_matches_helper() -> None:
    assert _matches("doc1#3", {"doc1"}) == ["doc1"]
    assert _matches("doc1#3", {"doc1#3"}) == ["doc1#3"]
    assert _matches("doc1#3", {"doc1", "doc1#3"}) == ["doc1#3", "doc1"]  # exact first
    assert _matches("doc1", {"doc1#3"}) == []  # passage gold needs the passage
    assert _matches("doc10#1", {"doc1"}) == []
    assert _matches("doc1#3#x", {"doc1"}) == ["doc1"]  # split at the first '#'


def test_precision_at_k() -> None:
    assert precision_at_k(RANKING, GOLD, 1) == 0.0  # 0/1
    assert precision_at_k(RANKING, GOLD, 2) == pytest.approx(1 / 2)  # 1/2
    assert precision_at_k(RANKING, GOLD, 3) == pytest.approx(1 / 3)  # 1/3
    assert precision_at_k(RANKING, GOLD, 5) == pytest.approx(2 / 5)  # 2/5 (d1#7 not recounted)
    assert precision_at_k(RANKING, GOLD, 10) == pytest.approx(2 / 10)  # divides by k, not by 5


def test_recall_at_k() -> None:
    assert recall_at_k(RANKING, GOLD, 1) == 0.0  # 0/3
    assert recall_at_k(RANKING, GOLD, 2) == pytest.approx(1 / 3)  # {d1}/3
    assert recall_at_k(RANKING, GOLD, 4) == pytest.approx(2 / 3)  # {d1, d2}/3
    assert recall_at_k(RANKING, GOLD, 5) == pytest.approx(2 / 3)  # d1#7 adds nothing


def test_recall_counts_duplicate_hits_once() -> None:
    # three passages of the same gold document: 1 distinct gold out of 2
    assert recall_at_k(["a#1", "a#2", "a#3"], {"a", "b"}, 3) == pytest.approx(1 / 2)
    assert recall_at_k(["a#1", "a#1"], {"a#1"}, 2) == 1.0
    assert precision_at_k(["a#1", "a#1"], {"a#1"}, 2) == pytest.approx(1 / 2)


def test_document_id_gold_matching() -> None:
    assert recall_at_k(["doc1#3"], {"doc1"}, 1) == 1.0
    assert precision_at_k(["doc1#3"], {"doc1"}, 1) == 1.0
    assert mrr(["x", "doc1#3"], {"doc1"}) == pytest.approx(1 / 2)
    assert recall_at_k(["doc1"], {"doc1#3"}, 1) == 0.0


def test_mixed_granularity_gold_each_credited_once() -> None:
    # gold has both the document and one of its passages; two retrieved passages of
    # doc1 can satisfy both ("doc1#3" exactly, "doc1#5" via its document).
    gold = {"doc1", "doc1#3"}
    assert recall_at_k(["doc1#3", "doc1#5"], gold, 2) == 1.0
    # the same passage twice: first credits "doc1#3", second falls back to "doc1"
    assert recall_at_k(["doc1#3", "doc1#3"], gold, 2) == 1.0
    assert recall_at_k(["doc1#5", "doc1#6"], gold, 2) == pytest.approx(1 / 2)


def test_mrr() -> None:
    assert mrr(RANKING, GOLD) == pytest.approx(1 / 2)  # first hit at rank 2
    assert mrr(["d1#1"], GOLD) == 1.0
    assert mrr(["x", "y", "z"], GOLD) == 0.0
    assert mrr([], GOLD) == 0.0


def test_ndcg_at_k() -> None:
    l3, l5 = math.log2(3), math.log2(5)
    # k=2: DCG = 1/log2(3); IDCG = 1/log2(2) + 1/log2(3) = 1 + 0.6309
    assert ndcg_at_k(RANKING, GOLD, 2) == pytest.approx((1 / l3) / (1 + 1 / l3))  # ~0.3869
    # k=3: DCG = 1/log2(3); IDCG (3 gold) = 1 + 1/log2(3) + 1/log2(4) = 2.1309
    assert ndcg_at_k(RANKING, GOLD, 3) == pytest.approx((1 / l3) / (1 + 1 / l3 + 0.5))  # ~0.2961
    # k=5: DCG = 1/log2(3) + 1/log2(5) = 1.0616 (rank 5 is a repeat of d1); IDCG uses min(3,5)=3
    assert ndcg_at_k(RANKING, GOLD, 5) == pytest.approx((1 / l3 + 1 / l5) / (1 + 1 / l3 + 0.5))  # ~0.4982
    assert ndcg_at_k(RANKING, GOLD, 5) == pytest.approx(0.4982, abs=1e-4)


def test_ndcg_perfect_and_zero() -> None:
    assert ndcg_at_k(["a", "b", "x"], {"a", "b"}, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["a#1", "a#2"], {"a"}, 2) == pytest.approx(1.0)  # repeat not rewarded
    assert ndcg_at_k(["x", "y"], {"a"}, 2) == 0.0


def test_retrieval_empty_gold_is_nan_and_bad_k_raises() -> None:
    assert math.isnan(recall_at_k(["a"], set(), 1))
    assert math.isnan(precision_at_k(["a"], [], 1))
    assert math.isnan(mrr(["a"], []))
    assert math.isnan(ndcg_at_k(["a"], [], 1))
    for fn in (precision_at_k, recall_at_k, ndcg_at_k):
        with pytest.raises(ValueError):
            fn(["a"], {"a"}, 0)


# --------------------------------------------------------------------------- percentiles / aggregate


def test_percentiles_linear() -> None:
    # sorted [1, 2, 3, 4], positions 0..3
    # p50: 0.50*3 = 1.5  -> 2 + 0.5*(3-2) = 2.5
    # p95: 0.95*3 = 2.85 -> 3 + 0.85*(4-3) = 3.85
    # p99: 0.99*3 = 2.97 -> 3.97; mean = 10/4 = 2.5
    out = percentiles([4.0, 1.0, 3.0, 2.0])
    assert list(out) == ["p50", "p95", "p99", "mean"]
    assert out["p50"] == pytest.approx(2.5)
    assert out["p95"] == pytest.approx(3.85)
    assert out["p99"] == pytest.approx(3.97)
    assert out["mean"] == pytest.approx(2.5)


def test_percentiles_custom_single_and_empty() -> None:
    assert percentiles([7.0], ps=(90,)) == {"p90": 7.0, "mean": 7.0}
    assert set(percentiles([1.0, 2.0], ps=(99.9,))) == {"p99.9", "mean"}
    empty = percentiles([])
    assert set(empty) == {"p50", "p95", "p99", "mean"}
    assert all(math.isnan(v) for v in empty.values())
    assert percentiles([1.0, float("nan"), 3.0])["mean"] == pytest.approx(2.0)


def test_aggregate() -> None:
    rows = [
        {"em": 1.0, "f1": 0.5, "recall@5": float("nan")},
        {"em": 0.0, "f1": float("nan"), "recall@5": float("nan")},
        {"em": 1.0, "halluc": True},
    ]
    out = aggregate(rows)
    assert list(out) == ["em", "f1", "recall@5", "halluc"]
    assert out["em"] == pytest.approx(2 / 3)  # (1 + 0 + 1)/3
    assert out["f1"] == pytest.approx(0.5)  # NaN skipped: 0.5/1
    assert math.isnan(out["recall@5"])  # all NaN
    assert out["halluc"] == 1.0  # only present in one row
    assert aggregate([]) == {}


# --------------------------------------------------------------------------- score_answer


def test_score_answer_with_context() -> None:
    # correct and in the passages: faithful, not a hallucination
    s = score_answer("1,026", ["1026"], PASSAGES)
    assert s == {"em": 1.0, "f1": 1.0, "answered": 1.0, "faithfulness": 1.0, "hallucination": 0.0}
    # wrong and not in the passages: unfaithful hallucination
    s = score_answer("1890", ["1889"], PASSAGES)
    assert s == {"em": 0.0, "f1": 0.0, "answered": 1.0, "faithfulness": 0.0, "hallucination": 1.0}
    # wrong but copied from the passages: faithful, not a hallucination
    s = score_answer("330 metres", ["1889"], PASSAGES)
    assert s["faithfulness"] == 1.0 and s["hallucination"] == 0.0 and s["em"] == 0.0


def test_score_answer_abstention_and_closed_book() -> None:
    s = score_answer("", ["1889"], PASSAGES)
    assert s["answered"] == 0.0 and math.isnan(s["faithfulness"]) and s["hallucination"] == 0.0
    # closed book: faithfulness undefined, every wrong answer is a hallucination
    s = score_answer("1890", ["1889"], None)
    assert math.isnan(s["faithfulness"]) and s["hallucination"] == 1.0
    s = score_answer("The 1889.", ["1889"], None)
    assert s["em"] == 1.0 and s["hallucination"] == 0.0
    # an empty context (retrieval found nothing) is a context: unsupported, 0 not NaN
    assert score_answer("1889", ["1889"], [])["faithfulness"] == 0.0


def test_score_answer_aggregates_to_rates() -> None:
    rows = [
        score_answer("1889", ["1889"], PASSAGES),  # faithful, right
        score_answer("1890", ["1889"], PASSAGES),  # unfaithful, hallucination
        score_answer("", ["1889"], PASSAGES),  # abstains: no faithfulness
        score_answer("330 metres", ["1889"], PASSAGES),  # faithful, wrong
    ]
    out = aggregate(rows)
    assert out["em"] == pytest.approx(1 / 4)
    assert out["answered"] == pytest.approx(3 / 4)
    assert out["faithfulness"] == pytest.approx(2 / 3)  # over the 3 answered
    assert out["hallucination"] == pytest.approx(1 / 4)  # over all 4


def test_answer_recall_at_k() -> None:
    assert answer_recall_at_k(PASSAGES, ["1026"], 1) == 0.0  # only in the second passage
    assert answer_recall_at_k(PASSAGES, ["1026"], 2) == 1.0
    assert answer_recall_at_k(PASSAGES, ["Louvre", "eiffel tower"], 1) == 1.0  # any reference
    assert answer_recall_at_k([], ["1026"], 3) == 0.0
    with pytest.raises(ValueError):
        answer_recall_at_k(PASSAGES, ["1026"], 0)


def test_retrieval_scores_bundle() -> None:
    out = retrieval_scores(RANKING, GOLD, [2, 5])
    assert set(out) == {"precision@2", "recall@2", "ndcg@2", "precision@5", "recall@5", "ndcg@5", "mrr"}
    assert out["precision@5"] == pytest.approx(2 / 5)
    assert out["recall@2"] == pytest.approx(1 / 3)
    assert out["mrr"] == pytest.approx(1 / 2)
    assert out["ndcg@5"] == pytest.approx(0.4982, abs=1e-4)
