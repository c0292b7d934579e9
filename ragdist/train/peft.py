"""Parameter-efficient fine-tuning: LoRA / QLoRA adapters and freezing by name or by depth.

    ragdist-train peft=lora peft.r=16 peft.target_modules='[q_proj,v_proj]'
    ragdist-train peft.freeze='[embed_tokens]' peft.train_last_n_blocks=1

Order of application: adapters (which freeze the base model), then `freeze` patterns, then
`train_last_n_blocks`, then `unfreeze` patterns — so `unfreeze` always has the last word.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ragdist.errors import ConfigError
from ragdist.train.config import PeftConfig

log = logging.getLogger(__name__)


def load_quantized_generator(model_cfg: Any) -> nn.Module:
    """QLoRA's base: the model's weights quantized to 4 bits as they load, on this rank's GPU."""
    import os

    from transformers import AutoModelForCausalLM

    if not model_cfg.name_or_path:
        raise ConfigError("peft.method=qlora needs model.name_or_path: 4-bit weights are quantized as a saved model loads")
    device = int(os.environ.get("LOCAL_RANK", "0"))
    return AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path, quantization_config=quantization_config(), device_map={"": device}, dtype=torch.bfloat16
    )


def quantization_config() -> Any:
    """The 4-bit NF4 loading config of QLoRA (bf16 compute)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )


def require_cuda_for_qlora(cfg: PeftConfig) -> None:
    """QLoRA's 4-bit base weights come from bitsandbytes, which has no CPU training path here."""
    if cfg.method == "qlora" and not torch.cuda.is_available():
        raise ConfigError("peft.method=qlora needs a CUDA GPU: its 4-bit base weights come from bitsandbytes, which has "
                          "no CPU training path here. On CPU use peft.method=lora")


def apply_peft(lm: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Adapters and freezing on an HF causal LM; returns the model to train (a PeftModel with adapters)."""
    require_cuda_for_qlora(cfg)
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if cfg.method == "qlora":
            from peft import prepare_model_for_kbit_training

            lm = prepare_model_for_kbit_training(lm)
        targets: list[str] | str = list(cfg.target_modules) or default_target_modules(lm)
        if targets == ["all-linear"]:
            targets = "all-linear"
        else:
            names = [name for name, _ in lm.named_modules()]
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                raise ConfigError(
                    f"peft.target_modules: {missing} not found in the model; its linear layers are named "
                    f"{sorted(n for n, m in _leaf_linears(lm))}"
                )
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        lm = get_peft_model(lm, lora)
    apply_freezing(lm, cfg)
    return lm


def _is_linear(m: nn.Module) -> bool:
    # GPT-2 style models use transformers' Conv1D, a linear layer with its weight transposed
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _leaf_linears(model: nn.Module) -> set[tuple[str, str]]:
    return {(name.rsplit(".", 1)[-1], type(m).__name__) for name, m in model.named_modules() if _is_linear(m)}


def default_target_modules(model: nn.Module) -> list[str]:
    """The linear layers inside the transformer blocks' attention, as `<attention>.<layer>` name
    suffixes (`self_attn.q_proj`, `attn.c_attn`), in model order; else peft's own per-architecture
    choice."""
    out: list[str] = []
    for name, m in model.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or not _is_linear(m) or block_index(name) is None:
            continue
        if re.search(r"attn|attention", parts[-2], re.IGNORECASE):
            suffix = ".".join(parts[-2:])
            if suffix not in out:
                out.append(suffix)
    if out:
        return out
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as BY_TYPE

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in BY_TYPE:
        return list(BY_TYPE[model_type])
    raise ConfigError(
        f"peft.target_modules: no attention layers found in this {model_type or type(model).__name__} model; "
        f"name the layers that get adapters (its linear layers: {sorted(n for n, _ in _leaf_linears(model))}) "
        "or use [all-linear]"
    )


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (`...layers.3.mlp...` → 3), if any."""
    m = re.search(r"\.(?:layers|h|blocks|block)\.(\d+)\.", "." + name)
    return int(m.group(1)) if m else None


def apply_freezing(model: nn.Module, cfg: PeftConfig) -> None:
    _set_by_pattern(model, cfg.freeze, False, "freeze")
    if cfg.train_last_n_blocks:
        _last_blocks(model, cfg.train_last_n_blocks)
    _set_by_pattern(model, cfg.unfreeze, True, "unfreeze")
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    if trainable == 0:
        raise ConfigError("peft: no parameter is left trainable; check peft.freeze / train_last_n_blocks")
    if cfg.method != "none" or cfg.freeze or cfg.train_last_n_blocks:
        log.info("peft: %d of %d parameters trainable (%.2f%%)", trainable, total, 100.0 * trainable / max(total, 1))


def _numel(p: torch.Tensor) -> int:
    # Under ZeRO-3 a parameter is an empty placeholder as soon as it is built; DeepSpeed keeps its size.
    return int(getattr(p, "ds_numel", 0) or p.numel())


def _set_by_pattern(model: nn.Module, patterns: list[str], flag: bool, key: str) -> None:
    named = dict(model.named_parameters())
    for pat in patterns:
        hits = [n for n in named if re.search(pat, n)]
        if not hits:
            sample = ", ".join(list(named)[:6])
            raise ConfigError(f"peft.{key}: pattern {pat!r} matches no parameter (names look like: {sample}, ...)")
        for n in hits:
            named[n].requires_grad_(flag)


def _last_blocks(model: nn.Module, n: int) -> None:
    blocks = {b for name, _ in model.named_parameters() if (b := block_index(name)) is not None}
    if not blocks:
        raise ConfigError("peft.train_last_n_blocks: the model has no numbered transformer blocks")
    if n > len(blocks):
        raise ConfigError(f"peft.train_last_n_blocks={n}: the model has only {len(blocks)} blocks")
    first = max(blocks) - n + 1
    for name, p in model.named_parameters():
        b = block_index(name)
        if b is None or b < first:
            p.requires_grad_(False)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save_adapter_and_merged(peft_model: nn.Module, tokenizer: Any, out_dir: str | Path, save_adapter: bool) -> Path:
    """Write the merged HF model (what evaluation loads) to `out_dir`, and the adapter to `out_dir/adapter`."""
    import tempfile

    from ragdist.train.model import save_pretrained_atomic

    out = Path(out_dir)
    adapter_tmp = None
    if save_adapter:
        out.parent.mkdir(parents=True, exist_ok=True)
        adapter_tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-adapter-"))
        peft_model.save_pretrained(adapter_tmp)
    merged = peft_model.merge_and_unload()
    save_pretrained_atomic(merged, tokenizer, out, extra_dirs={"adapter": adapter_tmp} if adapter_tmp else None)
    return out


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a saved adapter into its base model on disk (e.g. a base given by model.name_or_path)."""
    from peft import PeftModel

    from ragdist.train.model import load_generator, save_pretrained_atomic

    base, tok = load_generator(base_dir)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: not a saved adapter (no adapter_config.json)")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return save_pretrained_atomic(merged, tok, out_dir)
