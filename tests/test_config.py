from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ragdist.config import GROUPS, RunConfig, as_object, compose, conf_dir
from ragdist.errors import ConfigError


def group_options():
    for group in GROUPS:
        for f in sorted((Path(conf_dir()) / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_config_composes(group, option):
    cfg = compose([f"{group}={option}", "run_dir=/tmp/x"])
    obj = as_object(cfg)
    assert isinstance(obj, RunConfig)
    assert isinstance(getattr(obj, group), GROUPS[group])


@pytest.mark.parametrize("exp", sorted(p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml")))
def test_every_experiment_composes(exp):
    cfg = compose([f"+experiment={exp}", "run_dir=/tmp/x"])
    assert isinstance(as_object(cfg), RunConfig)


@pytest.mark.parametrize("exp", ["demo", "demo_elements"])
def test_the_demos_read_three_passages_after_a_pretext_stage(exp):
    obj = as_object(compose([f"+experiment={exp}", "run_dir=/tmp/x"]))
    assert obj.retrieval.top_k == 3
    assert obj.trainer.examples.aggregation == "sequential"
    assert obj.trainer.pretext.steps > 0 and "rag" in obj.trainer.variants and "closed_book" in obj.trainer.variants


RECIPE_KEYS = ("model.tokenizer", "model.prompt_loss_weight", "model.prompt_loss_norm", "trainer.micro_batch_size", "trainer.lr",
               "trainer.max_steps", "trainer.pretext.steps", "trainer.examples.aggregation",
               "trainer.examples.swap_answer_p", "trainer.examples.swap_made_up_p", "trainer.examples.swap_made_up",
               "trainer.examples.passage_temperature")


def _picks(cfg):
    return {k: OmegaConf.select(cfg, k) for k in RECIPE_KEYS}


def test_the_recipe_follows_the_generator():
    scratch = compose(["run_dir=/tmp/x"])
    assert _picks(scratch) == {
        "model.tokenizer": "bpe", "model.prompt_loss_weight": 1.0, "model.prompt_loss_norm": "mean",
        "trainer.micro_batch_size": 16,
        "trainer.lr": 3.0e-3, "trainer.max_steps": 2000, "trainer.pretext.steps": 500,
        "trainer.examples.aggregation": "sequential", "trainer.examples.swap_answer_p": 1.0,
        "trainer.examples.swap_made_up_p": 0.5, "trainer.examples.swap_made_up": "all",
        "trainer.examples.passage_temperature": 0.01,
    }
    # a pretrained model gets the schema's plain values, and so does recipe=plain from scratch
    pretrained = compose(["model.name_or_path=/models/some-llm", "trainer=fsdp", "run_dir=/tmp/x"])
    plain = compose(["recipe=plain", "run_dir=/tmp/x"])
    assert _picks(pretrained) == _picks(plain) == {
        "model.tokenizer": "minilm", "model.prompt_loss_weight": 0.0, "model.prompt_loss_norm": "token",
        "trainer.micro_batch_size": 8,
        "trainer.lr": 1.0e-3, "trainer.max_steps": 1000, "trainer.pretext.steps": 0,
        "trainer.examples.aggregation": "concat", "trainer.examples.swap_answer_p": 0.0,
        "trainer.examples.swap_made_up_p": 0.0, "trainer.examples.swap_made_up": "words",
        "trainer.examples.passage_temperature": 0.05,
    }
    assert as_object(pretrained).trainer.engine == "fsdp"
    # the choices are plain values once checked: the saved config and every rank see numbers
    assert "if_scratch" not in OmegaConf.to_yaml(scratch.trainer) + OmegaConf.to_yaml(scratch.model)


def test_a_value_given_beats_the_recipe():
    cfg = compose(["trainer.max_steps=1000", "trainer.pretext.steps=0", "trainer.examples.aggregation=concat",
                   "run_dir=/tmp/x"])
    obj = as_object(cfg)
    assert (obj.trainer.max_steps, obj.trainer.pretext.steps, obj.trainer.examples.aggregation) == (1000, 0, "concat")
    assert obj.trainer.lr == 3.0e-3  # what was not given still follows the generator
    # an experiment's values too; the tests' sample keeps the plain recipe
    tiny = as_object(compose(["+experiment=tiny", "run_dir=/tmp/x"]))
    assert (tiny.trainer.max_steps, tiny.trainer.pretext.steps, tiny.model.prompt_loss_weight) == (30, 0, 0.0)


def test_the_run_seed_reaches_the_model_and_the_trainer():
    default = as_object(compose(["run_dir=/tmp/x"]))
    assert (default.seed, default.model.seed, default.trainer.seed) == (0, 0, 0)
    run = as_object(compose(["+experiment=demo", "seed=3", "run_dir=/tmp/x"]))
    assert (run.model.seed, run.trainer.seed) == (3, 3)
    # the dataset split and the evaluation's perturbations stay put: every seed is scored on the same questions
    assert (run.data.seed, run.eval.seed, run.index.seed) == (default.data.seed, default.eval.seed, default.index.seed)
    own = as_object(compose(["seed=3", "model.seed=5", "run_dir=/tmp/x"]))
    assert (own.model.seed, own.trainer.seed) == (5, 3)


def test_unknown_key_fails_at_compose_naming_it():
    with pytest.raises(ConfigCompositionException, match="num_shard"):
        compose(["index.num_shard=4"])
    with pytest.raises(ConfigError, match="index.num_shard"):
        compose(["+index.num_shard=4"])


def test_wrong_type_fails_naming_the_value():
    with pytest.raises(ConfigCompositionException, match="lots"):
        compose(["index.num_shards=lots"])


def test_overrides_reach_the_schema():
    cfg = compose(["index.num_shards=4", "retrieval.top_k=5", "trainer.zero_stage=3", "run_dir=/tmp/x"])
    obj = as_object(cfg)
    assert (obj.index.num_shards, obj.retrieval.top_k, obj.trainer.zero_stage) == (4, 5, 3)


def test_resolved_round_trip(tmp_path):
    from ragdist.config import load_resolved, to_yaml

    cfg = compose(["trainer.lr=0.5", "run_dir=/tmp/x"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    back = load_resolved(tmp_path / "c.yaml")
    assert back.trainer.lr == 0.5 and OmegaConf.is_config(back)
