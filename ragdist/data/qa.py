"""Question–answer data: JSONL rows with `question`, `answers` (list) and optional `gold_ids`."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ragdist.data.corpus import read_jsonl
from ragdist.errors import DataError


@dataclass
class DataConfig:
    # QA JSONL files; empty means the built-in dataset.
    train: str = ""
    eval: str = ""
    builtin: str = "airports"  # which built-in dataset to materialize when paths are empty: airports | elements
    builtin_dir: str = "data/builtin"  # where it is written (cached by its parameters)
    num_entities: int = 2000  # built-in: how many entities (airports, or elements: at most 118)
    eval_fraction: float = 0.15  # built-in: share of entities held out for eval
    max_train: int | None = None
    max_eval: int | None = 300
    seed: int = 0


@dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    gold_ids: list[str] = field(default_factory=list)


def _norm_q(q: str) -> str:
    q = unicodedata.normalize("NFKC", q).lower()
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", q)).strip()


def load_qa(path: str | Path, limit: int | None = None) -> list[QAExample]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: QA file not found")
    out: list[QAExample] = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        answers = obj.get("answers", obj.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise DataError(f"{where}: 'answers' must be a non-empty list of strings")
        gold = obj.get("gold_ids") or []
        if not isinstance(gold, list):
            raise DataError(f"{where}: 'gold_ids' must be a list of passage or document ids")
        out.append(QAExample(str(obj.get("id", f"{path.stem}-{lineno}")), q, answers, [str(g) for g in gold]))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no QA examples")
    return out


def check_disjoint(train: list[QAExample], evals: list[QAExample], train_path: str, eval_path: str) -> None:
    """Eval questions must never appear in training: a leak would inflate every metric."""
    seen = {_norm_q(ex.question) for ex in train}
    leaked = [ex for ex in evals if _norm_q(ex.question) in seen]
    if leaked:
        sample = "; ".join(repr(ex.question) for ex in leaked[:3])
        raise DataError(
            f"{len(leaked)} eval question(s) in {eval_path} also appear in {train_path}, e.g. {sample}"
        )
