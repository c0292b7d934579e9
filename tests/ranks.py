"""Test programs that run as 2 real ranks: `python tests/test_x.py --worker OUT.json` is the rank
program, launched through `launch_local`; the tests read what it wrote.

A rank that raises writes its traceback beside OUT.json, and the launch's assertion carries it: a
log that keeps only the tail of a failed run still says which rank failed and why.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_worker_ranks(test_file: str | Path, out: Path, nproc: int = 2) -> Any:
    """Launch `test_file --worker out` as `nproc` CPU ranks over gloo; return the JSON it wrote."""
    from ragdist.distributed import launch_local

    # CPU ranks even where a GPU exists (two ranks cannot share one GPU under NCCL)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    rc = launch_local([sys.executable, str(Path(test_file).resolve()), "--worker", str(out)], nproc, env=env)
    failed = "".join(f"\n--- {p.name}:\n{p.read_text()[-3000:]}" for p in sorted(out.parent.glob("rank*.traceback")))
    assert rc == 0, f"{Path(test_file).name}: ranks failed with status {rc}{failed}"
    return json.loads(out.read_text())


def worker_main(worker: Callable[[str], None]) -> None:
    """The `__main__` of a rank program: run `worker(OUT.json)`, keeping a failed rank's traceback."""
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        print(f"usage: python {sys.argv[0]} --worker OUT.json", file=sys.stderr)
        sys.exit(2)
    out = Path(sys.argv[2])
    try:
        worker(str(out))
    except BaseException:
        (out.parent / f"rank{os.environ.get('RANK', '?')}.traceback").write_text(traceback.format_exc())
        raise
