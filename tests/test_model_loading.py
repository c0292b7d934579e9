"""Loading a saved generator: model.dtype, the attention kernel and its fallback, gradient
checkpointing, and trainer.precision=auto following model.dtype. One process, tiny models."""

from __future__ import annotations

import logging

import pytest
import torch

from ragdist.errors import ConfigError
from ragdist.train.engine import TrainerConfig, resolve_precision
from ragdist.train.model import (
    AnswerLossLM,
    GeneratorBuilder,
    ModelConfig,
    attn_implementation,
    build_generator,
    load_generator,
    load_tokenizer,
)
from tests.tiny_hf import save_tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny("qwen2", tmp_path_factory.mktemp("qwen2") / "model")


def test_model_dtype_is_the_dtype_weights_load_in(saved):
    cfg = ModelConfig(name_or_path=str(saved), dtype="bf16")
    tok = load_tokenizer(cfg)
    lm = build_generator(cfg, tok)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in build_generator(ModelConfig(name_or_path=str(saved)), tok).parameters()} == {torch.float32}
    lm, _ = load_generator(saved, dtype="bf16")
    assert next(lm.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype='half'"):
        build_generator(ModelConfig(name_or_path=str(saved), dtype="half"), tok)


def test_attention_kernel_and_its_fallback(saved, caplog):
    tok = load_tokenizer(ModelConfig(name_or_path=str(saved)))
    lm = build_generator(ModelConfig(name_or_path=str(saved), attn_implementation="eager"), tok)
    assert lm.config._attn_implementation == "eager"
    assert build_generator(ModelConfig(name_or_path=str(saved)), tok).config._attn_implementation == "sdpa"
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="ragdist.train.model"):
            assert attn_implementation(ModelConfig(attn_implementation="flash_attention_2")) == "sdpa"
        assert "flash_attention_2" in caplog.text and "no CUDA GPU" in caplog.text and "using sdpa" in caplog.text
    with pytest.raises(ConfigError, match="model.attn_implementation='flash'"):
        attn_implementation(ModelConfig(attn_implementation="flash"))


def test_gradient_checkpointing_changes_no_gradient(saved):
    tok = load_tokenizer(ModelConfig(name_or_path=str(saved)))
    x = torch.randint(5, len(tok), (2, 16))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    grads = []
    for ckpt in (False, True):
        lm = build_generator(ModelConfig(name_or_path=str(saved), gradient_checkpointing=ckpt), tok)
        assert any(getattr(m, "gradient_checkpointing", False) for m in lm.modules()) == ckpt
        model = AnswerLossLM(lm).train()
        model(**batch).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_precision_auto_follows_the_model_dtype(saved):
    tok = load_tokenizer(ModelConfig(name_or_path=str(saved)))
    auto = TrainerConfig()
    assert auto.precision == "auto"
    bf16 = GeneratorBuilder(ModelConfig(name_or_path=str(saved), dtype="bf16"), tok)
    assert resolve_precision(auto, bf16).precision == "bf16"
    assert resolve_precision(auto, GeneratorBuilder(ModelConfig(), tok)).precision == "fp32"
    assert resolve_precision(auto, lambda: None).precision == "fp32"  # a builder that does not say
    assert resolve_precision(TrainerConfig(precision="fp32"), bf16).precision == "fp32"  # explicit wins
    # the meta-device build has the structure of the real one and no storage
    meta = bf16.on_meta()
    assert all(p.is_meta and p.dtype == torch.float32 for p in meta.parameters())
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in bf16().named_parameters()]
