"""Small checks for the config dataclasses' `__post_init__`: each names the key and the value at fault."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ragdist.errors import ConfigError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def one_of(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")


def at_least(key: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{key}={value}: must be at least {low}")


def non_negative(key: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{key}={value}: must not be negative")


def positive(key: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}={value}: must be positive")


def probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value}: must be a probability in [0, 1]")
