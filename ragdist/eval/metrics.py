"""Answer-quality, faithfulness and retrieval metrics.

Pure Python plus numpy so the module can be imported by lightweight evaluation
workers without pulling in torch or transformers.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

import numpy as np

__all__ = [
    "aggregate",
    "answer_in_passages",
    "answer_recall_at_k",
    "exact_match",
    "faithfulness",
    "is_hallucination",
    "mrr",
    "ndcg_at_k",
    "normalize_answer",
    "percentiles",
    "precision_at_k",
    "recall_at_k",
    "retrieval_scores",
    "score_answer",
    "token_f1",
]

# Thin, narrow no-break, no-break and figure spaces are used as digit-group separators
# ("1 026"). They are removed before NFKC because NFKC turns them into ordinary spaces,
# after which "1 026" could no longer be told apart from two separate numbers.
_SPACE_GROUP_SEP = re.compile(r"(?<=\d)[\u00a0\u2007\u2009\u202f](?=\d{3}(?!\d))")
# A comma directly followed by exactly three digits is a thousands separator ("1,026",
# "1,000,000"); "3, 4" has a space after the comma and is left alone.
_COMMA_GROUP_SEP = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def _is_punct_or_symbol(ch: str) -> bool:
    # Unicode categories P* (punctuation) and S* (symbols: "$", "€", "+", ...), which
    # together cover everything in string.punctuation used by the SQuAD normaliser.
    return unicodedata.category(ch)[0] in ("P", "S")


def _strip_punctuation(s: str) -> str:
    out: list[str] = []
    n = len(s)
    for i, ch in enumerate(s):
        cat = unicodedata.category(ch)
        if cat == "Cf":  # zero-width and other invisible format characters
            continue
        if not _is_punct_or_symbol(ch):
            out.append(ch)
            continue
        between_digits = 0 < i < n - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()
        if ch == "." and between_digits:
            out.append(ch)  # decimal point: "3.5" must not become "35"
        elif between_digits:
            # "1-2", "3/4", "10:30": deleting the mark would fuse two numbers into one.
            out.append(" ")
        # Otherwise delete, as SQuAD does ("don't" -> "dont", "U.S." -> "us").
    return "".join(out)


def normalize_answer(s: str) -> str:
    """Canonicalise an answer string for comparison.

    Steps: drop digit-group separators ("1,026" / "1\u2009026" -> "1026"), Unicode NFKC,
    lowercase, strip punctuation and symbols (keeping decimal points between digits),
    remove the articles a/an/the, and collapse whitespace.
    """
    s = _SPACE_GROUP_SEP.sub("", s)
    s = unicodedata.normalize("NFKC", s)
    s = s.lower()
    s = _COMMA_GROUP_SEP.sub("", s)
    s = _strip_punctuation(s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_answers(answers: Sequence[str] | str) -> list[str]:
    # A bare string is a Sequence[str] of characters; treating it as one answer avoids
    # silently matching single letters.
    if isinstance(answers, str):
        return [answers]
    out = list(answers)
    if not out:
        raise ValueError("at least one reference answer is required")
    return out


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0.

    Raises ValueError if ``answers`` is empty.
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_answers(answers)))


def _f1_tokens(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # Both empty counts as agreement (e.g. correct abstention); one empty is a miss.
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD-style bag-of-tokens F1 after normalisation, maximised over references.

    Raises ValueError if ``answers`` is empty.
    """
    pred_tokens = normalize_answer(prediction).split()
    return max(_f1_tokens(pred_tokens, normalize_answer(a).split()) for a in _as_answers(answers))


def answer_in_passages(answer_or_prediction: str, passages: Sequence[str]) -> bool:
    """Whether the normalised text occurs as a contiguous token run in some passage.

    Matching is on token boundaries, so "cat" is not found inside "category". An empty
    (or all-punctuation) answer is never considered present.
    """
    needle = normalize_answer(answer_or_prediction)
    if not needle:
        return False
    if isinstance(passages, str):
        passages = [passages]
    # Normalised text is single-space separated, so padding with spaces turns substring
    # search into token-sequence search.
    padded = f" {needle} "
    return any(padded in f" {normalize_answer(p)} " for p in passages)


def faithfulness(prediction: str, passages: Sequence[str]) -> float:
    """1.0 if the prediction is supported by (found in) the passages, else 0.0."""
    return float(answer_in_passages(prediction, passages))


def is_hallucination(prediction: str, answers: Sequence[str], passages: Sequence[str]) -> bool:
    """An answer that is given, unsupported by the passages, and wrong.

    Abstentions (empty prediction) are never hallucinations. A correct answer is not a
    hallucination even when the passages do not contain it (parametric knowledge). With
    no passages (closed-book) every wrong non-empty answer is a hallucination.
    """
    if not normalize_answer(prediction):
        return False
    if exact_match(prediction, answers) == 1.0:
        return False
    return not answer_in_passages(prediction, passages)


def score_answer(prediction: str, answers: Sequence[str], passages: Sequence[str] | None) -> dict[str, float]:
    """Per-question answer scores; ``passages=None`` means closed book (no context given).

    ``faithfulness`` is NaN where it is undefined (closed book, or no answer given), so
    :func:`aggregate` averages it over answered questions that had a context only.
    """
    answered = bool(normalize_answer(prediction))
    ctx = list(passages) if passages is not None else []
    if passages is None or not answered:
        faithful = float("nan")
    else:
        faithful = faithfulness(prediction, ctx)
    return {
        "em": exact_match(prediction, answers),
        "f1": token_f1(prediction, answers),
        "answered": float(answered),
        "faithfulness": faithful,
        "hallucination": float(is_hallucination(prediction, answers, ctx)),
    }


# --------------------------------------------------------------------------- retrieval


def _gold_set(gold: Collection[str] | str) -> set[str]:
    if isinstance(gold, str):
        return {gold}
    return set(gold)


def _matches(r: str, gold_set: Collection[str]) -> list[str]:
    """Gold ids that retrieved id ``r`` satisfies, most specific first.

    ``r`` matches gold ``g`` if ``r == g`` or if the document part of ``r`` (text before
    the first '#', e.g. "doc1" in "doc1#3") equals ``g``, so gold may be given at
    passage or document granularity.
    """
    out: list[str] = []
    if r in gold_set:
        out.append(r)
    doc = r.split("#", 1)[0]
    if doc != r and doc in gold_set:
        out.append(doc)
    return out


def _hits(retrieved: Sequence[str], gold_set: set[str], k: int | None) -> list[bool]:
    # Each gold item may be credited once: a second passage from an already-hit gold
    # document is not relevant again, which keeps P@k, R@k and nDCG within [0, 1].
    top = list(retrieved) if k is None else list(retrieved)[:k]
    used: set[str] = set()
    hits: list[bool] = []
    for r in top:
        g = next((g for g in _matches(r, gold_set) if g not in used), None)
        if g is None:
            hits.append(False)
        else:
            used.add(g)
            hits.append(True)
    return hits


def _check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")


def precision_at_k(retrieved: Sequence[str], gold: Collection[str], k: int) -> float:
    """Relevant items in the top ``k`` divided by ``k`` (not by the number retrieved).

    Returns NaN when ``gold`` is empty: the query has no labels, and :func:`aggregate`
    skips it rather than counting it as a miss.
    """
    _check_k(k)
    gold_set = _gold_set(gold)
    if not gold_set:
        return float("nan")
    return sum(_hits(retrieved, gold_set, k)) / k


def recall_at_k(retrieved: Sequence[str], gold: Collection[str], k: int) -> float:
    """Distinct gold items hit in the top ``k`` divided by ``|gold|``.

    Returns NaN when ``gold`` is empty (undefined; skipped by :func:`aggregate`).
    """
    _check_k(k)
    gold_set = _gold_set(gold)
    if not gold_set:
        return float("nan")
    return sum(_hits(retrieved, gold_set, k)) / len(gold_set)


def mrr(retrieved: Sequence[str], gold: Collection[str]) -> float:
    """Reciprocal rank of the first relevant item; 0.0 if none is retrieved.

    Returns NaN when ``gold`` is empty (undefined; skipped by :func:`aggregate`).
    """
    gold_set = _gold_set(gold)
    if not gold_set:
        return float("nan")
    for rank, r in enumerate(retrieved, start=1):
        if _matches(r, gold_set):
            return 1.0 / rank
    return 0.0


def ndcg_at_k(retrieved: Sequence[str], gold: Collection[str], k: int) -> float:
    """Binary-relevance nDCG@k; the ideal ranking puts ``min(|gold|, k)`` hits first.

    Returns NaN when ``gold`` is empty (ideal DCG is zero; skipped by :func:`aggregate`).
    """
    _check_k(k)
    gold_set = _gold_set(gold)
    if not gold_set:
        return float("nan")
    dcg = sum(1.0 / math.log2(i + 2) for i, hit in enumerate(_hits(retrieved, gold_set, k)) if hit)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(gold_set), k)))
    return dcg / idcg


def answer_recall_at_k(passages: Sequence[str], answers: Sequence[str], k: int) -> float:
    """1.0 if some reference answer occurs in the top ``k`` passages' text, else 0.0.

    Needs no gold ids, so it measures retrieval on data that only has answers.
    """
    _check_k(k)
    top = list(passages)[:k]
    return float(any(answer_in_passages(a, top) for a in _as_answers(answers)))


def retrieval_scores(retrieved: Sequence[str], gold: Collection[str], ks: Iterable[int]) -> dict[str, float]:
    """precision@k, recall@k and ndcg@k for every k, and MRR over the whole ranking."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"precision@{k}"] = precision_at_k(retrieved, gold, k)
        out[f"recall@{k}"] = recall_at_k(retrieved, gold, k)
        out[f"ndcg@{k}"] = ndcg_at_k(retrieved, gold, k)
    out["mrr"] = mrr(retrieved, gold)
    return out


# --------------------------------------------------------------------------- aggregation


def _pkey(p: float) -> str:
    return f"p{p:g}"


def percentiles(values: Sequence[float], ps: Iterable[float] = (50, 95, 99)) -> dict[str, float]:
    """Percentiles (linear interpolation) and mean, keyed "p50", "p95", ..., "mean".

    NaN values are dropped; with no values left every entry is NaN.
    """
    ps = list(ps)
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        out = {_pkey(p): float("nan") for p in ps}
        out["mean"] = float("nan")
        return out
    qs = np.percentile(arr, ps, method="linear")
    out = {_pkey(p): float(q) for p, q in zip(ps, qs)}
    out["mean"] = float(arr.mean())
    return out


def aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over rows, ignoring NaN and keys missing from a row.

    Keys keep first-seen order; a key whose values are all NaN maps to NaN.
    Booleans (e.g. hallucination flags) average to rates.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            v = float(value)
            sums.setdefault(key, 0.0)
            counts.setdefault(key, 0)
            if math.isnan(v):
                continue
            sums[key] += v
            counts[key] += 1
    return {k: (sums[k] / counts[k] if counts[k] else float("nan")) for k in sums}
