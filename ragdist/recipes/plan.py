"""ragdist-plan: what the configured index needs — bytes per vector, memory per shard / actor / GPU /
node, build time, a search-latency estimate — and a refusal naming the constraint when it cannot fit.

    ragdist-plan                                     # the configured corpus (chunks counted), index, service
    ragdist-plan +experiment=plan_1b                 # 1B passages, IVF-PQ, 1,000 GPUs (docs/scale.md)
    ragdist-plan plan.passages=50000000 plan.dim=384 index.factory=IVF16384,PQ48 index.num_shards=8 plan.gpus=8

Prints a table, then the plan as one JSON object (the last line of stdout); exits 2 when it does not fit.
"""

from __future__ import annotations

import json
from typing import Any

import hydra
from omegaconf import DictConfig

from ragdist.config import as_object, conf_dir, register_configs
from ragdist.errors import ConfigError
from ragdist.index.capacity import count_chunks, make_plan, table
from ragdist.index.snapshot import atomic_write_text
from ragdist.recipes.common import cli, resolve_data_paths, setup_logging

DEFAULT_PASSAGE_BYTES = 300.0  # text + title + ids of one chunk, when no corpus is read


@cli
def run(cfg: DictConfig) -> dict[str, Any]:
    setup_logging()
    p = as_object(cfg.plan)
    passages, dim, passage_bytes = int(p.passages), int(p.dim), float(p.passage_bytes)
    if passages <= 0 or dim <= 0:
        from ragdist.embed import build_embedder

        embedder = build_embedder(as_object(cfg.embedder))
        dim = dim or int(embedder.dim)
        if passages <= 0:
            resolve_data_paths(cfg)
            passages, measured, _ = count_chunks(as_object(cfg.corpus), embedder.tokenizer, p.sample_docs)
            passage_bytes = passage_bytes or measured
    gpus = int(p.gpus)
    workers = int(p.build_workers or cfg.index.build.workers or gpus or 1)
    plan = make_plan(
        p,
        factory=cfg.index.factory,
        shards=int(cfg.index.num_shards),
        replicas=int(cfg.retrieval.replicas),
        shards_per_gpu=int(cfg.retrieval.shards_per_gpu),
        nprobe=int(cfg.retrieval.nprobe or cfg.index.nprobe),
        store_vectors=cfg.index.store_vectors,
        passages=passages,
        dim=dim,
        passage_bytes=passage_bytes or DEFAULT_PASSAGE_BYTES,
        build_workers=workers,
        train_sample=int(cfg.index.train_sample),
    )
    print(table(plan))
    print(json.dumps(plan), flush=True)
    if p.json_out:
        atomic_write_text(p.json_out, json.dumps(plan, indent=2))
    if not plan["fits"]:
        raise ConfigError("the plan does not fit: " + "; ".join(plan["violations"]))
    return plan


register_configs()
main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run)

if __name__ == "__main__":
    main()
