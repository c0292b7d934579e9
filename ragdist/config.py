"""The run's config schema: one dataclass per group, each defined beside the code that uses it.

Registered in Hydra's ConfigStore so that an unknown key (`index.num_shard=4`) fails at compose
time naming the key, and a wrong type fails naming the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ragdist.data.corpus import CorpusConfig
from ragdist.data.qa import DataConfig
from ragdist.embed.embedder import EmbedderConfig
from ragdist.eval.runner import EvalConfig
from ragdist.index.builder import IndexConfig
from ragdist.index.capacity import PlanConfig
from ragdist.joint.loop import JointConfig
from ragdist.retrieval.client import RetrievalConfig
from ragdist.train.engine import TrainerConfig
from ragdist.train.model import ModelConfig
from ragdist.train.peft import PeftConfig
from ragdist.utils.logger import LoggerConfig

GROUPS: dict[str, type] = {
    "corpus": CorpusConfig,
    "embedder": EmbedderConfig,
    "index": IndexConfig,
    "retrieval": RetrievalConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "peft": PeftConfig,
    "eval": EvalConfig,
    "logger": LoggerConfig,
    "joint": JointConfig,
    "plan": PlanConfig,
}


@dataclass
class RunConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    run_dir: str = "runs/default"
    seed: int = 0


_registered = False


def register_configs() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    _registered = True


def validate_keys(cfg: Any, schema: type = RunConfig, where: str = "") -> None:
    """Refuse keys the schema does not have, even ones forced in with Hydra's `+key=value`."""
    import dataclasses

    from ragdist.errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key == "hydra" and not where:
            continue
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{where}{key}' (known keys here: {known})")
        sub = GROUPS.get(key) if not where else None
        if sub is not None and isinstance(cfg[key], DictConfig):
            validate_keys(cfg[key], sub, f"{where}{key}.")


def conf_dir() -> str:
    """The YAML configs: $RAGDIST_CONF, else the repo's conf/ next to the package."""
    import os

    env = os.environ.get("RAGDIST_CONF")
    if env:
        return str(Path(env).resolve())
    return str((Path(__file__).resolve().parent.parent / "conf").resolve())


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose outside a Hydra app (tests, workers): same schema, same errors."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = hcompose(config_name=config_name, overrides=list(overrides or []))
    validate_keys(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_resolved(path: str | Path) -> DictConfig:
    """A config written by `to_yaml`, re-typed against the schema."""
    base = OmegaConf.structured(RunConfig)
    return OmegaConf.merge(base, OmegaConf.load(path))  # type: ignore[return-value]


def as_object(node: Any) -> Any:
    """A typed dataclass instance from a config node."""
    return OmegaConf.to_object(node)
