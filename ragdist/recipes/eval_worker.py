"""One evaluation rank spawned by ragdist-eval / ragdist-train (eval.nproc > 1):
`python -m ragdist.recipes.eval_worker RESOLVED.yaml REQUEST.json`.

Every rank generates its share of each row's answers; rank 0 retrieves and writes the report.
Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ragdist import distributed as rdist
from ragdist.config import as_object, load_resolved
from ragdist.errors import RagdistError
from ragdist.recipes.common import setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m ragdist.recipes.eval_worker RESOLVED_CONFIG.yaml REQUEST.json", file=sys.stderr)
        return 2
    import torch

    from ragdist.recipes.evaluate import evaluate_checkpoints

    cfg = load_resolved(argv[0])
    request = json.loads(Path(argv[1]).read_text())
    rank, _ = rdist.init_process_group()
    setup_logging(rank)
    torch.set_num_threads(max(1, cfg.trainer.omp_threads))
    try:
        embedder = None
        if rank == 0:  # rank 0 alone queries the retrieval service
            from ragdist.embed import build_embedder

            emb_cfg = as_object(cfg.embedder)
            emb_cfg.progress = False
            embedder = build_embedder(emb_cfg)
        evaluate_checkpoints(cfg, request["checkpoints"], embedder, base=request["base"])
    except RagdistError as e:
        print(f"ragdist: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        rdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
