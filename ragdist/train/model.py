"""The generator: any HF causal LM by path, or a small one built from config with an offline tokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ragdist.errors import ConfigError
from ragdist.train.config import ModelConfig
from ragdist.train.tokenizer import TokenizerData, bpe_tokenizer

IGNORE = -100


def load_tokenizer(cfg: ModelConfig, data: TokenizerData | None = None) -> Any:
    """The generator's tokenizer: the model's own, else `cfg.tokenizer`.

    `model.tokenizer=bpe` trains (or reuses) a BPE on `data`, which the caller must then give.
    """
    from transformers import AutoTokenizer

    src = cfg.name_or_path or cfg.tokenizer
    if src == "bpe":
        if data is None:
            raise ConfigError("model.tokenizer=bpe: the tokenizer is trained on the corpus and QA, but none were given")
        return bpe_tokenizer(data, cfg.bpe_vocab_size, cfg.bpe_cache_dir)
    if src == "minilm":
        from ragdist.embed.embedder import resolve_model_path

        src = resolve_model_path("minilm")
    if not _exists_locally(src):
        raise ConfigError(f"model path {src!r} does not exist (models are not downloaded at run time)")
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token or tok.pad_token
    return tok


def _exists_locally(src: str) -> bool:
    if Path(src).exists():
        return True
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    return True  # a hub id: the loader decides


def build_generator(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.name_or_path:
        if not _exists_locally(cfg.name_or_path):
            raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: no such local model directory")
        return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=torch.float32)
    if cfg.arch != "llama":
        raise ConfigError(f"model.arch={cfg.arch!r}: only 'llama' can be built from config; pass name_or_path")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    from transformers import LlamaConfig

    conf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(conf, dtype=torch.float32)


class AnswerLossLM(nn.Module):
    """Wraps a causal LM so that forward returns the loss on answer tokens only.

    The output projection is applied only at positions that carry a label, so the
    [batch × tokens × vocab] logits tensor is never built for the (long) passage context. With
    `fused_loss`, even the [answer tokens × vocab] logits are never built whole: a chunked
    linear + cross-entropy kernel walks them. It needs the head's whole weight, so where an engine
    keeps only a shard of it outside the head's own forward (ZeRO-3), or the head is wrapped (LoRA on
    the head), the plain path runs instead.
    """

    def __init__(self, lm: nn.Module, fused_loss: bool = True):
        super().__init__()
        self.lm = lm
        self.fused_loss = fused_loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        body = self.lm.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # position t predicts token t+1
        targets = labels[:, 1:]
        keep = targets != IGNORE
        h = hidden[:, :-1][keep]
        y = targets[keep]
        head = self.lm.get_output_embeddings()
        if h.shape[0] == 0:
            return hidden.sum() * 0.0
        if self.fused_loss and _whole_linear(head, h.shape[-1]):
            fused = _fused_kernel()
            if fused is not None:
                w = head.weight
                return fused(h.to(w.dtype), w, y, bias=head.bias).float()
        return F.cross_entropy(head(h).float(), y)


def _whole_linear(head: nn.Module, hidden_size: int) -> bool:
    if type(head) is not nn.Linear:
        return False
    w = head.weight
    # A ZeRO-3 partitioned parameter is an empty placeholder outside its module's forward; an FSDP2
    # sharded one is a DTensor. Both are refused here; FSDP2's root parameters are whole in forward.
    if hasattr(w, "ds_id") or type(w).__name__ == "DTensor":
        return False
    return w.dim() == 2 and w.shape[1] == hidden_size


def _fused_kernel() -> Any:
    try:
        from ragdist.kernels.linear_ce import linear_cross_entropy
    except ImportError:  # pragma: no cover - the kernels package ships with ragdist
        return None
    return linear_cross_entropy


def save_pretrained_atomic(
    lm: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    state_dict: dict | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """An HF model dir that appears whole or not at all; `extra_dirs` (already written) move inside it."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        lm.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, src in (extra_dirs or {}).items():
            os.rename(src, tmp / name)
        if out.exists():
            old = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for src in (extra_dirs or {}).values():
            shutil.rmtree(src, ignore_errors=True)
        raise
    return out


def load_generator(path: str | Path) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p}: not a saved model (no config.json)")
    return AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(p)
