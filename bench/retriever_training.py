"""Supervised retriever training (`joint=dpr`) against the stock MiniLM, on dictionary-style lookups.

    .venv/bin/python bench/retriever_training.py                         # side=query, 300 steps
    .venv/bin/python bench/retriever_training.py --side both --refresh-every 100
    .venv/bin/python bench/retriever_training.py --style forward         # the built-in questions as they are

The questions come from the built-in elements dataset (real text from the mendeleev package). With
`--style reverse` (default) each templated question is turned around, dictionary style: the fact in,
the element out ("Which element has atomic number 26?" → iron, gold: iron's profile passage), the
lookup stock MiniLM is weak at (its vectors say little about which number or symbol a passage holds).
Train and eval stay split by element: every eval question is about an element never trained on.

The run is `ragdist-train data=elements joint=dpr trainer.variants=[retriever]` on those files; the
stock encoder's recall is measured by the same code on the same index before the first step.
Last line: {"style", "side", "steps", "questions", "before": {recall@k, mrr}, "after": {...},
"r1_gain_points", "wall_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REVERSE = [
    (r"What is the chemical symbol of (.+)\?", "Which element has the chemical symbol {a}?"),
    (r"What is the atomic number of (.+)\?", "Which element has atomic number {a}?"),
    (r"What is the electron configuration of (.+)\?", "Which element has the electron configuration {a}?"),
    (r"What is the standard atomic weight of (.+)\?", "Which element has a standard atomic weight of {a}?"),
    (r"What is the CAS registry number of (.+)\?", "Which element has the CAS registry number {a}?"),
]


def reverse_questions(src: Path) -> list[dict]:
    """The built-in questions turned around (the answer becomes the question's key); gold ids unchanged.
    A question that two elements share (an ambiguous lookup) is left out."""
    rows = []
    for line in src.read_text().splitlines():
        r = json.loads(line)
        for pat, tmpl in REVERSE:
            m = re.fullmatch(pat, r["question"])
            if m:
                rows.append({"id": f"{r['id']}-rev", "question": tmpl.format(a=r["answers"][0]),
                             "answers": [m.group(1)], "gold_ids": r["gold_ids"]})  # fmt: skip
    seen = Counter(r["question"] for r in rows)
    return [r for r in rows if seen[r["question"]] == 1]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--style", choices=["reverse", "forward"], default="reverse")
    ap.add_argument("--side", choices=["query", "both"], default="query")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--refresh-every", type=int, default=0, help="side=both: refresh the index every N steps")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-retriever"))
    ap.add_argument("overrides", nargs="*", help="more ragdist config overrides (key=value)")
    args = ap.parse_args()

    from ragdist.config import as_object, compose
    from ragdist.data import builtin
    from ragdist.recipes.training import launch_training, prepare, stop_owned_service

    out = Path(args.out) / f"{args.style}-{args.side}"
    out.mkdir(parents=True, exist_ok=True)
    base = compose(["data=elements"])
    paths = builtin.materialize(as_object(base.data))
    data = [f"corpus.path={paths['corpus']}"]
    if args.style == "reverse":
        train = reverse_questions(Path(paths["train"]))
        asked = {r["question"] for r in train}
        evals = [r for r in reverse_questions(Path(paths["eval"])) if r["question"] not in asked]
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "eval.jsonl", evals)
        data += [f"data.train={out / 'train.jsonl'}", f"data.eval={out / 'eval.jsonl'}"]
        print(f"reverse questions: {len(train)} train, {len(evals)} eval", file=sys.stderr)
    else:
        data += [f"data.train={paths['train']}", f"data.eval={paths['eval']}"]
    overrides = [
        "recipe=plain", "data=elements", *data, "data.max_eval=null", "index.num_shards=2", f"index.root={ROOT / 'indexes' / 'elements'}",
        "joint=dpr", f"joint.side={args.side}", f"joint.supervised.steps={args.steps}", "trainer.nproc=2",
        "trainer.variants=[retriever]", f"trainer.log_every={max(1, args.steps // 6)}",
        f"joint.refresh_every={args.refresh_every}", f"retrieval.service_name=bench-retriever-{os.getpid()}",
        f"run_dir={out / 'run'}", *args.overrides,
    ]  # fmt: skip
    cfg = compose(overrides)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare(cfg)
    try:
        launch_training(cfg)
    finally:
        stop_owned_service(cfg)
    wall = time.perf_counter() - t0
    j = json.loads((Path(cfg.run_dir) / "joint_report.json").read_text())
    keep = ("recall@1", "recall@3", "recall@5", "mrr")
    before = {k: j["recall_before"][k] for k in keep if k in j["recall_before"]}
    after = {k: j["recall_after"][k] for k in keep if k in j["recall_after"]}
    print(json.dumps({"style": args.style, "side": args.side, "steps": j["steps"],
                      "questions": j["recall_after"].get("questions"), "before": before, "after": after,
                      "r1_gain_points": round(100 * (after["recall@1"] - before["recall@1"]), 1),
                      "wall_s": round(wall, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
