"""Training-state checkpoints: engine state, RNG states, data position and index version, atomically.

Layout: <root>/step_00000040/{engine/..., rng/rank_00000.pt, trainer_state.json} and <root>/LATEST.
Every rank writes into one hidden temp directory; rank 0 renames it into place only after all
ranks finished, then points LATEST at it. A crash mid-save leaves only the temp dir, which the
next save removes, and LATEST keeps naming the previous complete checkpoint. On a cluster the
root must be on a filesystem all ranks share.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ragdist.errors import ConfigError
from ragdist.index.snapshot import atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states as plain lists and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": _listify(random.getstate()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tupleify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupleify(x: Any) -> Any:
    return tuple(_tupleify(v) for v in x) if isinstance(x, list) else x


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine: Any, root: str | Path, state: dict[str, Any], keep: int = 2, extra: Callable[[Path], None] | None = None
) -> Path:
    """Collective. Write engine + RNG + `state` (JSON-able: step, data position, history...) for `state['step']`.

    `extra(tmp_dir)`, called on every rank, writes whatever else belongs to the checkpoint into it
    (e.g. a jointly trained retriever); it is renamed into place with the rest."""
    rank, _ = _rank_world()
    root = Path(root)
    name = f"step_{int(state['step']):08d}"
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(tmp / "engine")
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if extra is not None:
        extra(tmp)
    _barrier()
    final = root / name
    if rank == 0:
        atomic_write_text(tmp / STATE_FILE, json.dumps(state))
        if final.exists():
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        atomic_write_text(root / LATEST, name + "\n")
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(spec: str, root: str | Path) -> Path | None:
    """`spec`: "" (none), "auto" (newest under `root`, or None), or a checkpoint / checkpoint root path."""
    if not spec:
        return None
    if spec == "auto":
        return latest(root)
    p = Path(spec)
    if (p / STATE_FILE).is_file():
        return p
    found = latest(p)
    if found is None:
        raise ConfigError(f"trainer.resume={spec!r}: no training checkpoint there (no {STATE_FILE} or {LATEST})")
    return found


def latest(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: unreadable training checkpoint state ({e})") from None


def load_checkpoint(engine: Any, path: str | Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Collective. Restore engine and this rank's RNG; check the run matches (`expect`); return the state."""
    rank, world = _rank_world()
    path = Path(path)
    state = read_state(path)
    for key, want in expect.items():
        have = state.get(key)
        if have != want:
            raise ConfigError(
                f"{path}: checkpoint has {key}={have!r} but this run has {key}={want!r}; resume with the same setting"
            )
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"{path}: no RNG state for rank {rank} (checkpoint written by {state.get('world_size')} ranks)")
    engine.load_checkpoint(path / "engine")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state
