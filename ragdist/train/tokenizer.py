"""A lossless byte-level BPE for generators built from config, trained on the run's own text.

The embedder's WordPiece lowercases and splits around punctuation, so "1,495 m" decodes as
"1, 495 m": an answer the model read right still fails exact match. A byte-level BPE maps every
string to bytes and back, so `decode(encode(s)) == s` for any text. It is trained on the corpus
(titles and passages) and the training questions and answers, cached under a directory keyed by a
digest of those files, the vocab size and `BPE_VERSION`, and saved as an ordinary HF tokenizer
(`PreTrainedTokenizerFast`) that `AutoTokenizer.from_pretrained` loads, with every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragdist.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Bump when training changes (pre-tokenization, special tokens, trainer settings): old caches are ignored.
BPE_VERSION = 1
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MIN_VOCAB = 256 + 3  # every byte, plus the special tokens


@dataclass
class TokenizerData:
    """The text a BPE tokenizer is trained on: a corpus file and QA files (questions and answers)."""

    corpus: str
    qa: list[str] = field(default_factory=list)
    corpus_format: str = "auto"  # as corpus.format: auto | jsonl | parquet | datasets
    corpus_fields: Any = None  # as corpus.fields (None: the default names)
    qa_format: str = "auto"  # as data.format
    qa_fields: Any = None  # as data.fields


def training_texts(data: TokenizerData) -> Iterator[str]:
    """Titles and passages of the corpus, then questions and answers of the QA files."""
    from ragdist.data.corpus import load_documents
    from ragdist.data.qa import load_qa

    for doc in load_documents(data.corpus, data.corpus_format, fields=data.corpus_fields):
        if doc.title:
            yield doc.title
        yield doc.text
    for path in data.qa:
        for ex in load_qa(path, fmt=data.qa_format, fields=data.qa_fields):
            yield ex.question
            yield from ex.answers


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on `texts`, as a `PreTrainedTokenizerFast` with bos/eos/pad set.

    Digits are split one by one (as Llama's tokenizers do), so a number the model has never seen is
    still spelled from tokens it has. Nothing is normalized: the text round-trips byte for byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"model.bpe_vocab_size={vocab_size}: must be at least {MIN_VOCAB} (256 bytes + 3 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # The default post-decode cleanup would turn "a ," into "a,": the round trip must stay exact.
        clean_up_tokenization_spaces=False,
    )


def cache_key(data: TokenizerData, vocab_size: int) -> str:
    """Same inputs (file contents, vocab size, version), same key: the cached tokenizer is reused."""
    from ragdist.data.corpus import path_digest

    for p in (data.corpus, *data.qa):
        if not Path(p).exists():
            raise DataError(f"{p}: file not found (needed to train the BPE tokenizer)")
    parts = {
        "version": BPE_VERSION,
        "vocab_size": vocab_size,
        "corpus": path_digest(data.corpus),
        "qa": [path_digest(p) for p in data.qa],
        "fields": [repr(data.corpus_fields), repr(data.qa_fields)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def bpe_tokenizer(data: TokenizerData, vocab_size: int, cache_dir: str | Path) -> Any:
    """The BPE for `data`: loaded from `cache_dir` when trained before, else trained and cached.

    Written to a temporary directory and renamed into place, so ranks that race here never read a
    half-written tokenizer; the loser of a race discards its (identical) copy.
    """
    from transformers import AutoTokenizer

    out = Path(cache_dir) / f"bpe-{cache_key(data, vocab_size)}"
    if not (out / "tokenizer.json").is_file():
        tok = train_bpe(training_texts(data), vocab_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
        try:
            tok.save_pretrained(tmp)
            (tmp / "bpe_inputs.json").write_text(
                json.dumps({"corpus": str(data.corpus), "qa": [str(p) for p in data.qa], "vocab_size": vocab_size,
                            "version": BPE_VERSION}, indent=1)
            )
            os.rename(tmp, out)
            log.info("tokenizer: trained a byte-level BPE of %d tokens -> %s", len(tok), out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "tokenizer.json").is_file():
                raise
    return AutoTokenizer.from_pretrained(out)


def round_trip_failures(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """The texts that do not come back unchanged from encode then decode."""
    bad = []
    for s in texts:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids, skip_special_tokens=True) != s:
            bad.append(s)
    return bad
