"""Question–answer data: rows with `question`, `answers` (list) and optional `gold_ids`.

Read from the same formats as the corpus (JSONL, gzip'd JSONL, Parquet, a `datasets` directory), with
`data.fields` naming the columns when a file calls them something else.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragdist.data.config import DataConfig, QAFields  # noqa: F401 - the schema's home is data/config.py
from ragdist.data.corpus import id_value, read_rows, type_name, wrong_type
from ragdist.errors import DataError

log = logging.getLogger("ragdist.data")


@dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    gold_ids: list[str] = field(default_factory=list)


def _norm_q(q: str) -> str:
    q = unicodedata.normalize("NFKC", q).lower()
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", q)).strip()


def _stem(path: Path) -> str:
    name = path.name
    return name.split(".", 1)[0] if not path.is_dir() else name


def _string_list(v: Any, key: str, where: str, what: str, *, ids: bool = False) -> list[str]:
    """A string, or a list of strings (ids: integers too), as a list of strings."""
    scalar = (str, int) if ids else (str,)
    items = [v] if isinstance(v, scalar) and not isinstance(v, bool) else v
    if not isinstance(items, (list, tuple)):
        raise wrong_type(where, key, f"a list of {what}", v)
    out = []
    for j, item in enumerate(items):
        if ids:
            out.append(id_value(item, f"{key}[{j}]", where))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise DataError(f"{where}: key '{key}[{j}]': expected a string, got {type_name(item)}")
    return out


def _to_example(obj: dict[str, Any], where: str, default_id: str, f: QAFields) -> QAExample:
    q = obj.get(f.question)
    if q is None:
        raise DataError(f"{where}: no question (key {f.question!r})")
    if not isinstance(q, str):
        raise wrong_type(where, f.question, "a string", q)
    if not q.strip():
        raise DataError(f"{where}: key {f.question!r}: the question is blank")
    akey = f.answers
    if akey not in obj and akey == "answers" and "answer" in obj:
        akey = "answer"
    if obj.get(akey) is None:
        raise DataError(f"{where}: no answers (key {akey!r})")
    answers = _string_list(obj[akey], akey, where, "answer strings")
    if not answers or not all(a.strip() for a in answers):
        raise DataError(f"{where}: key {akey!r}: expected a non-empty list of non-blank answer strings")
    raw_gold = obj.get(f.gold_ids)
    gold = [] if raw_gold is None else _string_list(raw_gold, f.gold_ids, where, "passage or document ids", ids=True)
    raw_id = obj.get(f.id)
    ex_id = default_id if raw_id is None or raw_id == "" else id_value(raw_id, f.id, where)
    return QAExample(ex_id, q, answers, gold)


def load_qa(
    path: str | Path, limit: int | None = None, *, fmt: str = "auto", fields: QAFields | None = None
) -> list[QAExample]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: QA file not found")
    f = fields or QAFields()
    columns = [f.id, f.question, f.answers, f.gold_ids] + (["answer"] if f.answers == "answers" else [])
    stem = _stem(path)
    out: list[QAExample] = []
    required = {f.question: "data.fields.question"}
    for where, n, obj in read_rows(path, fmt, columns, required, key="data.format"):
        out.append(_to_example(obj, where, f"{stem}-{n}", f))
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


def check_gold_ids(examples: Sequence[QAExample], passage_ids: Iterable[str], where: str) -> int:
    """Gold ids must name passages the index holds, or recall@k measures nothing.

    A gold id matches a passage id (`doc#0`) or the document part of one (`doc`), the rule the
    retrieval metrics credit. `passage_ids` is streamed (an index may hold millions). Logs a warning
    with the count when some gold ids match nothing, raises when none match; returns the count.
    """
    gold = {g for ex in examples for g in ex.gold_ids}
    if not gold:
        return 0
    found: set[str] = set()
    for pid in passage_ids:
        pid = str(pid)
        if pid in gold:
            found.add(pid)
        doc = pid.split("#", 1)[0]
        if doc != pid and doc in gold:
            found.add(doc)
    missing = gold - found
    if not missing:
        return 0
    sample = ", ".join(repr(g) for g in sorted(missing)[:3])
    if not found:
        raise DataError(
            f"{where}: none of the {len(gold)} gold ids matches a passage or document id of the index "
            f"(e.g. {sample}): recall would be 0 whatever retrieval does; were they written for another corpus "
            "or another id column (corpus.fields.id)?"
        )
    unreachable = sum(1 for ex in examples if ex.gold_ids and not found.intersection(ex.gold_ids))
    log.warning(
        "%s: %d of %d gold ids match no passage or document id of the index (e.g. %s); "
        "%d question(s) have no gold passage the index can return",
        where, len(missing), len(gold), sample, unreachable,
    )
    return len(missing)
