"""Cross-encoder re-ranking of the top-N candidates: any local HF sequence-classification model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import ConfigError


def passage_text(p: dict[str, Any]) -> str:
    return f"{p['title']}\n{p['text']}" if p.get("title") else p.get("text", "")


class CrossEncoderReranker:
    """Scores (question, passage) pairs jointly; one logit (or the last class's) is the relevance."""

    def __init__(self, path: str, *, batch_size: int = 32, max_length: int = 256, threads: int = 0):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not path or not Path(path).is_dir():
            raise ConfigError(f"retrieval.rerank.model={path!r}: not a local model directory (nothing is downloaded)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"retrieval.rerank.model={path!r}: cannot load a sequence classifier ({e})") from None
        self.batch_size = batch_size
        self.max_length = max_length
        self.threads = threads
        self.name = Path(path).name

    def scores(self, question: str, passages: list[dict[str, Any]]) -> np.ndarray:
        import torch

        out = []
        prev = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                for i in range(0, len(passages), self.batch_size):
                    chunk = passages[i : i + self.batch_size]
                    enc = self.tokenizer(
                        [question] * len(chunk), [passage_text(p) for p in chunk],
                        truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
                    )
                    logits = self.model(**enc).logits
                    out.append(logits[:, -1].float().cpu().numpy())
        finally:
            torch.set_num_threads(prev)
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def rerank(self, questions: list[str], candidates: list[list[dict[str, Any]]], k: int) -> list[list[dict[str, Any]]]:
        """Each question's candidates re-ordered by the cross-encoder; the best k, with `rerank_score`."""
        result = []
        for q, cands in zip(questions, candidates):
            if not cands:
                result.append([])
                continue
            s = self.scores(q, cands)
            order = np.argsort(-s, kind="stable")[:k]
            result.append([dict(cands[i], rerank_score=float(s[i])) for i in order])
        return result
