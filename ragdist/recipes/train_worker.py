"""One training rank spawned by ragdist-train: `python -m ragdist.recipes.train_worker RESOLVED.yaml`.

Exit status: 0 done, 2 bad input, 75 (REQUEUE_EXIT_CODE) preempted after a checkpoint.
"""

from __future__ import annotations

import sys

from ragdist.config import load_resolved
from ragdist.errors import RagdistError
from ragdist.recipes.common import setup_logging
from ragdist.recipes.finetune import train_all
from ragdist.utils import dist as rdist


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ragdist.recipes.train_worker RESOLVED_CONFIG.yaml", file=sys.stderr)
        return 2
    from ragdist.train.preempt import REQUEUE_EXIT_CODE, Preempted

    cfg = load_resolved(argv[0])
    rank, _ = rdist.init_process_group()
    setup_logging(rank)
    try:
        train_all(cfg)
    except Preempted as e:
        print(f"ragdist: rank {rank}: {e}", file=sys.stderr, flush=True)
        return REQUEUE_EXIT_CODE
    except RagdistError as e:
        print(f"ragdist: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        rdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
