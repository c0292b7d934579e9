"""ragdist-eval: evaluate checkpoints on held-out questions, with retrieval and closed book.

    ragdist-eval eval.run_dir=runs/2026-11-25_10-00-00          # a finished ragdist-train run
    ragdist-eval eval.checkpoint=/path/to/model retrieval.top_k=5
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ragdist.config import as_object, conf_dir, load_resolved, register_configs
from ragdist.errors import ConfigError
from ragdist.recipes.common import cli, load_qa_splits, log, setup_logging


def evaluate_checkpoints(cfg: DictConfig, ckpts: dict[str, str], embedder: Any | None) -> dict[str, Any]:
    """Evaluate each named checkpoint: `closed_book` without passages, anything else with top-k."""
    from ragdist.eval.report import table, write_report
    from ragdist.eval.runner import evaluate_model
    from ragdist.retrieval.client import RetrievalClient
    from ragdist.train.model import load_generator

    _, evals = load_qa_splits(cfg)
    retrieve = None
    if any(name != "closed_book" for name in ckpts):
        retrieve = RetrievalClient(as_object(cfg.retrieval), embedder=embedder).retrieve
    results, predictions = {}, {}
    for name, path in ckpts.items():
        model, tokenizer = load_generator(path)
        k = 0 if name == "closed_book" else cfg.retrieval.top_k
        out = evaluate_model(model, tokenizer, evals, top_k=k, retrieve=retrieve, cfg=as_object(cfg.eval))
        results[name] = out["metrics"]
        predictions[name] = out["rows"]
        log.info("eval %s: EM %.3f F1 %.3f", name, out["metrics"]["em"], out["metrics"]["f1"])
    run_dir = Path(cfg.run_dir)
    training = {}
    for name in ckpts:
        f = run_dir / f"train_{name}.json"
        if f.is_file():
            s = json.loads(f.read_text())
            s.pop("history", None)
            training[name] = s
    for name, rows in predictions.items():
        with open(run_dir / f"predictions_{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    report = write_report(
        run_dir,
        results,
        {"training": training, "index_snapshot": cfg.index.snapshot, "eval_file": cfg.data.eval},
    )
    print("\n" + table(results) + "\n", flush=True)
    print(f"report: {run_dir / 'report.md'}", flush=True)
    return report


@cli
def run(cfg: DictConfig) -> dict[str, Any]:
    from ragdist.embed import build_embedder
    from ragdist.retrieval.client import start_service, stop_service
    from ragdist.recipes.common import build_or_reuse_index, resolve_data_paths

    setup_logging()
    if cfg.eval.run_dir:
        prev = Path(cfg.eval.run_dir)
        if not (prev / "resolved.yaml").is_file():
            raise ConfigError(f"eval.run_dir={str(prev)!r}: not a ragdist-train run (no resolved.yaml)")
        saved = load_resolved(prev / "resolved.yaml")
        saved.eval = cfg.eval
        saved.run_dir = str(prev)
        saved.retrieval.address = cfg.retrieval.address
        cfg = saved
        ckpts = {v: str(prev / "checkpoints" / v) for v in cfg.trainer.variants}
    elif cfg.eval.checkpoint:
        ckpts = {"rag": cfg.eval.checkpoint, "closed_book": cfg.eval.checkpoint}
    else:
        raise ConfigError("set eval.run_dir=<a ragdist-train run> or eval.checkpoint=<a model dir>")
    for name, path in ckpts.items():
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"checkpoint for {name!r} not found: {path}")
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    resolve_data_paths(cfg)
    embedder = build_embedder(as_object(cfg.embedder))
    snapshot = build_or_reuse_index(cfg, embedder)
    cfg.index.snapshot = str(snapshot)
    start_service(str(snapshot), as_object(cfg.retrieval))
    try:
        return evaluate_checkpoints(cfg, ckpts, embedder)
    finally:
        stop_service(as_object(cfg.retrieval))


register_configs()
main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run)

if __name__ == "__main__":
    main()
