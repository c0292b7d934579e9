"""Corpus files (JSONL or Parquet, one document per row) → validated `Document`s → token-window chunks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
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
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _to_document(obj: dict[str, Any], where: str) -> Document:
    if "id" not in obj or obj["id"] in (None, ""):
        raise DataError(f"{where}: document has no 'id'")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: document {obj['id']!r} has no text")
    meta = obj.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta else {}
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'meta' of document {obj['id']!r} is not a JSON object") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: 'meta' of document {obj['id']!r} must be an object")
    ts = obj.get("timestamp")
    if ts is not None and not isinstance(ts, (int, float)):
        raise DataError(f"{where}: 'timestamp' of document {obj['id']!r} must be a number (unix seconds)")
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
