"""Writing a built-in dataset's files: passages and questions per entity, split by entity."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ragdist.errors import DataError


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_splits(
    out_dir: str | Path, entities: list[tuple[list[dict], list[dict]]], eval_fraction: float
) -> dict[str, str]:
    """corpus.jsonl + train.jsonl + eval.jsonl from (passages, questions) per entity, in the order given.

    The first `eval_fraction` of the entities go to eval, the rest to train: no entity has questions
    on both sides, so an eval answer was never a training target.
    """
    if not 0 < eval_fraction < 1:
        raise DataError(f"data.eval_fraction={eval_fraction}: must be between 0 and 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_eval = max(1, int(round(len(entities) * eval_fraction)))
    corpus, train, evals = [], [], []
    for i, (docs, questions) in enumerate(entities):
        corpus.extend(docs)
        (evals if i < n_eval else train).extend(questions)
    paths = {"corpus": out / "corpus.jsonl", "train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    for key, rows in (("corpus", corpus), ("train", train), ("eval", evals)):
        _write_jsonl(paths[key], rows)
    return {k: str(v) for k, v in paths.items()}
