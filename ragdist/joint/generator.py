"""The generator side of joint training, as the module the DeepSpeed/FSDP engine wraps.

One micro-batch holds B questions × K passages as B·K sequences (passage, question, answer), one per
(question, passage), plus the retriever's scores (B, K) — computed outside the engine, with gradient.
The forward returns one loss, weighted generator loss + weighted retriever loss, so the engine's own
backward carries the gradient through the scores into the retriever's encoders while the engine
steps only the generator. Nothing about the engine changes: under ZeRO-3 or FSDP the generator is
sharded as usual and the retriever is not part of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ragdist.joint.losses import posterior, retriever_loss
from ragdist.train.model import IGNORE


def answer_log_likelihood(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: Σ log p(answer token) and the number of answer tokens.

    The output projection runs only where a label is, never over the passage context.
    """
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[keep]
    h = hidden[:, :-1][keep]
    y = targets[keep]
    logits = lm.get_output_embeddings()(h).float()
    token_lp = logits.log_softmax(-1).gather(1, y.unsqueeze(1)).squeeze(1)
    ll = torch.zeros(targets.shape[0], dtype=token_lp.dtype, device=token_lp.device).index_add(0, rows, token_lp)
    return ll, keep.sum(1)


class JointLM(nn.Module):
    """`lm` is any HF causal LM; saved checkpoints are plain `lm` weights (the same layout as AnswerLossLM)."""

    def __init__(self, lm: nn.Module, *, loss: str, generator_weight: float, retriever_weight: float,
                 retriever_temperature: float, lm_temperature: float):
        super().__init__()
        self.lm = lm
        self.loss_name = loss  # a plain attribute: a test may switch it between steps
        self.generator_weight = generator_weight
        self.retriever_weight = retriever_weight
        self.retriever_temperature = retriever_temperature
        self.lm_temperature = lm_temperature
        self.last: dict[str, Any] = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                retriever_scores: torch.Tensor) -> torch.Tensor:
        b, k = retriever_scores.shape
        if input_ids.shape[0] != b * k:
            raise ValueError(f"{input_ids.shape[0]} sequences for {b} questions × {k} passages")
        ll, ntok = answer_log_likelihood(self.lm, input_ids, attention_mask, labels)
        # The generator's own loss: every (question, passage) sequence, token-averaged (RA-DIT's
        # parallel passages); under rag_nll the marginal below trains the generator as well.
        gen = -ll.sum() / ntok.sum().clamp(min=1)
        scores = retriever_scores.float()
        ll_bk = ll.view(b, k)
        ret = retriever_loss(self.loss_name, scores, ll_bk, retriever_temperature=self.retriever_temperature,
                             lm_temperature=self.lm_temperature)
        with torch.no_grad():
            post = posterior(scores, ll_bk, self.retriever_temperature)
            self.last = {
                "gen_loss": float(gen),
                "retriever_loss": float(ret),
                # How often the generator's likelihood agrees with the retriever's first choice.
                "agree": float((post.argmax(-1) == scores.argmax(-1)).float().mean()),
                "ll": ll_bk.detach().cpu(),
            }
        return self.generator_weight * gen + self.retriever_weight * ret
