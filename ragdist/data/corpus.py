"""Corpus files (JSONL or Parquet, one document per row) → validated `Document`s → token-window chunks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragdist.errors import DataError

KNOWN_FIELDS = ("id", "text", "title", "source", "timestamp", "meta")


@dataclass
class CorpusConfig:
    # JSONL or Parquet file; empty means the built-in dataset (see `data.builtin`).
    path: str = ""
    format: str = "auto"  # auto | jsonl | parquet
    chunk_tokens: int = 128  # window length in embedder tokens
    chunk_overlap: int = 32  # tokens shared by consecutive windows
    max_docs: int | None = None


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


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ("jsonl", "parquet"):
            raise DataError(f"corpus.format={fmt!r}: expected auto, jsonl or parquet")
        return fmt
    if path.suffix in (".parquet", ".pq"):
        return "parquet"
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the format from the extension; set corpus.format=jsonl|parquet")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object); every failure names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            obj = _parse_line(raw, lambda lineno=lineno: f"{path}:{lineno}")
            if obj is not None:
                yield lineno, obj


def _parse_line(raw: bytes, where: Callable[[], str]) -> dict[str, Any] | None:
    """One JSONL line → object (None for a blank line); `where()` names the line in errors."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where()}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where()}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where()}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _name(where: str | Callable[[], str]) -> str:
    return where() if callable(where) else where


def _to_document(obj: dict[str, Any], where: str | Callable[[], str]) -> Document:
    """A validated Document; `where` (or `where()`, computed only on error) names the row."""
    if "id" not in obj or obj["id"] in (None, ""):
        raise DataError(f"{_name(where)}: document has no 'id'")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{_name(where)}: document {obj['id']!r} has no text")
    meta = obj.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta else {}
        except json.JSONDecodeError:
            raise DataError(f"{_name(where)}: 'meta' of document {obj['id']!r} is not a JSON object") from None
    if not isinstance(meta, dict):
        raise DataError(f"{_name(where)}: 'meta' of document {obj['id']!r} must be an object")
    ts = obj.get("timestamp")
    if ts is not None and not isinstance(ts, (int, float)):
        raise DataError(f"{_name(where)}: 'timestamp' of document {obj['id']!r} must be a number (unix seconds)")
    return Document(
        id=str(obj["id"]),
        text=text,
        title=str(obj.get("title") or ""),
        source=str(obj.get("source") or ""),
        timestamp=float(ts) if ts is not None else None,
        meta=meta,
    )


def load_documents(path: str | Path, fmt: str = "auto", max_docs: int | None = None) -> list[Document]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: corpus file not found")
    kind = _detect_format(path, fmt)
    docs: list[Document] = []
    seen: dict[str, str] = {}
    if kind == "jsonl":
        rows = ((f"{path}:{ln}", obj) for ln, obj in read_jsonl(path))
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: cannot read Parquet ({e})") from None
        rows = ((f"{path}: row {i}", obj) for i, obj in enumerate(table.to_pylist()))
    for where, obj in rows:
        doc = _to_document(obj, where)
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
# A part is a slice of the corpus file that one worker reads on its own: a byte range of a JSONL
# file (a line belongs to the part its first byte falls in) or a row range of a Parquet file. The
# driver of a distributed build only ever sees the parts' bounds, never the documents.


def corpus_format(path: str | Path, fmt: str = "auto") -> str:
    return _detect_format(Path(path), fmt)


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


def split_corpus(path: str | Path, fmt: str = "auto", part_bytes: int = 4 << 20,
                 max_docs: int | None = None) -> list[dict[str, Any]]:
    """Cut a corpus file into parts of about `part_bytes`: [{"id", "start", "end", "bytes"}, ...].

    JSONL parts are byte ranges (no scan of the file, unless `max_docs` asks for its first lines);
    Parquet parts are row ranges of about as many bytes. Every document lands in exactly one part.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found")
    if part_bytes <= 0:
        raise DataError(f"part size {part_bytes} bytes: must be > 0")
    kind = _detect_format(path, fmt)
    if kind == "jsonl":
        total = path.stat().st_size if max_docs is None else _jsonl_limit(path, max_docs)
        per_row = 1.0
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: cannot read Parquet ({e})") from None
        total = rows if max_docs is None else min(rows, max_docs)
        per_row = max(1.0, path.stat().st_size / max(rows, 1))  # mean bytes per row on disk
    step = max(1, int(part_bytes / per_row))
    cuts = list(range(0, total, step)) + [total]
    return [{"id": i, "start": a, "end": b, "bytes": int(round((b - a) * per_row))}
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


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


def where_in_corpus(path: str | Path, fmt: str, offset: int) -> str:
    """`file:line` (JSONL, offset in bytes) or `file: row i` (Parquet), as load_documents names rows."""
    if corpus_format(path, fmt) == "jsonl":
        return f"{path}:{line_number(path, offset)}"
    return f"{path}: row {offset}"


def read_part(path: str | Path, fmt: str, part: dict[str, Any]) -> list[tuple[int, Document]]:
    """(offset, document) for every document of one part, validated as load_documents does.

    Offsets (byte offset of the line, or row number) name a document in later errors, e.g. a
    duplicate id found only when all parts are done.
    """
    path = Path(path)
    kind = _detect_format(path, fmt)
    start, end = int(part["start"]), int(part["end"])
    out: list[tuple[int, Document]] = []
    if kind == "jsonl":
        with open(path, "rb") as fh:
            if start > 0:
                fh.seek(start - 1)
                fh.readline()  # the line in progress at `start` belongs to the previous part
            pos = fh.tell()
            while pos < end:
                raw = fh.readline()
                if not raw:
                    break
                obj = _parse_line(raw, lambda pos=pos: where_in_corpus(path, "jsonl", pos))
                if obj is not None:
                    out.append((pos, _to_document(obj, lambda pos=pos: where_in_corpus(path, "jsonl", pos))))
                pos += len(raw)
    else:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            table = _parquet_rows(pf, start, end)
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: cannot read Parquet ({e})") from None
        for i, obj in enumerate(table.to_pylist(), start=start):
            out.append((i, _to_document(obj, f"{path}: row {i}")))
    seen: dict[str, int] = {}
    for off, doc in out:
        if doc.id in seen:
            raise DataError(f"{where_in_corpus(path, kind, off)}: duplicate document id {doc.id!r} "
                            f"(first at {where_in_corpus(path, kind, seen[doc.id])})")
        seen[doc.id] = off
    return out


def _parquet_rows(pf: Any, start: int, end: int) -> Any:
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
    table = pf.read_row_groups(groups)
    return table.slice(start - first, end - start)


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
