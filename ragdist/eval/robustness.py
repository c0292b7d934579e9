"""Context perturbations for the robustness checks: distractor passages and passage order.

Every perturbation is seeded per question (not per strategy), so all strategies that share a
retriever are tested on exactly the same perturbed contexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import ConfigError
from ragdist.eval import metrics as M

Passage = dict[str, Any]


def passage_text(p: Passage) -> str:
    """What the generator sees of a passage (title and text), for support checks."""
    title = p.get("title") or ""
    return f"{title}. {p.get('text', '')}" if title else str(p.get("text", ""))


def question_rng(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, salt])


def is_distractor(p: Passage, gold_ids: Sequence[str], answers: Sequence[str]) -> bool:
    """A passage that is neither a gold passage (by id or document) nor contains a reference answer."""
    pid = str(p.get("id", ""))
    gold = set(gold_ids)
    if gold and (M._matches(pid, gold) or str(p.get("doc_id", "")) in gold):
        return False
    return not any(M.answer_in_passages(a, [passage_text(p)]) for a in answers)


def pick_distractors(
    ranked: Sequence[Passage],
    top_k: int,
    n: int,
    *,
    gold_ids: Sequence[str],
    answers: Sequence[str],
    source: str,
    pool: Sequence[Passage] = (),
    rng: np.random.Generator,
) -> list[Passage]:
    """`n` passages that do not answer the question.

    source="hard": the best-ranked non-answering passages below the top-k (similar, but wrong);
    source="random": passages drawn from the corpus at random.
    """
    if n <= 0:
        return []
    taken = {str(p.get("id")) for p in ranked[:top_k]}
    if source == "hard":
        cands = [p for p in ranked[top_k:] if str(p.get("id")) not in taken]
        cands = [p for p in cands if is_distractor(p, gold_ids, answers)]
        return cands[:n]
    if source == "random":
        if not pool:
            raise ConfigError("eval.distractor_source=random needs corpus passages, but the pool is empty")
        out: list[Passage] = []
        # Bounded: a pool where almost everything answers the question simply yields fewer distractors.
        for j in rng.permutation(len(pool))[: 20 * n + 20]:
            p = pool[int(j)]
            if str(p.get("id")) not in taken and is_distractor(p, gold_ids, answers):
                out.append(p)
                taken.add(str(p.get("id")))
                if len(out) == n:
                    break
        return out
    raise ConfigError(f"eval.distractor_source={source!r}: expected 'hard' or 'random'")


def insert_at_random(
    passages: Sequence[Passage], extra: Sequence[Passage], rng: np.random.Generator
) -> list[Passage]:
    """The retrieved passages in their order, with each distractor put at a random position."""
    out = list(passages)
    for p in extra:
        out.insert(int(rng.integers(0, len(out) + 1)), p)
    return out


def reorder(passages: Sequence[Passage], mode: str, rng: np.random.Generator | None = None) -> list[Passage]:
    if mode == "reversed":
        return list(reversed(passages))
    if mode == "shuffled":
        if rng is None:
            raise ValueError("shuffled order needs an rng")
        return [passages[int(i)] for i in rng.permutation(len(passages))]
    raise ValueError(f"unknown order {mode!r} (reversed | shuffled)")


def load_passage_pool(snapshot: str | Path, limit: int = 20_000, seed: int = 0) -> list[Passage]:
    """Up to `limit` passages of a snapshot (checksummed), for random distractors."""
    import pyarrow.parquet as pq

    from ragdist.index.snapshot import read_manifest, verify_file

    manifest = read_manifest(snapshot)
    rows: list[Passage] = []
    for info in manifest["shards"]:
        table = pq.read_table(
            verify_file(snapshot, manifest, info["meta"]), columns=["id", "doc_id", "title", "text"]
        )
        cols = table.to_pydict()
        rows += [
            {
                "id": cols["id"][i],
                "doc_id": cols["doc_id"][i],
                "title": cols["title"][i],
                "text": cols["text"][i],
            }
            for i in range(table.num_rows)
        ]
        if len(rows) >= 4 * limit:
            break
    if len(rows) > limit:
        keep = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
        rows = [rows[int(i)] for i in sorted(keep)]
    return rows
