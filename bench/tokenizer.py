"""Generator tokenizers on a built-in dataset: the byte-level BPE (`model.tokenizer=bpe`) vs the
embedder's WordPiece (`model.tokenizer=minilm`, the default for models built from config).

    python bench/tokenizer.py                       # airports, 2,000 entities (the default data)
    python bench/tokenizer.py --data elements --vocab-size 8000

For each: tokens per passage and per answer (mean), how many passages + answers (train and eval)
do not survive encode → decode unchanged, and the EM ceiling: the share of answers that still score
exact match (the eval's normalization) after the round trip, i.e. for a model that copies perfectly. The BPE is trained as a run trains it (corpus + training
QA); its training time is the median of --repeats fresh trainings. The last line printed is one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="airports", help="a built-in dataset: airports | elements")
    ap.add_argument("--num-entities", type=int, default=None, help="default: the data config's own")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from ragdist.config import as_object, compose
    from ragdist.data import builtin
    from ragdist.data.corpus import load_documents
    from ragdist.data.qa import load_qa
    from ragdist.eval.metrics import exact_match
    from ragdist.train.model import ModelConfig, load_tokenizer
    from ragdist.train.tokenizer import TokenizerData, round_trip_failures, train_bpe, training_texts

    cfg = as_object(compose([f"data={args.data}", "run_dir=/tmp/x"])).data
    if args.num_entities:
        cfg.num_entities = args.num_entities
    paths = builtin.materialize(cfg)
    passages = [d.text for d in load_documents(paths["corpus"])]
    answers = [a for split in ("train", "eval") for ex in load_qa(paths[split]) for a in ex.answers]
    data = TokenizerData(corpus=paths["corpus"], qa=[paths["train"]])

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        train_bpe(training_texts(data), args.vocab_size)
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as cache:
        bpe = load_tokenizer(ModelConfig(tokenizer="bpe", bpe_vocab_size=args.vocab_size, bpe_cache_dir=cache), data)
    wordpiece = load_tokenizer(ModelConfig(tokenizer="minilm"))

    def lengths(tok, texts):
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    out = {"data": args.data, "entities": cfg.num_entities, "passages": len(passages), "answers": len(answers)}
    for name, tok in (("bpe", bpe), ("wordpiece", wordpiece)):
        out[name] = {
            "vocab": len(tok),
            "tokens_per_passage": round(statistics.mean(lengths(tok, passages)), 2),
            "tokens_per_answer": round(statistics.mean(lengths(tok, [" " + a for a in answers])), 2),
            "round_trip_failures_passages": len(round_trip_failures(tok, passages)),
            "round_trip_failures_answers": len(round_trip_failures(tok, answers)),
            "em_ceiling": round(statistics.mean(
                exact_match(tok.decode(tok(" " + a, add_special_tokens=False)["input_ids"]).strip(), [a])
                for a in answers
            ), 4),
        }
    out["bpe"]["train_s_median"] = round(statistics.median(times), 3)
    out["passage_tokens_bpe_over_wordpiece"] = round(
        out["bpe"]["tokens_per_passage"] / out["wordpiece"]["tokens_per_passage"], 3
    )
    for name in ("bpe", "wordpiece"):
        print(f"{name:>9}: vocab {out[name]['vocab']}, {out[name]['tokens_per_passage']} tokens/passage, "
              f"round-trip failures {out[name]['round_trip_failures_passages']}/{len(passages)} passages, "
              f"{out[name]['round_trip_failures_answers']}/{len(answers)} answers, EM ceiling {out[name]['em_ceiling']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
