"""ragdist-eval: fine-tune only vs RAG at inference vs RAG fine-tuned (vs joint), in one command.

    ragdist-eval eval.compare=true                                  # train the missing rows, compare all
    ragdist-eval +experiment=tiny eval.compare=true logger=wandb    # the tests' sample; wandb offline
    ragdist-eval eval.run_dir=runs/2026-11-25_10-00-00             # a finished ragdist-train run
    ragdist-eval eval.run_dir=runs/A eval.joint_run=runs/J          # add a joint-retriever row
    ragdist-eval eval.checkpoint=/path/to/model retrieval.top_k=5   # one model, with and without retrieval
    ragdist-eval eval.retrieval_only=true data.max_eval=null        # dense / BM25 / hybrid only, no generator

Writes report.md, report.json, plots/*.png and predictions_<row>.jsonl to the run directory, and
logs the same figures through the configured logger (logger=wandb: offline unless logger.mode=online).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ragdist.config import as_object, conf_dir, load_resolved, register_configs
from ragdist.errors import ConfigError, RagdistError
from ragdist.recipes.common import cli, dump_config, load_qa_file, load_qa_splits, log, setup_logging

TRAINABLE = ("rag", "closed_book")


def run_checkpoints(cfg: DictConfig, run_dir: str | Path) -> dict[str, str]:
    """The generator checkpoints a training run with this config writes: one per variant (the
    retriever-only variant has none), plus the reader's pretext stage (`trainer.pretext.steps` > 0,
    before `rag`) when it has been exported."""
    run_dir = Path(run_dir)
    ckpts = {v: str(run_dir / "checkpoints" / v) for v in cfg.trainer.variants if v != "retriever"}
    pretext = run_dir / "checkpoints" / "pretext"
    if "rag" in cfg.trainer.variants and cfg.trainer.pretext.steps > 0 and (pretext / "config.json").is_file():
        ckpts["pretext"] = str(pretext)
    return ckpts


def _base_description(cfg: DictConfig) -> str:
    m = cfg.model
    if m.name_or_path:
        return f"`{m.name_or_path}`"
    return (
        f"{m.arch} {m.hidden_size}×{m.num_layers} built from config (random init, seed {m.seed}; "
        "the base_rag row is the untrained floor)"
    )


def step_notes(steps: dict[str, Any]) -> list[str]:
    """A note when the compared rows trained for different numbers of steps (the reader's pretext
    stage comes before `rag`'s own steps and is not one of them)."""
    compared = {n: s for n, s in steps.items() if n != "pretext"}
    if len(set(compared.values())) > 1:
        return [f"rows were trained for different numbers of steps: {compared}"]
    return []


def _base_tokenizer(cfg: DictConfig) -> Any:
    """The base model's tokenizer (a generator built from config: its BPE, trained or reused)."""
    from ragdist.recipes.common import tokenizer_data
    from ragdist.train.model import load_tokenizer

    return load_tokenizer(as_object(cfg.model), tokenizer_data(cfg))


def _answer_tokenizer(cfg: DictConfig, ckpts: dict[str, str]) -> Any:
    """The tokenizer the rows generate with: a checkpoint's own (saved beside it), else the base model's."""
    for path in ckpts.values():
        if (Path(path) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
    return _base_tokenizer(cfg)


def _model_loader(cfg: DictConfig) -> Any:
    from ragdist.eval.compare import BASE
    from ragdist.train.model import build_generator, load_generator

    def load(ref: str) -> tuple[Any, Any]:
        if ref == BASE:
            tokenizer = _base_tokenizer(cfg)
            return build_generator(as_object(cfg.model), tokenizer).eval(), tokenizer
        return load_generator(ref, dtype=cfg.model.dtype, attn=cfg.model.attn_implementation)

    return load


def _training(run_dir: Path, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        f = run_dir / f"train_{name}.json"
        if f.is_file():
            s = json.loads(f.read_text())
            s.pop("history", None)
            out[name] = s
    return out


def _write_predictions(run_dir: Path, predictions: dict[str, list[dict[str, Any]]]) -> None:
    from ragdist.eval.report import clean
    from ragdist.index.snapshot import atomic_write_text

    for name, rows in predictions.items():
        text = "".join(json.dumps(clean(r), ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(run_dir / f"predictions_{name}.jsonl", text)


def _log(cfg: DictConfig, report: dict[str, Any], plots: list[Path]) -> str | None:
    from ragdist.eval.report import HEADER
    from ragdist.utils.logger import RunLogger, flatten_metrics

    lcfg = as_object(cfg.logger)
    lcfg = dataclasses.replace(lcfg, name=lcfg.name or f"{Path(cfg.run_dir).name}-eval")
    logger = RunLogger(lcfg, cfg.run_dir, config=OmegaConf.to_container(cfg, resolve=True))
    try:
        flat = flatten_metrics(
            {
                "eval": report["results"],
                "retrieval": {
                    n: {**r["metrics"], "batched_retrieval_s_per_q": r.get("batched_retrieval_s_per_q")}
                    for n, r in report.get("retrieval", {}).items()
                },
            }
        )
        logger.log(flat)
        logger.summary(flat)
        columns = [c.strip() for c in HEADER.strip("|").split("|")]
        rows = []
        for name, m in report["results"].items():
            k = m.get("top_k") or 0
            rows.append(
                [
                    report["strategies"][name]["label"],
                    m.get("em"),
                    m.get("f1"),
                    m.get("faithfulness"),
                    m.get("hallucination"),
                    m.get(f"recall@{k}") if k else None,
                    (m.get("e2e_latency_s") or {}).get("p50"),
                    m.get("tokens_per_q"),
                ]
            )
        logger.log_table("eval/comparison", columns, rows)
        logger.log_images({f"eval/plots/{p.stem}": p for p in plots})
        return logger.run_path
    finally:
        logger.finish()


def evaluate_checkpoints(
    cfg: DictConfig, ckpts: dict[str, str], embedder: Any | None, *, base: bool = True
) -> dict[str, Any]:
    """Every comparison row that `ckpts` (+ the base model, + eval.joint_run) allows, on the held-out
    questions; writes report.md / report.json / plots / predictions to cfg.run_dir. The retrieval
    service for cfg.index.snapshot must be running.

    Under a process group every rank calls this and generates its share; rank 0 reports (the
    others return {}). Outside one, with eval.nproc > 1, it runs on that many spawned ranks."""
    from ragdist.data.qa import check_disjoint, check_gold_ids
    from ragdist.eval.generation import BUDGET_MARGIN, answer_budget, is_main, world

    if cfg.eval.nproc > 1 and world()[1] == 1:
        return spawn_eval_ranks(cfg, ckpts, base=base)
    from ragdist.eval.compare import BASE, ServiceRetriever, plan, resolve_joint, run_comparison
    from ragdist.eval.faithfulness import build_scorer
    from ragdist.eval.plots import write_plots
    from ragdist.eval.report import clean, table, write_report
    from ragdist.eval.robustness import load_passage_pool
    from ragdist.index.reader import iter_passage_ids

    train, evals = load_qa_splits(cfg)  # also refuses eval questions that appear in training
    ecfg = as_object(cfg.eval)
    evals = evals[: ecfg.max_questions] if ecfg.max_questions else evals
    budget = answer_budget(_answer_tokenizer(cfg, ckpts), train, evals, ecfg.max_new_tokens)
    ecfg = dataclasses.replace(ecfg, max_new_tokens=budget.tokens)
    check_gold_ids(evals, iter_passage_ids(cfg.index.snapshot), cfg.data.eval)
    run_dir = Path(cfg.run_dir)
    joint = None
    if ecfg.joint_run and "joint" in ecfg.strategies:
        joint = resolve_joint(ecfg, as_object(cfg.embedder))
        if joint.train_file and Path(joint.train_file).exists():
            check_disjoint(load_qa_file(cfg, joint.train_file), evals, joint.train_file, cfg.data.eval)
    strategies = plan(
        ckpts, wanted=ecfg.strategies, base=base, joint_checkpoint=joint.checkpoint if joint else None
    )
    fmt = as_object(cfg.trainer.examples)
    for s in strategies:
        s.fmt = joint.fmt if (s.name == "joint" and joint is not None and joint.fmt is not None) else fmt
        if s.model == BASE and not cfg.model.name_or_path:
            # Random weights: top-k and robustness curves of an untrained model measure noise, at the
            # highest generation cost (it never stops early), so that row gets the main figures only.
            s.checks = False
    if not strategies:
        raise ConfigError(
            f"nothing to evaluate: eval.strategies={ecfg.strategies} with checkpoints {sorted(ckpts)}"
        )
    log.info("eval: %d questions, rows %s, answers of up to %d tokens%s", len(evals), [s.name for s in strategies],
             budget.tokens, "" if cfg.eval.max_new_tokens else f" (longest training answer {budget.longest})")
    if budget.over:
        log.warning("eval: %d of %d eval answers are longer than eval.max_new_tokens=%d tokens: no row can "
                    "get them right", budget.over, budget.questions, budget.tokens)

    retrievers: dict[str, Any] = {}
    pools: dict[str, Any] = {}
    owned = []
    try:
        # Rank 0 retrieves (and serves the joint snapshot); every rank builds the same distractor pool.
        if any(s.retriever == "main" for s in strategies):
            if is_main():
                retrievers["main"] = ServiceRetriever(as_object(cfg.retrieval), embedder)
            if ecfg.distractor_source == "random":
                pools["main"] = load_passage_pool(cfg.index.snapshot, seed=ecfg.seed)
        if joint is not None:
            if is_main():
                retrievers["joint"] = _joint_retriever(cfg, joint, owned)
            if ecfg.distractor_source == "random":
                pools["joint"] = load_passage_pool(joint.snapshot, seed=ecfg.seed)
        out = run_comparison(
            strategies,
            evals,
            cfg=ecfg,
            top_k=cfg.retrieval.top_k,
            retrievers=retrievers,
            load_model=_model_loader(cfg),
            pools=pools,
            nli=build_scorer(ecfg),
        )
    finally:
        for rcfg in owned:
            _stop_quietly(rcfg)
    if not is_main():
        return {}

    training = _training(run_dir, [v for v in ("pretext", *TRAINABLE) if v in ckpts])
    if joint is not None and joint.training:
        training["joint"] = joint.training
    steps = {n: s.get("steps") for n, s in training.items()}
    notes = step_notes(steps)
    if budget.over:
        notes.append(f"{budget.over} of {budget.questions} eval answers are longer than eval.max_new_tokens="
                     f"{budget.tokens} tokens: no row can get them right")
    setup = {
        "questions": len(evals),
        "eval_file": cfg.data.eval,
        "train_file": cfg.data.train,
        "base_model": _base_description(cfg),
        "top_k": cfg.retrieval.top_k,
        "max_new_tokens": ecfg.max_new_tokens,
        "max_new_tokens_from": "eval.max_new_tokens" if cfg.eval.max_new_tokens else
        f"the longest training answer ({budget.longest} tokens) × {BUDGET_MARGIN}",
        "answers_over_budget": budget.over,
        "max_prompt_len": ecfg.max_prompt_len,
        "index_snapshot": cfg.index.snapshot,
        "distractor_source": ecfg.distractor_source,
        "nli_model": ecfg.nli_model,
        "latency_samples": ecfg.latency_samples,
        "steps": steps,
    }
    if joint is not None:
        setup["joint"] = {
            "run": joint.run_dir,
            "checkpoint": joint.checkpoint,
            "snapshot": joint.snapshot,
            "encoder": joint.encoder.name,
        }
    joint_runs = [("this run", run_dir)] + ([("joint run", Path(joint.run_dir))] if joint is not None else [])
    joint_retriever = {
        name: json.loads((d / "joint_report.json").read_text())
        for name, d in joint_runs
        if (d / "joint_report.json").is_file()
    }
    extra = {
        "joint_retriever": joint_retriever,
        "strategies": out["strategies"],
        "setup": setup,
        "retrieval": out["retrieval"],
        "latency_samples": out["latency_samples"],
        "training": training,
        "notes": notes,
        "index_snapshot": cfg.index.snapshot,
        "eval_file": cfg.data.eval,
    }
    _write_predictions(run_dir, out["predictions"])
    report = clean({"results": out["results"], **extra})
    plots = write_plots(report, run_dir / "plots") if ecfg.plots else []
    report["plots"] = [str(p.relative_to(run_dir)) for p in plots]
    report = write_report(run_dir, report.pop("results"), report)
    wandb_dir = _log(cfg, report, plots)
    if wandb_dir:
        log.info("wandb run files: %s", wandb_dir)
    labels = {n: s["label"] for n, s in out["strategies"].items()}
    print("\n" + table(report["results"], labels) + "\n", flush=True)
    print(f"report: {run_dir / 'report.md'}", flush=True)
    return report


def spawn_eval_ranks(cfg: DictConfig, ckpts: dict[str, str], *, base: bool) -> dict[str, Any]:
    """`evaluate_checkpoints` on eval.nproc ranks of this node (ragdist.recipes.eval_worker); the report they wrote."""
    from ragdist import distributed as rdist

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "eval_resolved.yaml")
    request = run_dir / "eval_request.json"
    request.write_text(json.dumps({"checkpoints": ckpts, "base": base}))
    cmd = [sys.executable, "-m", "ragdist.recipes.eval_worker", str(run_dir / "eval_resolved.yaml"), str(request)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.trainer.omp_threads), PYTHONUNBUFFERED="1")
    log.info("eval: %d ranks", cfg.eval.nproc)
    rc = rdist.launch_local(cmd, cfg.eval.nproc, env=env, master_port=cfg.trainer.master_port)
    if rc != 0:
        raise RagdistError(f"evaluation ranks failed (exit status {rc}); see the log above")
    return json.loads((run_dir / "report.json").read_text())


def _joint_retriever(cfg: DictConfig, joint: Any, owned: list[Any]) -> Any:
    """Serve the joint run's snapshot under its own service name, queried with its own encoder."""
    from ragdist.embed import build_embedder
    from ragdist.eval.compare import ServiceRetriever
    from ragdist.index.snapshot import read_manifest
    from ragdist.recipes.common import check_embedder_matches
    from ragdist.retrieval.client import start_service

    encoder = build_embedder(joint.encoder)
    manifest = read_manifest(joint.snapshot)
    check_embedder_matches(manifest, encoder)
    paired = manifest.get("embedder") or None
    if paired and paired != encoder.name:
        # The joint run trained this query encoder against these passages (side=query leaves the
        # passage side, and so the snapshot's vectors, as they were): the run vouches for the pair.
        log.info("joint row: queries encoded by %s against passages embedded by %s", encoder.name, paired)
    rcfg = dataclasses.replace(as_object(cfg.retrieval), service_name=f"{cfg.retrieval.service_name}-joint")
    start_service(joint.snapshot, rcfg)
    owned.append(rcfg)
    return ServiceRetriever(rcfg, encoder, index_embedder=paired)


def _stop_quietly(rcfg: Any) -> None:
    """Stop a service we started without hiding the error that got us here (a dead Ray node would
    otherwise replace a clear RetrievalError with a Ray traceback)."""
    from ragdist.retrieval.client import stop_service

    try:
        stop_service(rcfg)
    except Exception as e:  # cleanup must not mask the original outcome
        log.warning("could not stop retrieval service %r: %s", rcfg.service_name, str(e).splitlines()[0])


def _from_run(cfg: DictConfig) -> tuple[DictConfig, dict[str, str]]:
    """The finished run's own config (same data, model, top-k), with this command's eval and logger."""
    prev = Path(cfg.eval.run_dir)
    if not (prev / "resolved.yaml").is_file():
        raise ConfigError(f"eval.run_dir={str(prev)!r}: not a ragdist-train run (no resolved.yaml)")
    saved = load_resolved(prev / "resolved.yaml")
    saved.eval = cfg.eval
    saved.logger = cfg.logger
    saved.run_dir = str(prev)
    saved.retrieval.address = cfg.retrieval.address
    saved.retrieval.service_name = cfg.retrieval.service_name
    ckpts = run_checkpoints(saved, prev)
    return saved, {
        v: p for v, p in ckpts.items() if (Path(p) / "config.json").is_file() or not cfg.eval.compare
    }


def _needed(strategies: list[str]) -> list[str]:
    need = []
    if "rag" in strategies:
        need.append("rag")
    if "closed_book" in strategies or "closed_book_rag" in strategies:
        need.append("closed_book")
    return need


def train_missing(cfg: DictConfig, missing: list[str]) -> dict[str, str]:
    """Train the rows that have no checkpoint with the training recipe (same data, model, steps)."""
    from ragdist.recipes.training import launch_training

    had = [
        v
        for v in cfg.trainer.variants
        if v not in missing and (Path(cfg.run_dir) / "checkpoints" / v).is_dir()
    ]
    cfg.trainer.variants = list(missing)
    log.info("compare: training %s (%d steps each)", missing, cfg.trainer.max_steps)
    launch_training(cfg)
    # Record every variant the run now holds, so `eval.run_dir=<this run>` finds them all.
    cfg.trainer.variants = [v for v in TRAINABLE if v in had or v in missing]
    dump_config(cfg, Path(cfg.run_dir) / "resolved.yaml")
    trained = run_checkpoints(cfg, cfg.run_dir)
    return {v: p for v, p in trained.items() if v in missing or (v == "pretext" and "rag" in missing)}


def retrieval_only(cfg: DictConfig) -> dict[str, Any]:
    """eval.retrieval_only=true: every retrieval mode on the eval questions (ragdist/eval/retrieval_eval.py)."""
    import time

    from ragdist.embed import build_embedder
    from ragdist.eval.retrieval_eval import evaluate_retrieval, markdown, write_retrieval_report
    from ragdist.index.snapshot import read_manifest
    from ragdist.recipes.common import build_or_reuse_index, check_embedder_matches, resolve_data_paths
    from ragdist.retrieval.client import start_service
    from ragdist.retrieval.select import variant

    t0 = time.perf_counter()
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    resolve_data_paths(cfg)
    train, evals = load_qa_splits(cfg)
    evals = evals[: cfg.eval.max_questions] if cfg.eval.max_questions else evals
    embedder = build_embedder(as_object(cfg.embedder))
    snapshot = build_or_reuse_index(cfg, embedder)
    manifest = read_manifest(snapshot)
    check_embedder_matches(manifest, embedder)
    rcfg = as_object(cfg.retrieval)
    start_service(str(snapshot), variant(rcfg, "hybrid"))  # hybrid: the shards build BM25 as they load
    try:
        report = evaluate_retrieval(rcfg, embedder, evals, train, ks=list(cfg.eval.recall_ks),
                                    batch_size=cfg.eval.retrieval_batch_size)
    finally:
        _stop_quietly(rcfg)
    report["setup"].update(eval_file=cfg.data.eval, train_file=cfg.data.train, index_snapshot=str(snapshot),
                           passages=manifest.get("num_chunks"), command_s=time.perf_counter() - t0)
    report = write_retrieval_report(cfg.run_dir, report, plots=cfg.eval.plots)
    print("\n" + markdown(report), flush=True)
    print(f"report: {Path(cfg.run_dir) / 'report.md'}", flush=True)
    return report


class EvaluateRecipe:
    """setup (checkpoints, data, index, service) → train (the rows that have no checkpoint, with
    eval.compare=true) → evaluate → cleanup."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.base = True
        self.ckpts: dict[str, str] = {}
        self.missing: list[str] = []
        self.embedder: Any = None
        self.rcfg: Any = None

    def setup(self) -> None:
        from ragdist.embed import build_embedder
        from ragdist.index.snapshot import read_manifest
        from ragdist.prompts import reader_mismatch
        from ragdist.recipes.common import (
            build_or_reuse_index,
            check_embedder_matches,
            resolve_data_paths,
            tokenizer_data,
        )
        from ragdist.retrieval.client import start_service
        from ragdist.retrieval.select import resolve_mode
        from ragdist.train.model import load_tokenizer

        cfg = self.cfg
        if cfg.eval.run_dir:
            cfg, self.ckpts = _from_run(cfg)
        elif cfg.eval.checkpoint:
            self.ckpts = {"rag": cfg.eval.checkpoint, "closed_book": cfg.eval.checkpoint}
            fixes = reader_mismatch(cfg.eval.checkpoint, cfg.trainer.examples, cfg.retrieval.top_k)
            if fixes:
                log.warning("eval.checkpoint=%s was trained to read its passages another way than this config "
                            "says; to evaluate it as trained, add: %s", cfg.eval.checkpoint, " ".join(fixes))
            # Without the model it started from, a lone checkpoint has no base row.
            self.base = bool(cfg.model.name_or_path)
        elif not cfg.eval.compare:
            raise ConfigError(
                "set eval.compare=true (train and compare), eval.run_dir=<a ragdist-train run> or eval.checkpoint=<a model dir>"
            )
        self.cfg = cfg
        self.missing = [v for v in _needed(list(cfg.eval.strategies)) if v not in self.ckpts] if cfg.eval.compare else []
        for name, path in self.ckpts.items():
            if not (Path(path) / "config.json").is_file():
                raise ConfigError(f"checkpoint for {name!r} not found: {path} (eval.compare=true trains it)")
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        resolve_data_paths(cfg)
        # Bad QA files, overlapping train/eval questions, a missing model or an incomplete joint run
        # fail before anything expensive.
        train, _ = load_qa_splits(cfg)
        if cfg.eval.joint_run and "joint" in cfg.eval.strategies:
            from ragdist.eval.compare import resolve_joint

            resolve_joint(as_object(cfg.eval), as_object(cfg.embedder))
        if self.missing or self.base:
            load_tokenizer(as_object(cfg.model), tokenizer_data(cfg))
        self.embedder = build_embedder(as_object(cfg.embedder))
        snapshot = build_or_reuse_index(cfg, self.embedder)
        check_embedder_matches(read_manifest(snapshot), self.embedder)
        cfg.index.snapshot = str(snapshot)
        self.rcfg = as_object(cfg.retrieval)
        start_service(str(snapshot), self.rcfg)
        # Training ranks launched below attach to this cluster instead of starting their own.
        cfg.retrieval.address = os.environ.get("RAY_ADDRESS", cfg.retrieval.address)
        resolve_mode(cfg.retrieval, self.embedder, train, out=Path(cfg.run_dir) / "retrieval_mode.json")

    def train(self) -> None:
        if self.missing:
            self.ckpts.update(train_missing(self.cfg, self.missing))

    def evaluate(self) -> dict[str, Any]:
        return evaluate_checkpoints(self.cfg, self.ckpts, self.embedder, base=self.base)

    def cleanup(self) -> None:
        if self.rcfg is not None:
            _stop_quietly(self.rcfg)


@cli
def run(cfg: DictConfig) -> dict[str, Any]:
    setup_logging()
    if cfg.eval.retrieval_only:
        return retrieval_only(cfg)
    recipe = EvaluateRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        return recipe.evaluate()
    finally:
        recipe.cleanup()


register_configs()
main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run)

if __name__ == "__main__":
    main()
