"""The generator: any HF causal LM by path, or a small one built from config with an offline tokenizer."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ragdist.errors import ConfigError
from ragdist.prompts import IGNORE  # noqa: F401 - also reached through this module
from ragdist.train.config import ModelConfig
from ragdist.train.tokenizer import TokenizerData, bpe_tokenizer

log = logging.getLogger(__name__)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def attn_implementation(cfg: ModelConfig) -> str:
    """The attention kernel to build the model with: the configured one where it can run."""
    import importlib.util

    impl = cfg.attn_implementation
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={impl!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if impl == "flash_attention_2":
        missing = []
        if importlib.util.find_spec("flash_attn") is None:
            missing.append("the flash-attn package is not installed")
        if not torch.cuda.is_available():
            missing.append("there is no CUDA GPU")
        if missing:
            log.warning("model.attn_implementation=flash_attention_2: %s; using sdpa", " and ".join(missing))
            return "sdpa"
    return impl


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
    if cfg.chat_template == "none":
        tok.chat_template = None
    elif cfg.chat_template:
        tok.chat_template = read_chat_template(cfg.chat_template)
    if tok.chat_template:
        from ragdist.prompts import chat_frame

        chat_frame(tok)  # a template that cannot frame a (passages + question, answer) turn fails here
    return tok


def read_chat_template(spec: str) -> str:
    """`model.chat_template`: a template file, or the template text itself."""
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"model.chat_template={spec!r}: no such template file (give a .jinja file, the template text, "
            "'none' for plain prompts, or '' for the tokenizer's own)"
        )
    text = path.read_text()
    if "{{" not in text and "{%" not in text:
        raise ConfigError(f"model.chat_template: {path} holds no Jinja template")
    return text


def _exists_locally(src: str) -> bool:
    if Path(src).exists():
        return True
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    return True  # a hub id: the loader decides


def build_generator(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    """The generator with its weights: `name_or_path` loaded in `model.dtype`, or a seeded random
    model built from the sizes in `cfg`.

    Under an engine that partitions parameters as they are built (ZeRO-3), the engine has made
    that so before this runs; see `GeneratorBuilder`.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    dtype = torch_dtype(cfg.dtype)
    if cfg.name_or_path:
        if not _exists_locally(cfg.name_or_path):
            raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: no such local model directory")
        lm = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, attn_implementation=attn_implementation(cfg))
        return _configure(lm, cfg)
    lm = AutoModelForCausalLM.from_config(_tiny_config(cfg, tokenizer), dtype=dtype, attn_implementation=attn_implementation(cfg))
    return _configure(lm, cfg)


def _configure(lm: nn.Module, cfg: ModelConfig) -> nn.Module:
    if cfg.gradient_checkpointing:
        # Non-reentrant: gradients reach the adapters even when every input to a block is frozen (LoRA).
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name warns there
            lm.activation_checkpointing_enable(kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return lm


def _model_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    if cfg.name_or_path:
        return AutoConfig.from_pretrained(cfg.name_or_path)
    return _tiny_config(cfg, tokenizer)


def _tiny_config(cfg: ModelConfig, tokenizer: Any) -> Any:
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
    return conf


class GeneratorBuilder:
    """How an engine builds the module it trains: `builder()` gives it whole, with its weights
    (`wrap` adds adapters and the loss); `builder.on_meta()` gives the same module with no storage,
    for an engine that shards it first and then fills the shards (FSDP2, from rank 0's weights).

    `dtype` is `model.dtype`, what `trainer.precision=auto` follows.
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any, wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.wrap = wrap or (lambda lm: lm)
        self.dtype = cfg.dtype
        torch_dtype(cfg.dtype)

    @property
    def pretrained(self) -> bool:
        """Weights come from disk (a random model is built the same way on every rank instead)."""
        return bool(self.cfg.name_or_path)

    @property
    def hidden_size(self) -> int | None:
        """The model's hidden size (from its config; no weights read), which sizes ZeRO-3's buffers."""
        conf = _model_config(self.cfg, self.tokenizer)
        return getattr(conf, "hidden_size", None) or getattr(getattr(conf, "text_config", None), "hidden_size", None)

    def __call__(self) -> nn.Module:
        return self.wrap(build_generator(self.cfg, self.tokenizer))

    def on_meta(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The module's structure, parameters and buffers on the meta device, in `dtype`."""
        from transformers import AutoModelForCausalLM

        conf = _model_config(self.cfg, self.tokenizer)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation=attn_implementation(self.cfg))
            return self.wrap(_configure(lm, self.cfg))


class AnswerLossLM(nn.Module):
    """Wraps a causal LM so that forward returns the loss on answer tokens only.

    The output projection is applied only at positions that carry a label, so the
    [batch × tokens × vocab] logits tensor is never built for the (long) passage context. With
    `fused_loss`, even the [answer tokens × vocab] logits are never built whole: a chunked
    linear + cross-entropy kernel walks them. It needs the head's whole weight, so where an engine
    keeps only a shard of it outside the head's own forward (ZeRO-3), or the head is wrapped (LoRA on
    the head), the plain path runs instead.

    `prompt_loss_weight` > 0 also trains on the prompt's own tokens (passages and question). With
    `prompt_loss_norm="token"` each counts that share of an answer token (OpenAI's legacy fine-tuning
    knob of the same name; `train_on_inputs` elsewhere); with `"mean"` the prompt tokens' mean loss
    weighs that much against the answer tokens' mean, however long the prompt. A generator trained
    from random weights learns from the passages' text how to carry a span forward, which the few
    answer tokens alone teach slowly, and from the answers which span a question asks for, which a
    per-token weight drowns under the passages' many tokens; a pretrained model needs none of it (0).
    """

    def __init__(self, lm: nn.Module, fused_loss: bool = True, prompt_loss_weight: float = 0.0,
                 prompt_loss_norm: str = "token"):
        super().__init__()
        if prompt_loss_norm not in ("token", "mean"):
            raise ValueError(f"prompt_loss_norm={prompt_loss_norm!r}: expected 'token' or 'mean'")
        self.lm = lm
        self.fused_loss = fused_loss
        self.prompt_loss_weight = float(prompt_loss_weight)
        self.prompt_loss_norm = prompt_loss_norm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        body = self.lm.get_decoder()
        # no KV cache in training: the decoder would otherwise build one it never reads
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # position t predicts token t+1
        targets = labels[:, 1:]
        keep = targets != IGNORE
        answer = self._head_loss(hidden[:, :-1][keep], targets[keep], hidden)
        w = self.prompt_loss_weight
        if w <= 0:
            return answer
        prompt = (~keep) & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        n_answer, n_prompt = int(keep.sum()), int(prompt.sum())
        if n_prompt == 0:
            return answer
        prompt_loss = self._head_loss(hidden[:, :-1][prompt], input_ids[:, 1:][prompt], hidden)
        if self.prompt_loss_norm == "mean":
            if n_answer == 0:
                return prompt_loss
            return (answer + w * prompt_loss) / (1.0 + w)
        return (n_answer * answer + w * n_prompt * prompt_loss) / (n_answer + w * n_prompt)

    def _head_loss(self, h: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the output head at hidden states `h` against targets `y`."""
        head = self.lm.get_output_embeddings()
        if h.shape[0] == 0:
            return hidden.sum() * 0.0
        # Gemma-2 style models squash their logits (tanh soft-capping) before the softmax.
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if self.fused_loss and not cap and _whole_linear(head, h.shape[-1]):
            fused = _fused_kernel()
            if fused is not None:
                w = head.weight
                return fused(h.to(w.dtype), w, y, bias=head.bias).float()
        logits = head(h).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return F.cross_entropy(logits, y)


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


def load_generator(path: str | Path, dtype: str = "fp32", attn: str = "sdpa") -> tuple[nn.Module, Any]:
    """A saved generator and its tokenizer (which carries the chat template it was trained with)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p}: not a saved model (no config.json)")
    impl = attn_implementation(ModelConfig(attn_implementation=attn))
    lm = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype(dtype), attn_implementation=impl)
    tok = AutoTokenizer.from_pretrained(p)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return lm.eval(), tok
