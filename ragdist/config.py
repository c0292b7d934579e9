"""The run's config: assembles each group's schema, nothing else.

Each group's dataclass lives in a leaf module beside its code (`ragdist/<group>/config.py`) and checks
its own values in `__post_init__`. Registered in Hydra's ConfigStore, so an unknown key
(`index.num_shard=4`) or a wrong type fails at compose time naming the key; a bad value fails at the
one `check(cfg)` step (the typed objects are built once, as each console script starts), naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ragdist.data.config import CorpusConfig, DataConfig
from ragdist.embed.config import EmbedderConfig
from ragdist.eval.config import EvalConfig
from ragdist.index.config import IndexConfig, PlanConfig
from ragdist.joint.config import JointConfig
from ragdist.retrieval.config import RetrievalConfig
from ragdist.train.config import ModelConfig, PeftConfig, TrainerConfig
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


def from_scratch(scratch: Any, pretrained: Any, *, _root_: DictConfig) -> Any:
    """`${if_scratch:A,B}` in conf/recipe/auto.yaml: A for a generator built from config (random weights,
    `model.name_or_path` empty), B for a pretrained one."""
    return pretrained if _root_.model.name_or_path else scratch


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("if_scratch"):
        OmegaConf.register_new_resolver("if_scratch", from_scratch)


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
    import typing

    from ragdist.errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(schema)}
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # an annotation that does not resolve: check this level only
        hints = {}
    for key in cfg.keys():
        if key == "hydra" and not where:
            continue
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{where}{key}' (known keys here: {known})")
        # Nested schemas too (corpus.fields.*): `+` would otherwise slip a typo past them.
        sub = GROUPS.get(key) if not where else hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(cfg[key], DictConfig):
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
    check(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


register_resolvers()  # at import: every process that reads a config has imported this module


def load_resolved(path: str | Path) -> DictConfig:
    """A config written by `to_yaml`, re-typed against the schema."""
    base = OmegaConf.structured(RunConfig)
    return OmegaConf.merge(base, OmegaConf.load(path))  # type: ignore[return-value]


def typed_config(plain: dict[str, Any]) -> DictConfig:
    """A plain config (e.g. one sent to other processes) re-typed against the schema."""
    return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(plain))  # type: ignore[return-value]


def check(cfg: DictConfig) -> None:
    """Unknown keys refused, then every group's values resolved in place (the recipe's `${if_scratch:…}`
    choices become plain values that every rank and the saved config see) and checked (each dataclass's
    `__post_init__` runs as the group becomes an object). Groups only: `run_dir` may interpolate Hydra's
    run-time values."""
    validate_keys(cfg)
    for group in GROUPS:
        if group in cfg:
            OmegaConf.resolve(cfg[group])
            OmegaConf.to_object(cfg[group])


def as_object(node: Any) -> Any:
    """A typed dataclass instance from a config node."""
    return OmegaConf.to_object(node)
