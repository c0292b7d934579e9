"""Corpus files (JSONL, gzip'd JSONL, Parquet or a `datasets` directory) → validated `Document`s → chunks.

The readers here are shared with the QA data (`data.qa`): one row iterator for every format, and
errors that name the file, the line or row, and the key at fault.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragdist.data.config import FORMATS, CorpusConfig, CorpusFields  # noqa: F401 - the schema's home is data/config.py
from ragdist.errors import DataError

KNOWN_FIELDS = ("id", "text", "title", "source", "timestamp", "meta")
_GZIP_MAGIC = b"\x1f\x8b"
_BATCH_ROWS = 4096


@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    source: str = ""
    timestamp: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chunk:
    id: str  # "<doc id>#<n>"
    doc_id: str
    text: str
    title: str = ""
    source: str = ""
    timestamp: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "doc_id": self.doc_id,
            "text": self.text,
            "title": self.title,
            "source": self.source,
            "timestamp": self.timestamp,
            "meta": json.dumps(self.meta, sort_keys=True),
        }


def is_datasets_dir(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def detect_format(path: str | Path, fmt: str = "auto", key: str = "corpus.format") -> str:
    """jsonl | parquet | datasets, from `fmt` or else from the path (gzip is detected from the bytes)."""
    path = Path(path)
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"{key}={fmt!r}: expected auto, {', '.join(FORMATS)}")
        return fmt
    if path.is_dir():
        if is_datasets_dir(path):
            return "datasets"
        raise DataError(
            f"{path}: a directory but not a `datasets` save_to_disk one (no state.json or dataset_dict.json)"
        )
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the format from the extension; set {key}=jsonl|parquet|datasets")


def _open_maybe_gzip(path: Path) -> Any:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) from JSONL, gzip'd or not, with or without a UTF-8 BOM.

    Every failure names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lineno = 0
    with _open_maybe_gzip(path) as fh:
        lines = iter(fh)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
                raise DataError(f"{path}:{lineno + 1}: cannot decompress ({e})") from None
            lineno += 1
            try:
                # utf-8-sig on the first line only: a BOM there is an encoding mark, elsewhere it is data.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type_name(obj)}")
            yield lineno, obj


def _missing(where: str, what: str, required: Mapping[str, str], present: Sequence[str]) -> None:
    for col, cfg_key in required.items():
        if col not in present:
            raise DataError(
                f"{where}: no {what} {col!r} (set {cfg_key} to the one that holds it; "
                f"{what}s here: {', '.join(map(str, present))})"
            )


def _read_parquet(
    path: Path, columns: Sequence[str] | None, required: Mapping[str, str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        _missing(str(path), "column", required, names)
        wanted = [c for c in columns if c in names] if columns is not None else None
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield i, row
                i += 1
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for bad files
        raise DataError(f"{path}: cannot read Parquet ({e})") from None


def _read_datasets_dir(
    path: Path, columns: Sequence[str] | None, required: Mapping[str, str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a `datasets` directory needs the datasets package (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # missing or corrupt state/arrow files
        raise DataError(f"{path}: cannot load the `datasets` directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise DataError(
                f"{path}: a DatasetDict with splits {splits}; point the path at one split, e.g. {path / splits[0]}"
            )
        ds = ds[splits[0]]
    _missing(str(path), "column", required, ds.column_names)
    if columns is not None:
        ds = ds.select_columns([c for c in columns if c in ds.column_names])
    i = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield i, dict(zip(keys, values))
            i += 1


def read_rows(
    path: str | Path,
    fmt: str = "auto",
    columns: Sequence[str] | None = None,
    required: Mapping[str, str] | None = None,
    key: str = "corpus.format",
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield (where, number, row) from any supported format.

    `where` names the file and line ("f.jsonl:3") or row ("f.parquet: row 3", counted from 0) for
    error messages; `number` is the line or row. `columns` limits what columnar formats read (keys
    absent from the file are simply absent from the rows). `required` maps each key every row must
    have to the config key that names it, for the error when it is missing.
    """
    required = dict(required or {})
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    kind = detect_format(path, fmt, key)
    if kind == "jsonl":
        for lineno, obj in read_jsonl(path):
            _missing(f"{path}:{lineno}", "key", required, list(obj))
            yield f"{path}:{lineno}", lineno, obj
        return
    if kind == "parquet" and not path.is_file():
        raise DataError(f"{path}: not a Parquet file")
    if kind == "datasets" and not path.is_dir():
        raise DataError(f"{path}: not a `datasets` directory (Dataset.save_to_disk writes a directory)")
    read = _read_parquet if kind == "parquet" else _read_datasets_dir
    rows = read(path, columns, required)
    for i, obj in rows:
        yield f"{path}: row {i}", i, obj


def type_name(v: Any) -> str:
    """JSON's name for a value's type where there is one (null, not NoneType)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    return type(v).__name__


def wrong_type(where: str, key: str, expected: str, value: Any) -> DataError:
    return DataError(f"{where}: key {key!r}: expected {expected}, got {type_name(value)}")


def optional_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise wrong_type(where, key, "a string", v)
    return v


def id_value(v: Any, key: str, where: str) -> str:
    """Ids may be strings or integers; anything else (floats, lists, bools) is a mistake."""
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise wrong_type(where, key, "a string or an integer", v)


def _timestamp(v: Any, key: str, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, _dt.datetime):  # a Parquet/Arrow timestamp column
        return (v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)).timestamp()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise wrong_type(where, key, "a number (unix seconds)", v)


def _meta(v: Any, key: str, where: str) -> dict[str, Any]:
    if v is None or v == "":
        return {}
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise DataError(f"{where}: key {key!r}: a string that is not JSON") from None
    if not isinstance(v, dict):
        raise wrong_type(where, key, "an object", v)
    return v


def _to_document(obj: Mapping[str, Any], where: str, f: CorpusFields | None = None) -> Document:
    f = f or CorpusFields()
    raw_id = obj.get(f.id)
    if raw_id is None or raw_id == "":
        raise DataError(f"{where}: document has no id (key {f.id!r})")
    doc_id = id_value(raw_id, f.id, where)
    text = obj.get(f.text)
    if text is None:
        raise DataError(f"{where}: document {doc_id!r} has no text (key {f.text!r})")
    if not isinstance(text, str):
        raise wrong_type(where, f.text, "a string", text)
    if not text.strip():
        raise DataError(f"{where}: document {doc_id!r} has no text (key {f.text!r} is blank)")
    return Document(
        id=doc_id,
        text=text,
        title=optional_str(obj, f.title, where),
        source=optional_str(obj, f.source, where),
        timestamp=_timestamp(obj.get(f.timestamp), f.timestamp, where),
        meta=_meta(obj.get(f.meta), f.meta, where),
    )


def load_documents(
    path: str | Path, fmt: str = "auto", max_docs: int | None = None, fields: CorpusFields | None = None
) -> list[Document]:
    """Documents from a corpus file or `datasets` directory, with `fields` naming the columns."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: corpus file not found")
    f = fields or CorpusFields()
    columns = [f.id, f.text, f.title, f.source, f.timestamp, f.meta]
    docs: list[Document] = []
    seen: dict[str, str] = {}
    required = {f.id: "corpus.fields.id", f.text: "corpus.fields.text"}
    for where, _, obj in read_rows(path, fmt, columns, required):
        doc = _to_document(obj, where, f)
        if doc.id in seen:
            raise DataError(f"{where}: duplicate document id {doc.id!r} (first at {seen[doc.id]})")
        seen[doc.id] = where
        docs.append(doc)
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise DataError(f"{path}: corpus is empty")
    return docs


def chunk_documents(docs: Sequence[Document], tokenizer: Any, window: int, overlap: int) -> list[Chunk]:
    """Split each document into windows of `window` tokens sharing `overlap` tokens.

    Windows are cut on the embedder's own tokens so no chunk is silently truncated at
    embedding time; the text of each window is the exact character span it covers.
    """
    if window <= 0:
        raise DataError(f"corpus.chunk_tokens={window}: must be > 0")
    if not 0 <= overlap < window:
        raise DataError(f"corpus.chunk_overlap={overlap}: must be >= 0 and < chunk_tokens={window}")
    stride = window - overlap
    chunks: list[Chunk] = []
    for doc in docs:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(offsets)
        starts = [0] if n <= window else list(range(0, n - overlap, stride))
        for j, s in enumerate(starts):
            e = min(s + window, n)
            if n == 0:
                text = doc.text
            else:
                text = doc.text[offsets[s][0] : offsets[e - 1][1]]
            chunks.append(
                Chunk(
                    id=f"{doc.id}#{j}",
                    doc_id=doc.id,
                    text=text,
                    title=doc.title,
                    source=doc.source,
                    timestamp=doc.timestamp,
                    meta=dict(doc.meta),
                )
            )
            if e >= n:
                break
    return chunks


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_digest(path: str | Path, algo: str = "sha256") -> str:
    """`file_digest` of a file; of a directory (a `datasets` save), every file's name and digest, sorted."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, algo)
    h = hashlib.new(algo)
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_digest(p, algo)}\n".encode())
    return h.hexdigest()
