"""Versioned snapshot directories: written atomically, verified by checksum, safe to load.

Layout: <root>/<version>/{manifest.json, shard_0000.faiss, shard_0000.parquet, ...} and
<root>/LATEST naming the newest complete version. A version directory only appears by rename
after every file in it was written, so a crash never leaves a snapshot a later run would trust.
Nothing here unpickles: FAISS binary, Parquet and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ragdist.data.corpus import file_digest
from ragdist.errors import IndexError_

MANIFEST = "manifest.json"
LATEST = "LATEST"
FORMAT = 1


def new_version_name() -> str:
    return time.strftime("v%Y%m%d-%H%M%S") + f"-{uuid.uuid4().hex[:6]}"


def safe_member(snapshot: Path, name: str) -> Path:
    """A file named by a manifest must be a plain name inside the snapshot directory."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise IndexError_(f"{snapshot / MANIFEST}: file name {name!r} is not a plain file name")
    p = (snapshot / name).resolve()
    if p.parent != snapshot.resolve():
        raise IndexError_(f"{snapshot / MANIFEST}: file {name!r} escapes the snapshot directory")
    return p


class SnapshotWriter:
    """Context manager: files go to a hidden temp dir under root, renamed into place on success."""

    def __init__(self, root: str | Path, version: str | None = None):
        self.root = Path(root)
        self.version = version or new_version_name()
        self.tmp: Path | None = None

    def __enter__(self) -> SnapshotWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / self.version).exists():
            raise IndexError_(f"{self.root / self.version}: snapshot version already exists")
        self.tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{self.version}-"))
        return self

    def path(self, name: str) -> Path:
        assert self.tmp is not None
        return self.tmp / name

    def commit(self, manifest: dict[str, Any], digests: dict[str, str] | None = None) -> Path:
        """Checksum every file, write the manifest, rename into place, point LATEST at it.

        `digests` (name -> sha256) lets writers that ran in parallel elsewhere (the distributed
        build's shard tasks) hand in the checksums they computed, instead of one process reading
        every byte again.
        """
        assert self.tmp is not None
        files = manifest.setdefault("files", {})
        for f in sorted(self.tmp.iterdir()):
            if f.name != MANIFEST:
                known = (digests or {}).get(f.name)
                files[f.name] = {"sha256": known or file_digest(f), "bytes": f.stat().st_size}
        manifest.update(format=FORMAT, version=self.version, created=time.time())
        atomic_write_text(self.tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        for f in self.tmp.iterdir():
            _fsync_file(f)
        final = self.root / self.version
        os.rename(self.tmp, final)
        _fsync_dir(self.root)
        self.tmp = None
        set_latest(self.root, self.version)
        return final

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_file(p: Path) -> None:
    with open(p, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def set_latest(root: str | Path, version: str) -> None:
    atomic_write_text(Path(root) / LATEST, version + "\n")


def list_versions(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def resolve(path: str | Path, version: str | None = None) -> Path:
    """`path` is a snapshot dir (has a manifest) or a root holding versions (LATEST or `version`)."""
    p = Path(path)
    if (p / MANIFEST).is_file() and version is None:
        return p
    if version is not None:
        if "/" in version or version.startswith("."):
            raise IndexError_(f"snapshot version {version!r} is not a version name")
        cand = p / version
        if not (cand / MANIFEST).is_file():
            raise IndexError_(f"{p}: unknown snapshot version {version!r}; have {list_versions(p)}")
        return cand
    latest = p / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        cand = p / name
        if (cand / MANIFEST).is_file():
            return cand
    versions = list_versions(p)
    if not versions:
        raise IndexError_(f"{p}: no index snapshot here (run ragdist-index first)")
    return p / versions[-1]


def read_manifest(snapshot: str | Path) -> dict[str, Any]:
    snapshot = Path(snapshot)
    mpath = snapshot / MANIFEST
    if not mpath.is_file():
        raise IndexError_(f"{snapshot}: not a snapshot (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexError_(f"{mpath}: corrupted manifest ({e})") from None
    for key in ("format", "dim", "num_shards", "shards", "files", "factory"):
        if key not in manifest:
            raise IndexError_(f"{mpath}: manifest lacks {key!r}")
    if manifest["format"] != FORMAT:
        raise IndexError_(f"{mpath}: snapshot format {manifest['format']} is not supported (want {FORMAT})")
    for name in manifest["files"]:
        safe_member(snapshot, name)
    return manifest


def verify_file(snapshot: str | Path, manifest: dict[str, Any], name: str) -> Path:
    """Checksum one file against the manifest before anything reads it."""
    snapshot = Path(snapshot)
    p = safe_member(snapshot, name)
    info = manifest["files"].get(name)
    if info is None:
        raise IndexError_(f"{snapshot / MANIFEST}: no checksum recorded for {name!r}")
    if not p.is_file():
        raise IndexError_(f"{p}: missing from snapshot {manifest.get('version')}")
    if p.stat().st_size != info["bytes"] or file_digest(p) != info["sha256"]:
        raise IndexError_(f"{p}: checksum mismatch — the snapshot file is corrupted")
    return p


def restore(root: str | Path, version: str) -> Path:
    """Make an older complete version the LATEST again, after checking every file's checksum."""
    path = resolve(root, version)
    manifest = read_manifest(path)
    for name in manifest["files"]:
        verify_file(path, manifest, name)
    set_latest(root, version)
    return path
