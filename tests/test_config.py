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
