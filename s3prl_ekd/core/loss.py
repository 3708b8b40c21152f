"""The distillation loss of DistilHuBERT, per prediction head, and how head sets are weighted.

loss(head l) = l1_weight * mean |pred - target| + cosine_weight * mean(-log sigmoid(cos(pred, target)))
Means are over the valid (unpadded) frames only. A head set's loss L_s sums its heads' losses;
the total is sum_s w_s L_s with fixed weights, or, with `teacher_weighting: uncertainty`,
sum_s exp(-s_s) L_s + s_s with learned log-variances s_s (Kendall, Gal and Cipolla, CVPR 2018).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LossTerms(NamedTuple):
    l1: torch.Tensor   # (L,) mean absolute error per head
    cos: torch.Tensor  # (L,) mean -log sigmoid(cosine similarity) per head


def distill_loss(predictions: torch.Tensor, targets: torch.Tensor, frame_mask: torch.Tensor) -> LossTerms:
    """Per-head L1 and cosine terms.

    predictions, targets: (B, L, T, D); frame_mask: (B, T) bool, True on valid frames.
    Returns LossTerms with (L,) tensors.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    mask = frame_mask[:, None, :].to(predictions.dtype)           # (B, 1, T)
    frames = mask.sum(dim=(0, 2)).clamp(min=1)                    # (1,)
    l1 = (predictions - targets).abs().mean(dim=-1)                # (B, L, T)
    l1 = (l1 * mask).sum(dim=(0, 2)) / frames                      # (L,)
    cos = -F.logsigmoid(F.cosine_similarity(predictions, targets, dim=-1))  # (B, L, T)
    cos = (cos * mask).sum(dim=(0, 2)) / frames                    # (L,)
    return LossTerms(l1, cos)


def total_loss(terms: list[LossTerms], head_weights: list[float],
               l1_weight: float = 1.0, cosine_weight: float = 1.0) -> torch.Tensor:
    """Sum over head sets and heads of the weighted terms (DistilHuBERT sums over layers)."""
    loss = 0.0
    for term, weight in zip(terms, head_weights):
        loss = loss + weight * (l1_weight * term.l1.sum() + cosine_weight * term.cos.sum())
    return loss


def head_set_losses(terms: list[LossTerms], l1_weight: float = 1.0, cosine_weight: float = 1.0) -> torch.Tensor:
    """[S] LossTerms -> (S,): each head set's loss L_s, summed over its heads."""
    return torch.stack([l1_weight * term.l1.sum() + cosine_weight * term.cos.sum() for term in terms])


def uncertainty_loss(set_losses: torch.Tensor, log_variances: torch.Tensor) -> torch.Tensor:
    """sum_s exp(-s_s) L_s + s_s; set_losses, log_variances (S,) -> scalar."""
    return (torch.exp(-log_variances) * set_losses + log_variances).sum()


class UncertaintyWeights(nn.Module):
    """One learned log-variance per head set, initialised at 0 (weight exp(-0) = 1)."""

    def __init__(self, head_sets: list[str]):
        super().__init__()
        self.head_sets = list(head_sets)
        self.log_variances = nn.Parameter(torch.zeros(len(self.head_sets)))

    def forward(self, set_losses: torch.Tensor) -> torch.Tensor:
        """(S,) head-set losses -> scalar total."""
        return uncertainty_loss(set_losses, self.log_variances)

    def weights(self) -> dict[str, float]:
        """exp(-s_s) per head set: the weight each head set's loss has now."""
        return dict(zip(self.head_sets, torch.exp(-self.log_variances.detach()).tolist()))
