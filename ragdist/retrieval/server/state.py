"""The controller's durable state, so that a restarted controller carries on where the last one stopped.

    <state dir>/state.json               topology: versions (snapshot, replica names), primary, canary,
                                         previous, generation, replica sets to tear down, recent results
    <state dir>/log/<nonce>/base.json    a compacted version's inherited write times and update ids
    <state dir>/log/<nonce>/<epoch>.npz  one update epoch: gids, vectors, and a JSON record (rows, deletes, ts)

Every file is written to a temp file, synced and renamed into place, so a crash leaves the old file or
the new one. An epoch file is written before any replica applies the epoch (a write-ahead log).
No pickle: JSON and numpy arrays only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ragdist.index.snapshot import atomic_write_bytes, atomic_write_text

STATE = "state.json"
FORMAT = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    _fsync_dir(path.parent)  # the rename itself survives a crash too


class ServiceStore:
    """Reads and writes one service's state directory (on storage every controller node can reach)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ topology
    def read(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.root / STATE).read_text())
        except FileNotFoundError:
            return None
        if state.get("format") != FORMAT:
            raise ValueError(f"{self.root / STATE}: unknown format {state.get('format')!r}")
        return state

    def write(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / STATE, json.dumps({**state, "format": FORMAT}, sort_keys=True))
        _fsync_dir(self.root)

    def reset(self) -> None:
        """Forget everything (a new service of this name starts)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def clean_temp(self) -> int:
        """Remove temp files a crash left half-written (never renamed into place); returns how many."""
        gone = 0
        for f in self.root.rglob(".*"):
            if f.is_file():
                f.unlink(missing_ok=True)
                gone += 1
        return gone

    def remove(self) -> None:
        """The service stopped: nothing to recover (the default <root>/_service/<namespace> goes too if empty)."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.parent.parent.name == "_service":
            for d in (self.root.parent, self.root.parent.parent):
                try:
                    d.rmdir()
                except OSError:  # not empty: other services keep their state there
                    break

    # ------------------------------------------------------------------ update log
    def _log(self, nonce: str) -> Path:
        return self.root / "log" / nonce

    def write_base(self, nonce: str, base: dict[str, Any]) -> None:
        d = self._log(nonce)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "base.json", json.dumps(base))
        _fsync_dir(d)

    def read_base(self, nonce: str) -> dict[str, Any]:
        try:
            return json.loads((self._log(nonce) / "base.json").read_text())
        except FileNotFoundError:
            return {}

    def append(self, nonce: str, epoch: int, record: dict[str, Any], gids: np.ndarray, vectors: np.ndarray) -> None:
        """Write one epoch durably (before any replica applies it)."""
        import io

        d = self._log(nonce)
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, gids=np.asarray(gids, np.int64), vectors=np.asarray(vectors, np.float32),
                 record=np.array(json.dumps(record)))  # fmt: skip
        _atomic_write_bytes(d / f"{epoch:010d}.npz", buf.getvalue())

    def epochs(self, nonce: str) -> list[tuple[int, dict[str, Any], np.ndarray, np.ndarray]]:
        """The logged epochs in order, up to the first gap: (epoch, record, gids, vectors)."""
        d = self._log(nonce)
        if not d.is_dir():
            return []
        out = []
        for f in sorted(d.glob("[0-9]*.npz")):
            epoch = int(f.stem)
            if epoch != len(out) + 1:
                break
            with np.load(f, allow_pickle=False) as z:
                out.append((epoch, json.loads(str(z["record"])), z["gids"], z["vectors"]))
        return out

    def drop_log(self, nonce: str) -> None:
        shutil.rmtree(self._log(nonce), ignore_errors=True)

    def log_files(self, nonce: str) -> int:
        d = self._log(nonce)
        return len(list(d.glob("[0-9]*.npz"))) if d.is_dir() else 0
