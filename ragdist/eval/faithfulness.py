"""Optional model-based faithfulness: does the context entail the answer?

Any local Hugging Face sequence-classification model works:
- an NLI model (several labels, one of them "entailment"): score = P(entailment | context, claim);
- a cross-encoder with a single output: score = sigmoid(logit).
The claim is the question followed by the generated answer, which turns a short span ("KDTW")
into something a sentence-pair model can judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ragdist.errors import ConfigError


class NLIScorer:
    def __init__(self, path: str, *, label: str = "entailment", batch_size: int = 16, max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"eval.nli_model={path!r}: not a local model directory (no config.json); models are never downloaded"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(p)
        self.model = AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.max_length = min(
            max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length
        )
        self.num_labels = int(self.model.config.num_labels)
        self.name = p.name
        self.label_index = self._entail_index(label)

    def _entail_index(self, label: str) -> int | None:
        if self.num_labels == 1:
            return None
        id2label = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        want = label.lower()
        for i, name in id2label.items():
            if name.lower() == want:
                return i
        for i, name in id2label.items():
            if name.lower().startswith(want[:6]):
                return i
        raise ConfigError(
            f"eval.nli_label={label!r} is not a label of {self.name} (its labels: {sorted(id2label.values())})"
        )

    def scores(self, premises: list[str], claims: list[str]) -> np.ndarray:
        """Support probability in [0, 1] for each (premise, claim) pair."""
        import torch

        if len(premises) != len(claims):
            raise ValueError(f"{len(premises)} premises but {len(claims)} claims")
        out: list[np.ndarray] = []
        for i in range(0, len(premises), self.batch_size):
            enc = self.tokenizer(
                premises[i : i + self.batch_size],
                claims[i : i + self.batch_size],
                padding=True,
                # The context is long, the claim short: cut the context, never the claim.
                truncation="only_first",
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            if self.label_index is None:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, self.label_index]
            out.append(probs.numpy())
        return np.concatenate(out) if out else np.zeros((0,), dtype=np.float32)


def claim(question: str, answer: str) -> str:
    return f"{question} {answer}".strip()


def build_scorer(cfg: Any) -> NLIScorer | None:
    """The scorer configured by eval.nli_model, or None when the check is off."""
    if not cfg.nli_model:
        return None
    return NLIScorer(cfg.nli_model, label=cfg.nli_label, batch_size=cfg.nli_batch_size)
