"""Metric sinks: a JSONL file always, wandb (offline by default) when configured. Rank 0 only."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragdist.errors import ConfigError


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb   (a metrics.jsonl file is written either way)
    mode: str = "offline"  # wandb mode: offline | online | disabled
    project: str = "ragdist"
    group: str = ""
    name: str = ""


class RunLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: str | Path, *, enabled: bool = True, config: dict | None = None):
        self.enabled = enabled
        self.run = None
        self.path = Path(run_dir) / "metrics.jsonl"
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
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
