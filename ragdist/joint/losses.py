"""The retriever's training signals, from retriever scores s (B, K) and the generator's answer
log-likelihood given each passage, ll[b, k] = log p(y_b | x_b, z_bk) (B, K).

    rag_nll  RAG-sequence marginal likelihood: -log Σ_k p(z_k|x) p(y|x,z_k). The generator side keeps
             its gradient: the marginal trains both (posterior-weighted per-passage likelihood).
    emdr2    EMDR²: the same marginal with the generator side stop-gradient; the generator learns from
             its own loss only.
    lsr      LM-supervised retrieval (REPLUG, RA-DIT): KL(P_R || Q_LM), P_R = softmax(s/τ_r),
             Q_LM = softmax(ll/τ_lm), generator side stop-gradient.
    pdist    Atlas perplexity distillation: KL(Q_LM || P_R), the retriever distils the posterior
             the generator's likelihoods imply (τ_lm is Atlas' temperature), stop-gradient on Q_LM.

p(z|x) is always the retriever's softmax over the K retrieved passages with temperature τ_r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ragdist.errors import ConfigError
from ragdist.joint.config import LOSSES


def retriever_log_probs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(scores.float() / temperature, dim=-1)


def rag_nll(scores: torch.Tensor, ll: torch.Tensor, retriever_temperature: float) -> torch.Tensor:
    return -torch.logsumexp(retriever_log_probs(scores, retriever_temperature) + ll.float(), dim=-1).mean()


def emdr2(scores: torch.Tensor, ll: torch.Tensor, retriever_temperature: float) -> torch.Tensor:
    return rag_nll(scores, ll.detach(), retriever_temperature)


def lsr(scores: torch.Tensor, ll: torch.Tensor, retriever_temperature: float, lm_temperature: float) -> torch.Tensor:
    log_p = retriever_log_probs(scores, retriever_temperature)
    log_q = F.log_softmax(ll.detach().float() / lm_temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def pdist(scores: torch.Tensor, ll: torch.Tensor, retriever_temperature: float, lm_temperature: float) -> torch.Tensor:
    log_p = retriever_log_probs(scores, retriever_temperature)
    log_q = F.log_softmax(ll.detach().float() / lm_temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def retriever_loss(
    name: str, scores: torch.Tensor, ll: torch.Tensor, *, retriever_temperature: float, lm_temperature: float
) -> torch.Tensor:
    if scores.shape != ll.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and log-likelihoods {tuple(ll.shape)} must both be (B, K)")
    if name == "rag_nll":
        return rag_nll(scores, ll, retriever_temperature)
    if name == "emdr2":
        return emdr2(scores, ll, retriever_temperature)
    if name == "lsr":
        return lsr(scores, ll, retriever_temperature, lm_temperature)
    if name == "pdist":
        return pdist(scores, ll, retriever_temperature, lm_temperature)
    raise ConfigError(f"joint.loss={name!r}: expected one of {', '.join(LOSSES)} (or none)")


def posterior(scores: torch.Tensor, ll: torch.Tensor, retriever_temperature: float) -> torch.Tensor:
    """p(z | x, y) ∝ p(z|x) p(y|x,z): which passage the generator's likelihood credits (for logging)."""
    return F.softmax(retriever_log_probs(scores, retriever_temperature) + ll.float(), dim=-1)
