"""Metadata filters: a small JSON-able spec, validated once, evaluated as a row mask per shard.

    {"source": "wiki"}                          equality (a list means any of)
    {"doc_id": ["a", "b"], "title": "X"}        the other row columns, likewise
    {"timestamp": [t0, t1]}                     inclusive range; None leaves a side open
    {"timestamp": {"gte": t0, "lt": t1}}        gt / gte / lt / lte
    {"tags": ["a", "b"]}                        rows whose meta["tags"] holds any of them
    {"tags": {"all": ["a", "b"]}}               … or all of them
    {"domain": "aero"}, {"meta.country": "US"}  any other key is a field of the row's meta

All clauses must hold. A row without the field (or without a timestamp) does not match.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragdist.errors import RetrievalError

COLUMNS = ("id", "doc_id", "source", "title")
_RANGE_OPS = ("gt", "gte", "lt", "lte")


def value_key(v: Any) -> str:
    """Canonical form of a scalar, so that 5 and 5.0 (JSON's same number) match."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return json.dumps(v, sort_keys=True)


def _scalar(key: str, v: Any) -> Any:
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise RetrievalError(f"filter key {key!r}: value {v!r} is not a finite number")
        return v
    raise RetrievalError(f"filter key {key!r}: value {v!r} ({type(v).__name__}) is not a string, number or bool")


def _values(key: str, v: Any) -> tuple[Any, ...]:
    vals = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if not vals:
        raise RetrievalError(f"filter key {key!r}: an empty list matches nothing")
    return tuple(_scalar(key, x) for x in vals)


def _number(key: str, op: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RetrievalError(f"filter key {key!r}: bound {op}={v!r} is not a finite number")
    return float(v)


@dataclass(frozen=True)
class Clause:
    kind: str  # in | range | tags_any | tags_all
    field: str  # a column name, or "meta.<name>"
    values: tuple[Any, ...] = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False


@dataclass(frozen=True)
class Filter:
    clauses: tuple[Clause, ...]
    key: str  # canonical JSON of the spec: equal specs share cached masks

    def to_spec(self) -> dict[str, Any]:
        return json.loads(self.key)


def compile_filter(spec: dict[str, Any] | Filter | None) -> Filter | None:
    """Validate a filter spec; errors name the key and value at fault."""
    if spec is None or isinstance(spec, Filter):
        return spec
    if not isinstance(spec, dict):
        raise RetrievalError(f"filter must be a dict of field -> condition, got {type(spec).__name__}")
    if not spec:
        return None
    clauses = []
    for key in sorted(spec):
        cond = spec[key]
        if not isinstance(key, str) or not key:
            raise RetrievalError(f"filter key {key!r} is not a field name")
        if key == "timestamp":
            clauses.append(_range_clause(key, cond))
        elif key == "tags":
            if isinstance(cond, dict):
                unknown = set(cond) - {"any", "all"}
                if unknown or len(cond) != 1:
                    raise RetrievalError(f"filter key 'tags': expected a list or {{'any'|'all': [...]}}, got {cond!r}")
                mode, vals = next(iter(cond.items()))
                clauses.append(Clause(f"tags_{mode}", "meta.tags", _values(key, vals)))
            else:
                clauses.append(Clause("tags_any", "meta.tags", _values(key, cond)))
        elif key in COLUMNS:
            clauses.append(Clause("in", key, _values(key, cond)))
        else:
            name = key[5:] if key.startswith("meta.") else key
            if not name:
                raise RetrievalError(f"filter key {key!r}: no meta field named")
            clauses.append(Clause("in", f"meta.{name}", _values(key, cond)))
    return Filter(tuple(clauses), json.dumps(spec, sort_keys=True, default=str))


def _range_clause(key: str, cond: Any) -> Clause:
    if isinstance(cond, (list, tuple)):
        if len(cond) != 2:
            raise RetrievalError(f"filter key {key!r}: expected [start, end], got {cond!r}")
        lo, hi = _number(key, "start", cond[0]), _number(key, "end", cond[1])
        lo_open = hi_open = False
    elif isinstance(cond, dict):
        unknown = set(cond) - set(_RANGE_OPS)
        if unknown:
            raise RetrievalError(f"filter key {key!r}: unknown bound(s) {sorted(unknown)}; use {list(_RANGE_OPS)}")
        if "gt" in cond and "gte" in cond or "lt" in cond and "lte" in cond:
            raise RetrievalError(f"filter key {key!r}: give one lower and one upper bound at most, got {cond!r}")
        lo_open, hi_open = "gt" in cond, "lt" in cond
        lo = _number(key, "gt" if lo_open else "gte", cond.get("gt", cond.get("gte")))
        hi = _number(key, "lt" if hi_open else "lte", cond.get("lt", cond.get("lte")))
    else:
        raise RetrievalError(f"filter key {key!r}: expected [start, end] or {{gte, lte, gt, lt}}, got {cond!r}")
    if lo is not None and hi is not None and lo > hi:
        raise RetrievalError(f"filter key {key!r}: empty range, start {lo} > end {hi}")
    return Clause("range", key, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


class FieldIndex:
    """Inverted indexes over a shard's rows, built per field on first use: value -> row numbers."""

    def __init__(self) -> None:
        self._index: dict[str, dict[str, np.ndarray]] = {}
        self._rows = 0

    def reset(self) -> None:
        self._index.clear()

    def rows_with(self, store: Any, field: str, values: tuple[Any, ...]) -> np.ndarray:
        if self._rows != store.n:
            self._index.clear()  # rows were appended: rebuild lazily (appends are rare next to queries)
            self._rows = store.n
        inv = self._index.get(field)
        if inv is None:
            inv = self._index[field] = self._build(store, field)
        hits = [inv[k] for k in map(value_key, values) if k in inv]
        return np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64)

    @staticmethod
    def _build(store: Any, field: str) -> dict[str, np.ndarray]:
        acc: dict[str, list[int]] = {}
        if field.startswith("meta."):
            name = field[5:]
            for i, meta in enumerate(store.metas):
                if name not in meta:
                    continue
                v = meta[name]
                items = v if (field == "meta.tags" and isinstance(v, list)) else [v]
                for item in items:
                    if isinstance(item, (dict, list)):
                        continue  # nested structures are not filterable values
                    acc.setdefault(value_key(item), []).append(i)
        else:
            for i, v in enumerate(store.column(field)):
                acc.setdefault(value_key(v), []).append(i)
        return {k: np.asarray(v, np.int64) for k, v in acc.items()}


def filter_mask(flt: Filter, store: Any, index: FieldIndex) -> np.ndarray:
    """Boolean mask over the store's rows: True where every clause holds."""
    mask = np.ones(store.n, dtype=bool)
    for c in flt.clauses:
        if c.kind == "range":
            ts = store.timestamps
            ok = ~np.isnan(ts)
            if c.lo is not None:
                ok &= (ts > c.lo) if c.lo_open else (ts >= c.lo)
            if c.hi is not None:
                ok &= (ts < c.hi) if c.hi_open else (ts <= c.hi)
            mask &= ok
        elif c.kind in ("in", "tags_any"):
            sel = np.zeros(store.n, dtype=bool)
            sel[index.rows_with(store, c.field, c.values)] = True
            mask &= sel
        elif c.kind == "tags_all":
            for v in c.values:
                sel = np.zeros(store.n, dtype=bool)
                sel[index.rows_with(store, c.field, (v,))] = True
                mask &= sel
        else:  # pragma: no cover - compile_filter only makes the kinds above
            raise RetrievalError(f"unknown filter clause {c.kind!r}")
    return mask
