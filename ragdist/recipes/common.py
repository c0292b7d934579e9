"""Steps shared by the recipes: data resolution, the index snapshot, the CLI wrapper."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ragdist.config import as_object
from ragdist.data import builtin
from ragdist.data.corpus import CorpusFields, path_digest
from ragdist.data.qa import QAExample, check_disjoint, load_qa
from ragdist.errors import DataError, IndexError_, RagdistError
from ragdist.index import snapshot as snap

log = logging.getLogger("ragdist")


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("faiss", "faiss.loader", "httpx", "urllib3", "filelock", "ray", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_data_paths(cfg: DictConfig) -> None:
    """Fill corpus.path / data.train / data.eval, materializing the built-in dataset if any is empty."""
    if cfg.corpus.path and cfg.data.train and cfg.data.eval:
        return
    paths = builtin.materialize(as_object(cfg.data))
    if not cfg.corpus.path:
        cfg.corpus.path = paths["corpus"]
    if not cfg.data.train:
        cfg.data.train = paths["train"]
    if not cfg.data.eval:
        cfg.data.eval = paths["eval"]


def tokenizer_data(cfg: DictConfig) -> Any:
    """What `model.tokenizer=bpe` trains on: the corpus and the training QA (never the eval QA)."""
    from ragdist.train.tokenizer import TokenizerData

    return TokenizerData(corpus=cfg.corpus.path, qa=[cfg.data.train], corpus_format=cfg.corpus.format,
                         corpus_fields=as_object(cfg.corpus.fields), qa_format=cfg.data.format,
                         qa_fields=as_object(cfg.data.fields))  # fmt: skip


def load_qa_file(cfg: DictConfig, path: str, limit: int | None = None) -> list[QAExample]:
    """A QA file read with the run's data.format and data.fields."""
    return load_qa(path, limit, fmt=cfg.data.format, fields=as_object(cfg.data.fields))


def load_qa_splits(cfg: DictConfig) -> tuple[list[QAExample], list[QAExample]]:
    train = load_qa_file(cfg, cfg.data.train, cfg.data.max_train)
    evals = load_qa_file(cfg, cfg.data.eval, cfg.data.max_eval)
    check_disjoint(train, evals, cfg.data.train, cfg.data.eval)
    return train, evals


def index_key(cfg: DictConfig, embedder_name: str) -> str:
    """Identity of a snapshot's inputs: same key, same snapshot (reused unless index.rebuild)."""
    parts = {
        "corpus": path_digest(cfg.corpus.path),
        "chunk": [cfg.corpus.chunk_tokens, cfg.corpus.chunk_overlap, cfg.corpus.max_docs],
        "embedder": embedder_name,
        "index": [cfg.index.factory, cfg.index.metric, cfg.index.num_shards, cfg.index.sharding, cfg.index.seed],
    }
    fields = OmegaConf.to_container(cfg.corpus.fields)
    if fields != dataclasses.asdict(CorpusFields()):
        # Only a non-default mapping enters the key, so snapshots built before it existed stay reusable.
        parts["fields"] = fields
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def find_snapshot(root: str, key: str) -> Path | None:
    for version in reversed(snap.list_versions(root)):
        try:
            m = snap.read_manifest(Path(root) / version)
        except IndexError_:
            continue
        if m.get("key") == key:
            return Path(root) / version
    return None


def build_or_reuse_index(cfg: DictConfig, embedder: Any | None = None) -> Path:
    """The snapshot to serve: index.snapshot if given, else one matching the inputs, else a new build."""
    from ragdist.embed import embedder_name
    from ragdist.index.pipeline import build_index
    from ragdist.retrieval.cluster import init_ray

    if cfg.index.snapshot:
        path = snap.resolve(cfg.index.snapshot)
        snap.read_manifest(path)
        return path
    if not Path(cfg.corpus.path).exists():
        raise DataError(f"{cfg.corpus.path}: corpus file not found")
    name = embedder_name(as_object(cfg.embedder))
    if embedder is not None and embedder.name != name:
        raise IndexError_(
            f"index build: the corpus is embedded with the configured embedder ({name}), not with {embedder.name}; "
            "give index.snapshot= an index built with that encoder"
        )
    key = index_key(cfg, name)
    if not cfg.index.rebuild:
        found = find_snapshot(cfg.index.root, key)
        if found is not None:
            log.info("index: reusing snapshot %s", found)
            return found
    init_ray(cfg.retrieval.address or None, num_cpus=cfg.retrieval.ray_num_cpus, namespace=cfg.retrieval.namespace)
    built = build_index(
        as_object(cfg.corpus),
        as_object(cfg.index),
        as_object(cfg.embedder),
        key=key,
        extra={
            "corpus": {"path": str(cfg.corpus.path)},
            "chunking": {"tokens": cfg.corpus.chunk_tokens, "overlap": cfg.corpus.chunk_overlap},
        },
    )
    path = built.snapshot
    log.info("index: %d documents → %d chunks with %s in %.1fs (%d worker(s), %.0f chunks/s)", built.documents,
             built.chunks, name, built.total_s, built.workers, built.embed_chunks_per_s)
    log.info("index: wrote snapshot %s", path)
    return path


def check_embedder_matches(manifest: dict[str, Any], embedder: Any) -> None:
    if int(manifest["dim"]) != int(embedder.dim):
        raise IndexError_(
            f"snapshot {manifest.get('version')} has dim {manifest['dim']} but embedder {embedder.name} gives "
            f"{embedder.dim}: rebuild the index with this embedder"
        )


def cli(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Bad input ends the program with one clear line and exit status 2, no traceback."""

    def wrapped(cfg: DictConfig) -> Any:
        from ragdist.config import check

        try:
            check(cfg)  # every key known and every value valid, before anything starts
            return fn(cfg)
        except RagdistError as e:
            print(f"ragdist: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def dump_config(cfg: DictConfig, path: Path) -> None:
    snap.atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
