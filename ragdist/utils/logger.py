"""Metric sinks: a JSONL file always, wandb (offline by default) when configured. Rank 0 only."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragdist.errors import ConfigError
from ragdist.utils.validate import one_of


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb   (a metrics.jsonl file is written either way)
    mode: str = "offline"  # wandb mode: offline | online | disabled
    project: str = "ragdist"
    group: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        one_of("logger.backend", self.backend, ("none", "wandb"))
        one_of("logger.mode", self.mode, ("offline", "online", "disabled"))


class RunLogger:
    def __init__(
        self, cfg: LoggerConfig, run_dir: str | Path, *, enabled: bool = True, config: dict | None = None
    ):
        self.enabled = enabled
        self.run = None
        self.path = Path(run_dir) / "metrics.jsonl"
        self._step_axes: set[str] = set()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.backend == "wandb":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            self.run = wandb.init(
                project=cfg.project,
                group=cfg.group or None,
                name=cfg.name or Path(run_dir).name,
                mode=cfg.mode,
                config=config,
                dir=str(run_dir),
                reinit="finish_previous",
            )
        elif cfg.backend != "none":
            raise ConfigError(f"logger.backend={cfg.backend!r}: expected 'none' or 'wandb'")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), "step": step, **metrics}) + "\n")
        if self.run is None:
            return
        if step is None:
            self.run.log(metrics)
            return
        # Several loops log here, each counting its own steps from 1 (one per training variant, then
        # eval). wandb's global step must only grow, so each key group gets its own step axis instead.
        extra: dict[str, Any] = {} if all("/" in k for k in metrics) else {"step": step}
        for group in {k.rsplit("/", 1)[0] for k in metrics if "/" in k}:
            axis = f"{group}/step"
            if group not in self._step_axes:
                self.run.define_metric(axis, hidden=True)
                self.run.define_metric(f"{group}/*", step_metric=axis)
                self._step_axes.add(group)
            extra[axis] = step
        self.run.log({**metrics, **extra})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table (wandb.Table under wandb; a JSONL record otherwise)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(
                json.dumps({"time": time.time(), "table": key, "columns": columns, "rows": rows}, default=str)
                + "\n"
            )
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_images(self, images: dict[str, str | Path]) -> None:
        """Image files (plots) by key; only wandb stores the images themselves."""
        if not self.enabled or self.run is None:
            return
        import wandb

        self.run.log({k: wandb.Image(str(p)) for k, p in images.items()})

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    @property
    def run_path(self) -> str | None:
        """Where wandb keeps this run locally (offline runs are synced from there later)."""
        return str(self.run.dir) if self.run is not None else None

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def flatten_metrics(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numeric dicts as flat 'a/b/c' keys (what metric sinks plot); non-numbers are dropped."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out
