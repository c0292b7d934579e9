import math

import pytest
import torch

from ragdist.errors import ConfigError
from ragdist.train.deepspeed_engine import deepspeed_config
from ragdist.train.engine import TrainerConfig, lr_lambda
from ragdist.train.examples import collate_prompts, collate_train, encode_train, prompt_ids
from ragdist.train.model import IGNORE, AnswerLossLM, ModelConfig, build_generator, load_tokenizer
from ragdist.train.trainer import rank_batches


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


PASSAGES = [{"title": "Farah Airport", "text": "Farah Airport has IATA code FAH."}, {"title": "B", "text": "other"}]


def test_example_layout_passages_question_answer(tok):
    ex = encode_train(tok, "What is the IATA code of Farah Airport?", PASSAGES, "FAH", 256)
    text = tok.decode(ex["input_ids"])
    assert text.index("passage 1") < text.index("passage 2") < text.index("question") < text.rindex("fah")
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(answer, skip_special_tokens=True).strip() == "fah"
    assert answer[-1] == tok.eos_token_id
    assert ex["labels"][: -len(answer)] == [IGNORE] * (len(ex["labels"]) - len(answer))


def test_truncation_keeps_the_answer(tok):
    long = [{"title": "x", "text": "word " * 500}] * 3
    ex = encode_train(tok, "q?", long, "the answer", 64)
    assert len(ex["input_ids"]) <= 64
    kept = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(kept, skip_special_tokens=True).strip() == "the answer"
    assert "question" in tok.decode(ex["input_ids"])


def test_collate_pads_and_masks(tok):
    a = encode_train(tok, "q?", [], "a", 64)
    b = encode_train(tok, "a longer question?", PASSAGES, "b", 64)
    batch = collate_train([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(a["input_ids"])
    left = collate_prompts([prompt_ids(tok, "q?", [], 64), prompt_ids(tok, "q?", PASSAGES, 64)], tok.pad_token_id)
    assert left["attention_mask"][:, -1].all()  # left-padded: every prompt ends at the last column


def test_answer_loss_equals_full_logits_loss(tok):
    lm = build_generator(ModelConfig(hidden_size=32, num_heads=2, intermediate_size=64), tok)
    batch = collate_train([encode_train(tok, "q?", PASSAGES, "FAH", 64)] * 2, tok.pad_token_id)
    ours = AnswerLossLM(lm)(**batch)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_prompt_loss_weight_counts_prompt_tokens_by_their_share(tok):
    lm = build_generator(ModelConfig(hidden_size=32, num_heads=2, intermediate_size=64), tok)
    a = encode_train(tok, "q?", PASSAGES, "FAH", 64)
    b = encode_train(tok, "a longer question?", [], "b", 64)
    batch = collate_train([a, b], tok.pad_token_id)  # b is right-padded: pads carry no loss
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
    ).view(logits.shape[:2])
    answer = batch["labels"][:, 1:] != IGNORE
    real = batch["attention_mask"][:, 1:].bool()
    prompt = real & ~answer
    w = 0.25
    ref = (ce[answer].sum() + w * ce[prompt].sum()) / (answer.sum() + w * prompt.sum())
    for fused in (True, False):
        torch.testing.assert_close(AnswerLossLM(lm, fused_loss=fused, prompt_loss_weight=w)(**batch), ref,
                                   rtol=1e-5, atol=1e-5)
    # 0 is the answer-only loss
    torch.testing.assert_close(AnswerLossLM(lm, prompt_loss_weight=0.0)(**batch), ce[answer].mean(),
                               rtol=1e-5, atol=1e-5)
    # mean: the two means weighed against each other, however many tokens each has
    ref = (ce[answer].mean() + w * ce[prompt].mean()) / (1 + w)
    for fused in (True, False):
        torch.testing.assert_close(
            AnswerLossLM(lm, fused_loss=fused, prompt_loss_weight=w, prompt_loss_norm="mean")(**batch), ref,
            rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(AnswerLossLM(lm, prompt_loss_weight=0.0, prompt_loss_norm="mean")(**batch),
                               ce[answer].mean(), rtol=1e-5, atol=1e-5)


def test_prompt_loss_weight_is_checked():
    assert ModelConfig().prompt_loss_weight == 0.0  # the answer only, unless asked
    with pytest.raises(ConfigError, match="model.prompt_loss_weight"):
        ModelConfig(prompt_loss_weight=2.0)
    with pytest.raises(ConfigError, match="model.prompt_loss_norm"):
        ModelConfig(prompt_loss_norm="sum")


def test_deepspeed_config_derives_global_batch():
    ds = deepspeed_config(TrainerConfig(micro_batch_size=4, grad_accum=3, zero_stage=3, precision="bf16"), world_size=2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="zero_stage"):
        deepspeed_config(TrainerConfig(zero_stage=5), 2)


def test_zero3_buffers_scale_with_the_model():
    small = deepspeed_config(TrainerConfig(zero_stage=3), 2, hidden_size=768)["zero_optimization"]
    # a ~100M model: buckets of hidden², about two layers gathered at once, not DeepSpeed's 5e8 / 1e9
    assert small["reduce_bucket_size"] == 768**2 and small["stage3_prefetch_bucket_size"] == int(0.9 * 768**2)
    assert small["stage3_max_live_parameters"] == small["stage3_max_reuse_distance"] == 24 * 768**2
    big = deepspeed_config(TrainerConfig(zero_stage=3), 2, hidden_size=8192)["zero_optimization"]
    assert big["stage3_max_live_parameters"] == big["sub_group_size"] == 10**9  # 70B class: DeepSpeed's own bound
    assert "reduce_bucket_size" not in deepspeed_config(TrainerConfig(zero_stage=2), 2, hidden_size=768)["zero_optimization"]


def test_zero3_on_gpu_ranks_keeps_deepspeeds_buckets(monkeypatch):
    # On a GPU the small buckets cost speed (README, "Measured on H100 GPUs"): DeepSpeed's own sizes.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    zero = deepspeed_config(TrainerConfig(zero_stage=3, precision="bf16"), 2, hidden_size=2048)["zero_optimization"]
    assert zero == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}


def test_raw_deepspeed_json(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"zero_optimization": {"stage": 1}, "train_batch_size": 999}')
    ds = deepspeed_config(TrainerConfig(ds_config=str(p), micro_batch_size=2), 2)
    assert ds["zero_optimization"]["stage"] == 1 and "train_batch_size" not in ds
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(TrainerConfig(ds_config=str(p)), 2)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(TrainerConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)


def test_rank_batches_partition_evenly():
    a = rank_batches(103, 0, 2, 8, seed=1, epoch=0)
    b = rank_batches(103, 1, 2, 8, seed=1, epoch=0)
    flat_a = {int(i) for x in a for i in x}
    flat_b = {int(i) for x in b for i in x}
    assert len(a) == len(b) == 6 and not (flat_a & flat_b)
    assert rank_batches(103, 0, 2, 8, seed=1, epoch=1)[0].tolist() != a[0].tolist()


def test_deepspeed_offload_and_cpu_settings():
    ds = deepspeed_config(TrainerConfig(zero_stage=3, offload_optimizer=True, offload_params=True), 2)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    if not torch.cuda.is_available():
        # a client torch optimizer with offload needs DeepSpeed told not to insist on its CPU Adam
        assert ds["zero_force_ds_cpu_optimizer"] is False and "optimizer" not in ds
        assert deepspeed_config(TrainerConfig(zero_stage=2), 2)["zero_optimization"]["contiguous_gradients"] is False
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            deepspeed_config(TrainerConfig(precision="fp16"), 2)
    with pytest.raises(ConfigError, match="offload_params needs trainer.zero_stage=3"):
        deepspeed_config(TrainerConfig(zero_stage=2, offload_params=True), 2)
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        deepspeed_config(TrainerConfig(zero_stage=0, offload_optimizer=True), 2)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(engine="megatron"), "trainer.engine"),
        (dict(precision="fp8"), "trainer.precision"),
        (dict(grad_accum=0), "trainer.grad_accum"),
        (dict(prefetch_depth=-1), "trainer.prefetch_depth"),
        (dict(schedule="step"), "trainer.schedule"),
        (dict(cpu_collectives="mpi"), "trainer.cpu_collectives"),
    ],
)
def test_trainer_config_is_checked_before_any_process_group(kw, match):
    with pytest.raises(ConfigError, match=match):  # refused as the config is built
        TrainerConfig(**kw)


def test_every_engine_and_peft_config_composes():
    from ragdist.config import as_object, compose

    for overrides in (["trainer=fsdp"], ["trainer=deepspeed", "peft=lora"], ["peft=qlora"], ["peft=none"]):
        cfg = compose(overrides)
        trainer, peft = as_object(cfg.trainer), as_object(cfg.peft)
        assert trainer.engine in ("deepspeed", "fsdp") and peft.method in ("none", "lora", "qlora")
    assert compose(["trainer=fsdp"]).trainer.engine == "fsdp"
    assert compose(["trainer.examples.aggregation=sequential"]).trainer.examples.aggregation == "sequential"


def test_fused_adamw_only_when_asked_for():
    from ragdist.train.engine import adamw

    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    assert not adamw(params, TrainerConfig()).defaults.get("fused")
    assert adamw(params, TrainerConfig(fused_optimizer=True)).defaults["fused"] is True
