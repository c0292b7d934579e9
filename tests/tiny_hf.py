"""Tiny random HF decoders of several architectures, saved to disk as a user's pretrained model would
be, each with its own tokenizer built offline (byte-level BPE trained on the test corpus) and, for
all but GPT-2, that family's style of chat template."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# architecture -> (chat template or None, the template's special tokens)
ARCHS: dict[str, tuple[str | None, list[str]]] = {
    "llama": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "qwen2": (CHATML, ["<|im_start|>", "<|im_end|>"]),
    "mistral": (MISTRAL, []),
    "gpt2": (None, []),
    "phi3": (PHI3, ["<|user|>", "<|assistant|>", "<|end|>"]),
}


def _texts() -> list[str]:
    out = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            row = json.loads(line)
            out.append(f"question: {row['question']}\nanswer: {' '.join(row['answers'])}")
    return out


def build_tokenizer(chat_template: str | None = None, specials: list[str] = (), vocab_size: int = 400):
    """A byte-level BPE tokenizer (no unknown characters) trained on the test data, as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base + list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(specials),
    )
    fast.chat_template = chat_template
    return fast


def model_config(arch: str, tok, hidden: int = 32, layers: int = 2):
    from transformers import AutoConfig

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        # no dropout: runs of different engines must be comparable step by step
        drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return AutoConfig.for_model(
            "gpt2", vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=2, n_positions=256, **drop, **ids
        )
    sizes = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1 if arch in ("qwen2", "mistral") else 2,
        max_position_embeddings=256,
        # tied and untied output heads both occur in the wild
        tie_word_embeddings=arch in ("llama", "qwen2"),
    )
    return AutoConfig.for_model(arch, **sizes, **ids)


def save_tiny(arch: str, out: Path, seed: int = 0) -> Path:
    """A random tiny `arch` model and its tokenizer, saved with save_pretrained under `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    template, specials = ARCHS[arch]
    tok = build_tokenizer(template, specials)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(model_config(arch, tok), dtype=torch.float32)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out
