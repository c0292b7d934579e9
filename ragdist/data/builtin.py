"""The built-in datasets: `airports` (here) and `elements` (ragdist/data/elements.py), as passages and QA.

Each airport becomes one passage; questions about its codes, city and elevation have answers that
appear verbatim in that passage. Train and eval are split by airport, so an eval question is about
an airport whose answers the model never saw during training: a closed-book model can only guess.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from ragdist.data import elements
from ragdist.data.qa import DataConfig
from ragdist.data.splits import write_splits
from ragdist.errors import DataError

FORMAT_VERSION = 1


def _airports(seed: int, n: int) -> list[dict]:
    import airportsdata

    rows = []
    names = set()
    for code, a in sorted(airportsdata.load("IATA").items()):
        name, city = (a.get("name") or "").strip(), (a.get("city") or "").strip()
        if not (code and a.get("icao") and name and city) or name in names:
            continue
        names.add(name)
        rows.append(dict(a, iata=code, name=name, city=city))
    rng = random.Random(seed)
    rng.shuffle(rows)
    if n > len(rows):
        raise DataError(f"data.num_entities={n}: the airport data has only {len(rows)} usable airports")
    return rows[:n]


def _passage(a: dict) -> str:
    place = ", ".join(p for p in (a["city"], a.get("subd") or "", a.get("country") or "") if p)
    elev = int(round(float(a.get("elevation") or 0)))
    return (
        f"{a['name']} is an airport serving {place}. Its IATA code is {a['iata']} and its ICAO code is "
        f"{a['icao']}. The airport lies at an elevation of {elev} feet in the {a.get('tz') or 'UTC'} time zone."
    )


def _questions(a: dict, doc_id: str) -> list[dict]:
    elev = str(int(round(float(a.get("elevation") or 0))))
    gold = [f"{doc_id}#0"]
    qs = [
        (f"What is the IATA code of {a['name']}?", a["iata"]),
        (f"What is the ICAO code of {a['name']}?", a["icao"]),
        (f"Which city does {a['name']} serve?", a["city"]),
        (f"What is the elevation of {a['name']} in feet?", elev),
    ]
    return [
        {"id": f"{doc_id}-q{i}", "question": q, "answers": [ans], "gold_ids": gold}
        for i, (q, ans) in enumerate(qs)
    ]


def write_airports(out_dir: str | Path, num_entities: int, eval_fraction: float, seed: int) -> dict[str, str]:
    if not 0 < eval_fraction < 1:
        raise DataError(f"data.eval_fraction={eval_fraction}: must be between 0 and 1")
    entities = []
    for a in _airports(seed, num_entities):
        doc_id = f"airport-{a['iata']}"
        doc = {
            "id": doc_id,
            "title": a["name"],
            "text": _passage(a),
            "source": "airportsdata",
            "meta": {"country": a.get("country") or "", "tz": a.get("tz") or ""},
        }
        entities.append(([doc], _questions(a, doc_id)))
    return write_splits(out_dir, entities, eval_fraction)


# name -> (format version, writer): a change to what a writer produces bumps its version, so the
# files cached under data.builtin_dir for the old format are not reused.
BUILTINS: dict[str, tuple[int, Callable[..., dict[str, str]]]] = {
    "airports": (FORMAT_VERSION, write_airports),
    "elements": (elements.FORMAT_VERSION, elements.write_elements),
}


def materialize(cfg: DataConfig) -> dict[str, str]:
    """Write (or reuse) the built-in dataset for these parameters; return its file paths."""
    if cfg.builtin not in BUILTINS:
        raise DataError(f"data.builtin={cfg.builtin!r}: the built-in datasets are {', '.join(sorted(BUILTINS))}")
    version, write = BUILTINS[cfg.builtin]
    tag = f"{cfg.builtin}-v{version}-n{cfg.num_entities}-e{cfg.eval_fraction}-s{cfg.seed}"
    out = Path(cfg.builtin_dir) / tag
    paths = {k: str(out / f"{k}.jsonl") for k in ("corpus", "train", "eval")}
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    return write(out, cfg.num_entities, cfg.eval_fraction, cfg.seed)
