"""PEFT on a tiny generator: LoRA adapters, freezing by name and depth, QLoRA refusal, adapter export."""

from __future__ import annotations

import pytest
import torch

from ragdist.errors import ConfigError
from ragdist.train.model import AnswerLossLM, ModelConfig, build_generator, load_generator, load_tokenizer
from ragdist.train.peft import PeftConfig, apply_peft, block_index, merge_adapter, save_adapter_and_merged

TINY = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, max_position=64)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_leaves_only_adapters_trainable(tok):
    m = apply_peft(build_generator(TINY, tok), PeftConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]))
    names = trainable(m)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    assert len(names) == 3 * 2 * 2  # blocks × modules × (A, B)
    with pytest.raises(ConfigError, match="qq_proj"):
        apply_peft(build_generator(TINY, tok), PeftConfig(method="lora", target_modules=["qq_proj"]))


def test_freeze_by_pattern_and_last_blocks(tok):
    m = apply_peft(build_generator(TINY, tok), PeftConfig(freeze=["embed_tokens", r"mlp\."]))
    frozen = {n for n, _ in m.named_parameters()} - trainable(m)
    assert frozen and all("embed_tokens" in n or ".mlp." in n for n in frozen)
    assert any("self_attn" in n for n in trainable(m))

    m = apply_peft(build_generator(TINY, tok), PeftConfig(train_last_n_blocks=1, unfreeze=["model.norm"]))
    assert trainable(m) == {n for n, _ in m.named_parameters() if block_index(n) == 2} | {"model.norm.weight"}

    lora_last = PeftConfig(method="lora", r=2, target_modules=["q_proj"], train_last_n_blocks=2)
    m = apply_peft(build_generator(TINY, tok), lora_last)
    assert {block_index(n) for n in trainable(m)} == {1, 2} and all("lora_" in n for n in trainable(m))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(freeze=["no_such_layer"]), "matches no parameter"),
        (dict(train_last_n_blocks=9), "only 3 blocks"),
        (dict(freeze=["."]), "no parameter is left trainable"),
        (dict(freeze=["(unclosed"]), "not a regular expression"),
        (dict(method="dora"), "peft.method"),
        (dict(method="lora", r=0), "peft.r"),
    ],
)
def test_bad_peft_settings_are_refused_clearly(tok, kw, match):
    # values a config can judge alone are refused as it is built; the rest when applied to the model
    with pytest.raises(ConfigError, match=match):
        apply_peft(build_generator(TINY, tok), PeftConfig(**kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_is_refused_on_cpu(tok):
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        apply_peft(build_generator(TINY, tok), PeftConfig(method="qlora"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_on_gpu(tok, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from ragdist.train.model import save_pretrained_atomic
    from ragdist.train.peft import quantization_config

    save_pretrained_atomic(build_generator(ModelConfig(hidden_size=64, num_heads=2, intermediate_size=128), tok), tok, tmp_path / "base")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization_config(), device_map={"": 0})
    m = apply_peft(lm, PeftConfig(method="qlora", r=4, target_modules=["q_proj", "v_proj"]))
    assert all("lora_" in n for n in trainable(m))
    assert any("4bit" in type(mod).__name__ for mod in m.modules())


def test_adapter_export_merged_and_alone(tok, tmp_path):
    from peft import PeftModel

    lora = PeftConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    base = build_generator(TINY, tok)
    from ragdist.train.model import save_pretrained_atomic

    save_pretrained_atomic(base, tok, tmp_path / "base")
    m = apply_peft(build_generator(TINY, tok), lora)
    with torch.no_grad():  # as if trained: lora_B starts at zero, which would make the test vacuous
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.randint(5, 1000, (2, 12))
    want = m(input_ids=x).logits
    out = save_adapter_and_merged(m, tok, tmp_path / "ckpt", save_adapter=True)
    merged, _ = load_generator(out)  # what evaluation loads: a plain HF model dir
    torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    assert (out / "adapter" / "adapter_config.json").is_file()
    again = PeftModel.from_pretrained(load_generator(tmp_path / "base")[0], str(out / "adapter"))
    torch.testing.assert_close(again(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    merged2, _ = load_generator(merge_adapter(tmp_path / "base", out / "adapter", tmp_path / "merged2"))
    torch.testing.assert_close(merged2(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    # the training wrapper sees through the adapter (AnswerLossLM reaches decoder and head)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    assert torch.isfinite(AnswerLossLM(m)(**batch))
