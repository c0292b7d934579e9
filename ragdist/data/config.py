"""The `corpus` and `data` groups' schemas: the corpus file and its chunking, the QA files and built-in data.

    ragdist-train corpus.path=my/corpus.jsonl corpus.fields.text=body data.train=my/train.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ragdist.utils.validate import at_least, one_of, require

#: Formats the readers know, besides "auto" (from the extension).
FORMATS = ("jsonl", "parquet", "datasets")


@dataclass
class CorpusFields:
    """The key (JSONL) or column (Parquet, datasets) that holds each document field."""

    id: str = "id"
    text: str = "text"
    title: str = "title"
    source: str = "source"
    timestamp: str = "timestamp"
    meta: str = "meta"


@dataclass
class CorpusConfig:
    # .jsonl / .jsonl.gz / .parquet file or a `datasets` save_to_disk directory; empty = the built-in data.
    path: str = ""
    format: str = "auto"  # auto (from the extension) | jsonl | parquet | datasets
    fields: CorpusFields = field(default_factory=CorpusFields)
    chunk_tokens: int = 128  # window length in embedder tokens
    chunk_overlap: int = 32  # tokens shared by consecutive windows
    max_docs: int | None = None

    def __post_init__(self) -> None:
        one_of("corpus.format", self.format, ("auto", *FORMATS))
        at_least("corpus.chunk_tokens", self.chunk_tokens, 1)
        require(0 <= self.chunk_overlap < self.chunk_tokens,
                f"corpus.chunk_overlap={self.chunk_overlap}: must be >= 0 and < chunk_tokens={self.chunk_tokens}")
        at_least("corpus.max_docs", self.max_docs, 1)


@dataclass
class QAFields:
    """The key (JSONL) or column (Parquet, datasets) that holds each QA field."""

    id: str = "id"
    question: str = "question"
    answers: str = "answers"  # with the default name, a singular `answer` key is read too
    gold_ids: str = "gold_ids"


@dataclass
class DataConfig:
    # QA files (.jsonl / .jsonl.gz / .parquet / a `datasets` directory); empty means the built-in dataset.
    train: str = ""
    eval: str = ""
    format: str = "auto"  # auto (from the extension) | jsonl | parquet | datasets
    fields: QAFields = field(default_factory=QAFields)
    builtin: str = "airports"  # which built-in dataset to materialize when paths are empty: airports | elements
    builtin_dir: str = "data/builtin"  # where it is written (cached by its parameters)
    num_entities: int = 2000  # built-in: how many entities (airports, or elements: at most 118)
    eval_fraction: float = 0.15  # built-in: share of entities held out for eval
    max_train: int | None = None
    max_eval: int | None = 300
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("data.format", self.format, ("auto", *FORMATS))
        at_least("data.num_entities", self.num_entities, 1)
        require(0 < self.eval_fraction < 1, f"data.eval_fraction={self.eval_fraction}: must be between 0 and 1")
        at_least("data.max_train", self.max_train, 1)
        at_least("data.max_eval", self.max_eval, 1)
