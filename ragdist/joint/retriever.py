"""The trainable retriever of joint training: query and passage encoders built from the index's embedder.

Both encoders read text exactly the way the embedder that built the index does (a BERT-style encoder,
mean over real tokens, L2-normalized), so the frozen passage encoder reproduces the index's vectors and
the query encoder starts where plain retrieval is. The retriever is small (MiniLM: 22M parameters) and
lives outside the generator's DeepSpeed/FSDP engine, replicated on every rank; its gradients are
all-reduced over the default process group so the replicas stay identical.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ragdist.errors import ConfigError
from ragdist.utils.cache import LRU

PASSAGE_FORMAT = "{text}"  # what the index embedded: the chunk text (see recipes/common.build_or_reuse_index)


def encoder_dir(path: str) -> str:
    """The HF model directory inside a sentence-transformers folder, refusing poolings we do not reproduce."""
    p = Path(path)
    modules = p / "modules.json"
    if not modules.is_file():
        return str(p)  # a plain HF encoder: read with mean pooling, as the `hf` embedder kind does
    try:
        mods = json.loads(modules.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{modules}: not valid JSON ({e})") from None
    transformer = next((m for m in mods if m.get("type", "").endswith("models.Transformer")), None)
    if transformer is None:
        raise ConfigError(f"{modules}: no Transformer module; joint training needs a BERT-style encoder")
    for m in mods:
        if m.get("type", "").endswith("models.Pooling"):
            pool = json.loads((p / m["path"] / "config.json").read_text())
            if not pool.get("pooling_mode_mean_tokens") or any(
                pool.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
            ):
                raise ConfigError(
                    f"{p / m['path'] / 'config.json'}: joint training reproduces mean pooling only, this encoder pools "
                    "otherwise; its trained query encoder would not match the index"
                )
    return str(p / transformer.get("path", ""))


class MeanPoolEncoder(nn.Module):
    """Text → L2-normalized mean-pooled vectors, differentiable. Dropout stays off: the vectors that
    retrieve and the vectors that are trained are the same function."""

    def __init__(self, path: str, max_length: int = 256):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            self.model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:  # an architecture without a pooler argument
            self.model = AutoModel.from_pretrained(path)
        self.model.eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> MeanPoolEncoder:  # noqa: ARG002 - dropout off by design
        return super().train(False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """Tokenized text → vectors (what `forward` does after tokenizing; a batch built ahead calls it)."""
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(v.float(), dim=-1)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.embed(**self.tokenize(texts))

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = [self(texts[i : i + batch_size]).cpu().numpy() for i in range(0, len(texts), batch_size)]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def weights(self) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the weights, taken now (training may move on while it is written)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Buffers such as position_ids may be absent from a saved state; parameters may not.
        params = {n for n, _ in self.model.named_parameters()}
        if [k for k in missing if k in params] or unexpected:
            raise ConfigError(f"encoder weights do not fit {self.path}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file (never a pickle), written to a temp name and renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata or {})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors weights file ({e})") from None


class JointRetriever(nn.Module):
    """Query encoder (trained) and passage encoder (trained with side=both, else frozen = the index's)."""

    def __init__(self, path: str, side: str, *, max_length: int = 256, cache_size: int = 100_000):
        super().__init__()
        if side not in ("query", "both"):
            raise ConfigError(f"joint.side={side!r}: expected 'query' or 'both'")
        self.side = side
        self.query = MeanPoolEncoder(path, max_length)
        self.passage = MeanPoolEncoder(path, max_length)
        if side == "query":
            self.passage.requires_grad_(False)
        # side=query: the passage encoder never changes, so a passage's vector is computed once.
        self._cache = LRU(cache_size)
        self.cache_size = cache_size

    def cache_state(self) -> dict[str, Any] | None:
        """The side=query passage-vector cache, in insertion order (None when there is none)."""
        if self.side != "query":
            return None
        entries = self._cache.items()
        keys = [k for k, _ in entries]
        return {"keys": keys, "vectors": torch.stack([v for _, v in entries]) if entries else torch.zeros(0)}

    def load_cache_state(self, state: dict[str, Any]) -> None:
        self._cache.clear()
        for k, v in zip(state["keys"], state["vectors"]):
            self._cache.put(k, v)

    def perturb_query(self, noise: float, seed: int) -> None:
        """Gaussian noise of `noise` × each weight matrix's own std: a deliberately weakened starting
        query encoder, to measure what joint training recovers. Same seed → same weights on every rank."""
        if noise <= 0:
            return
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.query.model.named_parameters():
                if p.dim() < 2 or "embeddings" in name:
                    continue
                p.add_(torch.randn(p.shape, generator=g) * float(p.std()) * noise)

    def load_trained(self, run_dir: str | Path) -> None:
        """Start from the encoders a run saved: `<run>/retriever` and, side=both, `<run>/passage_encoder`."""
        run_dir = Path(run_dir)
        dirs = [(self.query, run_dir / "retriever")] + ([(self.passage, run_dir / "passage_encoder")] if self.side == "both" else [])
        for enc, d in dirs:
            if not (d / "config.json").is_file():
                raise ConfigError(f"{d}: no saved encoder to start from (joint.side={self.side})")
            enc.load_weights(MeanPoolEncoder(str(d), enc.max_length).weights())

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def passage_vectors(self, passages: Sequence[dict[str, Any]], *, grad: bool) -> torch.Tensor:
        texts = [PASSAGE_FORMAT.format(**p) for p in passages]
        if self.side == "both":
            if grad:
                return self.passage(texts)
            with torch.no_grad():
                return self.passage(texts)
        keys = [str(p.get("id", t)) for p, t in zip(passages, texts)]
        got = [self._cache.get(k) for k in keys]
        todo = [i for i, v in enumerate(got) if v is None]
        if todo:
            with torch.no_grad():
                vecs = self.passage([texts[i] for i in todo])
            for i, v in zip(todo, vecs):
                got[i] = v
                self._cache.put(keys[i], v)
        return torch.stack(got)

    def scores(self, questions: Sequence[str], passages: Sequence[Sequence[dict[str, Any]]],
               q: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) inner products, with gradient into the query (and, side=both, passage) encoder.

        `q`: the questions' vectors if already computed with gradient (the loop searches with them too)."""
        k = len(passages[0])
        if any(len(ps) != k for ps in passages):
            raise ValueError("every question needs the same number of passages")
        if q is None:
            q = self.query(list(questions))
        flat = [p for ps in passages for p in ps]
        p = self.passage_vectors(flat, grad=True).view(len(questions), k, -1)
        return torch.einsum("bd,bkd->bk", q, p)


class RetrieverOptimizer:
    """The retriever's own AdamW, learning rate and schedule; gradients averaged over ranks first."""

    def __init__(self, params: list[nn.Parameter], *, lr: float, weight_decay: float, grad_clip: float,
                 schedule: Callable[[int], float]):
        self.params = params
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule) if self.opt else None
        self.last_grad_norm = 0.0

    def all_reduce_grads(self) -> None:
        """One flat all-reduce for the whole encoder (many small ones would each pay gloo's latency)."""
        if not self.params:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            offset = 0
            for p in self.params:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p))
                offset += n

    def step(self) -> float:
        if self.opt is None:
            return 0.0
        self.all_reduce_grads()
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))
        self.last_grad_norm = float(norm)
        if math.isfinite(self.last_grad_norm):
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return self.last_grad_norm

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"]) if self.opt else 0.0
