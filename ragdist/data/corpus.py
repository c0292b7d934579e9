"""Corpus files (JSONL, gzip'd JSONL, Parquet or a `datasets` directory) → validated `Document`s → chunks.

The readers here are shared with the QA data (`data.qa`): one row iterator for every format, and
errors that name the file, the line or row, and the key at fault.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
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
            obj = _decode_line(raw, lambda lineno=lineno: f"{path}:{lineno}", lineno == 1)
            if obj is not None:
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
    ds = _open_dataset(path)
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



# ---------------------------------------------------------------------------- corpus parts
# A part is a slice of the corpus that one worker reads on its own: a byte range of a plain JSONL
# file (a line belongs to the part its first byte falls in), a line range of a gzip'd one, or a row
# range of a Parquet file or a `datasets` directory. The driver of a distributed build only ever
# sees the parts' bounds, never the documents. A part's offsets (byte offset of a plain JSONL line,
# 1-based line number of a gzip'd one, row number otherwise) name a document in later errors.


def corpus_format(path: str | Path, fmt: str = "auto") -> str:
    return detect_format(Path(path), fmt)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def _jsonl_limit(path: Path, max_docs: int) -> int:
    """Byte offset just past the `max_docs`-th non-blank line."""
    seen, pos = 0, 0
    with open(path, "rb") as fh:
        for raw in fh:
            pos += len(raw)
            if raw.strip():
                seen += 1
                if seen >= max_docs:
                    break
    return pos


def _gzip_lines(path: Path, max_docs: int | None) -> int:
    """Lines of a gzip'd JSONL file up to its `max_docs`-th non-blank one (one streaming pass)."""
    n = seen = 0
    try:
        with gzip.open(path, "rb") as fh:
            for raw in fh:
                n += 1
                if raw.strip():
                    seen += 1
                    if max_docs is not None and seen >= max_docs:
                        break
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}:{n + 1}: cannot decompress ({e})") from None
    return n


def _tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _row_count(path: Path, kind: str) -> int:
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: cannot read Parquet ({e})") from None
    return len(_open_dataset(path))


def _open_dataset(path: Path) -> Any:
    """The one split of a `datasets` directory, with the errors `read_rows` gives."""
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
    return ds


def split_corpus(path: str | Path, fmt: str = "auto", part_bytes: int = 4 << 20,
                 max_docs: int | None = None, spill_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Cut a corpus into parts of about `part_bytes`: [{"id", "start", "end", "bytes"}, ...].

    Plain JSONL parts are byte ranges (no scan of the file, unless `max_docs` asks for its first
    lines); Parquet and `datasets` parts are row ranges of about as many bytes. A gzip'd JSONL file
    cannot be entered in the middle: with `spill_dir` it is decompressed once into that directory
    (`spill_gzip`) and its parts are byte ranges of the copy (`"source"`: the copy's path), so that
    no worker decompresses more than its own part; without it, parts are line ranges (one streaming
    pass to count them, and each reader decompresses up to its part). Every document lands in
    exactly one part.
    """
    path = Path(path)
    if spill_dir is not None and detect_format(path, fmt) == "jsonl" and path.is_file() and _is_gzip(path):
        source = spill_gzip(path, spill_dir, max_docs)
        return [dict(p, source=str(source)) for p in split_corpus(source, "jsonl", part_bytes)]
    if not path.exists():
        raise DataError(f"{path}: corpus file not found")
    if part_bytes <= 0:
        raise DataError(f"part size {part_bytes} bytes: must be > 0")
    kind = detect_format(path, fmt)
    if kind == "jsonl" and not path.is_file():
        raise DataError(f"{path}: not a JSONL file")
    if kind == "parquet" and not path.is_file():
        raise DataError(f"{path}: not a Parquet file")
    if kind == "datasets" and not path.is_dir():
        raise DataError(f"{path}: not a `datasets` directory (Dataset.save_to_disk writes a directory)")
    if kind == "jsonl" and not _is_gzip(path):
        total = path.stat().st_size if max_docs is None else _jsonl_limit(path, max_docs)
        start, per_row = 0, 1.0
    elif kind == "jsonl":  # gzip'd: 1-based line numbers
        lines = _gzip_lines(path, max_docs)
        start, total = 1, lines + 1
        per_row = max(1.0, path.stat().st_size / max(lines, 1))
    else:
        rows = _row_count(path, kind)
        start, total = 0, rows if max_docs is None else min(rows, max_docs)
        per_row = max(1.0, _tree_bytes(path) / max(rows, 1))  # mean bytes per row on disk
    step = max(1, int(part_bytes / per_row))
    cuts = list(range(start, total, step)) + [total]
    return [{"id": i, "start": a, "end": b, "bytes": int(round((b - a) * per_row))}
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


SPILL_NAME = "corpus.jsonl"


def spill_gzip(path: str | Path, spill_dir: str | Path, max_docs: int | None = None) -> Path:
    """The gzip'd JSONL corpus at `path` decompressed into `spill_dir` (up to its `max_docs`-th
    document), written under a temporary name and renamed; an existing copy is complete and reused.
    Lines keep their numbers, so errors still name `path` and the line."""
    out = Path(spill_dir) / SPILL_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{SPILL_NAME}.tmp-{os.getpid()}")
    n = seen = 0
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            for raw in src:
                n += 1
                dst.write(raw)
                if raw.strip():
                    seen += 1
                    if max_docs is not None and seen >= max_docs:
                        break
    except (OSError, EOFError, zlib.error) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}:{n + 1}: cannot decompress ({e})") from None
    os.replace(tmp, out)
    return out


def line_number(path: str | Path, offset: int) -> int:
    """1-based line number of the line starting at byte `offset` (only on the error path: it reads the prefix)."""
    n = 1
    with open(path, "rb") as fh:
        left = offset
        while left > 0:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def where_in_corpus(path: str | Path, fmt: str, offset: int, source: str | Path | None = None) -> str:
    """`file:line` (JSONL) or `file: row i` (Parquet, `datasets`) for a part offset, as load_documents
    names rows; `source`: the decompressed copy that the offset (a byte offset) points into."""
    path = Path(path)
    if source is not None:
        return f"{path}:{line_number(source, offset)}"
    if corpus_format(path, fmt) == "jsonl":
        return f"{path}:{offset if _is_gzip(path) else line_number(path, offset)}"
    return f"{path}: row {offset}"


def _decode_line(raw: bytes, where: Callable[[], str], first: bool) -> dict[str, Any] | None:
    """One JSONL line → object (None for a blank line); `where()` names the line in errors.

    `first`: the file's first line, decoded as utf-8-sig: a BOM there is an encoding mark, elsewhere data.
    """
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where()}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where()}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where()}: expected a JSON object, got {type_name(obj)}")
    return obj


def _part_rows(path: Path, kind: str, start: int, end: int, columns: Sequence[str],
               required: Mapping[str, str], source: Path | None = None,
               ) -> Iterator[tuple[int, Callable[[], str], dict[str, Any]]]:  # fmt: skip
    """(offset, where, row) for the rows of one part; `where()` is computed only on an error.
    `source`: a decompressed copy of the gzip'd `path` holding the part's byte range."""
    if kind == "jsonl" and (source is not None or not _is_gzip(path)):
        with open(source or path, "rb") as fh:
            if start > 0:
                fh.seek(start - 1)
                fh.readline()  # the line in progress at `start` belongs to the previous part
            pos = fh.tell()
            while pos < end:
                raw = fh.readline()
                if not raw:
                    break
                where = lambda pos=pos: where_in_corpus(path, "jsonl", pos, source)  # noqa: E731
                obj = _decode_line(raw, where, pos == 0)
                if obj is not None:
                    if not all(k in obj for k in required):
                        _missing(where(), "key", required, list(obj))
                    yield pos, where, obj
                pos += len(raw)
        return
    if kind == "jsonl":  # gzip'd: skip to line `start`
        try:
            with gzip.open(path, "rb") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    if lineno >= end:
                        break
                    if lineno < start:
                        continue
                    where = lambda lineno=lineno: f"{path}:{lineno}"  # noqa: E731
                    obj = _decode_line(raw, where, lineno == 1)
                    if obj is not None:
                        if not all(k in obj for k in required):
                            _missing(where(), "key", required, list(obj))
                        yield lineno, where, obj
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot decompress ({e})") from None
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            _missing(str(path), "column", required, names)
            table = _parquet_rows(pf, start, end, [c for c in columns if c in names])
            rows = table.to_pylist()
        except DataError:
            raise
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: cannot read Parquet ({e})") from None
    else:
        ds = _open_dataset(path)
        _missing(str(path), "column", required, ds.column_names)
        ds = ds.select_columns([c for c in columns if c in ds.column_names]).select(range(start, end))
        rows = list(ds)
    for i, obj in enumerate(rows, start=start):
        yield i, (lambda i=i: f"{path}: row {i}"), obj


def read_part(path: str | Path, fmt: str, part: dict[str, Any],
              fields: CorpusFields | None = None) -> list[tuple[int, Document]]:
    """(offset, document) for every document of one part, validated as load_documents does."""
    path = Path(path)
    kind = detect_format(path, fmt)
    f = fields or CorpusFields()
    columns = [f.id, f.text, f.title, f.source, f.timestamp, f.meta]
    required = {f.id: "corpus.fields.id", f.text: "corpus.fields.text"}
    out: list[tuple[int, Document]] = []
    seen: dict[str, int] = {}
    source = Path(part["source"]) if part.get("source") else None
    if source is not None and not source.is_file():
        raise DataError(f"{path}: the decompressed copy {source} of this part is gone; build again")
    for off, where, obj in _part_rows(path, kind, int(part["start"]), int(part["end"]), columns, required, source):
        try:
            doc = _to_document(obj, "", f)
        except DataError:
            _to_document(obj, where(), f)  # raises again, now naming the row (which may cost a scan)
            raise
        if doc.id in seen:
            raise DataError(f"{where()}: duplicate document id {doc.id!r} "
                            f"(first at {where_in_corpus(path, kind, seen[doc.id], source)})")
        seen[doc.id] = off
        out.append((off, doc))
    return out


def _parquet_rows(pf: Any, start: int, end: int, columns: Sequence[str] | None = None) -> Any:
    """Rows [start, end) of a Parquet file, reading only the row groups that hold them."""
    import pyarrow as pa

    groups, first, row = [], None, 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < end and row + n > start:
            groups.append(g)
            first = row if first is None else first
        row += n
    if not groups:
        return pa.table({})
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first, end - start)


def chunk_documents(docs: Sequence[Document], tokenizer: Any, window: int, overlap: int,
                    token_ids: list[list[int] | None] | None = None) -> list[Chunk]:
    """Split each document into windows of `window` tokens sharing `overlap` tokens.

    Windows are cut on the embedder's own tokens so no chunk is silently truncated at
    embedding time; the text of each window is the exact character span it covers. With
    `token_ids` (a list), one entry per chunk is appended to it: the tokens (no special tokens)
    of a chunk that is its whole document, which are the tokens of its text, so the embedder can
    take them instead of tokenizing the text again; None for a window of a longer document,
    whose text, cut inside a word, may tokenize otherwise than the window's tokens.
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
            if token_ids is not None:
                token_ids.append(list(enc["input_ids"]) if len(starts) == 1 else None)
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
