"""A second built-in dataset: the chemical elements of the `mendeleev` package (its bundled SQLite data).

Each element becomes two passages: a profile (symbol, atomic number, place in the periodic table,
atomic weight, electron configuration, then the source's own description) and a history (discovery,
origin of the name, CAS number, then the source's own sentences on where the element comes from and
what it is used for). Up to eight templated questions per element have answers that appear verbatim
in their gold passage. Train and eval are split by element, as airports are split by airport.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any

from ragdist.errors import DataError

FORMAT_VERSION = 1
# Characters of the source's free text a passage takes (whole sentences). Most passages then fit in
# one 128-token chunk of the default embedder; the facts that questions ask about come first, so they
# are in the first chunk (the gold id `<doc>#0`) even where the free text spills into a second.
TEXT_BUDGET = 300
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return re.sub(r"\s+", " ", str(value)).strip()


def _sentence(text: str) -> str:
    text = _clean(text)
    return text if not text or text[-1] in ".!?" else text + "."


def _number(x: Any) -> str:
    """A float as the source wrote it ("55.845", not "55.84500000000001"); whole numbers without ".0"."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def _within(texts: list[str], budget: int) -> str:
    """Whole sentences of `texts`, in order, while they fit in `budget` characters."""
    out: list[str] = []
    used = 0
    for text in texts:
        for sent in _SENTENCE_END.split(_clean(text)):
            sent = _sentence(sent)
            if not sent:
                continue
            if used + len(sent) + 1 > budget:
                return " ".join(out)
            out.append(sent)
            used += len(sent) + 1
    return " ".join(out)


def _elements(seed: int, n: int) -> list[dict[str, Any]]:
    from mendeleev.fetch import fetch_table

    table = fetch_table("elements")
    series = {int(r["id"]): str(r["name"]) for r in fetch_table("series").to_dict("records")}
    rows = []
    for r in sorted(table.to_dict("records"), key=lambda r: int(r["atomic_number"])):
        if not (_clean(r.get("name")) and _clean(r.get("symbol")) and _clean(r.get("electronic_configuration"))):
            continue
        r = dict(r, series=series.get(int(r["series_id"]), "") if _clean(r.get("series_id")) else "")
        rows.append(r)
    rng = random.Random(seed)
    rng.shuffle(rows)
    if n > len(rows):
        raise DataError(f"data.num_entities={n}: the element data has only {len(rows)} usable elements")
    return rows[:n]


def _weight(e: dict[str, Any]) -> str:
    # A whole-number weight is the mass number of the most stable isotope of an element with no
    # standard atomic weight: not asked about.
    w = e.get("atomic_weight")
    return "" if w is None or math.isnan(w) or float(w).is_integer() else _number(w)


def _discoverers(e: dict[str, Any]) -> str:
    who = _clean(e.get("discoverers")).rstrip(".")
    return "" if who.lower().startswith("known to the ancients") else who


def _profile(e: dict[str, Any]) -> str:
    name, z = e["name"], int(e["atomic_number"])
    where = f"period {int(e['period'])}"
    if _clean(e.get("group_id")):
        where += f", group {int(e['group_id'])}"
    among = f", among the {e['series'].lower()}" if e["series"] else ""
    facts = f"{name} (symbol {e['symbol']}) is the chemical element with atomic number {z}, in {where} of the periodic table{among}."
    weight = _weight(e)
    config = _clean(e["electronic_configuration"])
    if weight:
        facts += f" Its standard atomic weight is {weight} and its electron configuration is {config}."
    else:
        facts += f" Its electron configuration is {config}."
    desc = _within([e.get("description")], TEXT_BUDGET)
    return f"{facts} {desc}".strip()


def _history(e: dict[str, Any]) -> str:
    name = e["name"]
    who, place = _discoverers(e), _clean(e.get("discovery_location"))
    year = _clean(e.get("discovery_year")) and str(int(e["discovery_year"]))
    if who:
        found = f"{name} was discovered by {who}" + (f" in {place}" if place else "") + (f" in {year}" if year else "") + "."
    else:
        found = f"{name} was known to the ancients."
    origin = _clean(e.get("name_origin"))
    parts = [found, f"Its CAS registry number is {_clean(e['cas'])}."]
    if origin:
        parts.append(f"Origin of the name: {_sentence(origin)}")
    more = _within([e.get("sources"), e.get("uses")], TEXT_BUDGET - len(origin))
    return " ".join(parts + ([more] if more else []))


def _questions(e: dict[str, Any], profile_id: str, history_id: str) -> list[dict[str, Any]]:
    name = e["name"].lower()
    p, h = [f"{profile_id}#0"], [f"{history_id}#0"]
    qs: list[tuple[str, str, list[str]]] = [
        (f"What is the chemical symbol of {name}?", e["symbol"], p),
        (f"What is the atomic number of {name}?", str(int(e["atomic_number"])), p),
        (f"What is the electron configuration of {name}?", _clean(e["electronic_configuration"]), p),
    ]
    if _weight(e):
        qs.append((f"What is the standard atomic weight of {name}?", _weight(e), p))
    if _discoverers(e):
        qs.append((f"Who discovered {name}?", _discoverers(e), h))
        if _clean(e.get("discovery_year")):
            qs.append((f"In which year was {name} discovered?", str(int(e["discovery_year"])), h))
        if _clean(e.get("discovery_location")):
            qs.append((f"Where was {name} discovered?", _clean(e["discovery_location"]), h))
    qs.append((f"What is the CAS registry number of {name}?", _clean(e["cas"]), h))
    return [
        {"id": f"element-{e['symbol']}-q{i}", "question": q, "answers": [a], "gold_ids": gold}
        for i, (q, a, gold) in enumerate(qs)
    ]


def write_elements(out_dir: str | Path, num_entities: int, eval_fraction: float, seed: int) -> dict[str, str]:
    from ragdist.data.splits import write_splits

    entities = []
    for e in _elements(seed, num_entities):
        profile_id, history_id = f"element-{e['symbol']}", f"element-{e['symbol']}-history"
        meta = {"atomic_number": int(e["atomic_number"]), "block": _clean(e.get("block"))}
        docs = [
            {"id": profile_id, "title": e["name"], "text": _profile(e), "source": "mendeleev", "meta": meta},
            {"id": history_id, "title": f"{e['name']}: discovery, sources and uses", "text": _history(e),
             "source": "mendeleev", "meta": meta},
        ]
        entities.append((docs, _questions(e, profile_id, history_id)))
    return write_splits(out_dir, entities, eval_fraction)
