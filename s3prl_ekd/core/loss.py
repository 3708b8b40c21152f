"""The distillation loss of DistilHuBERT, per prediction head.

loss(head l) = l1_weight * mean |pred - target| + cosine_weight * mean(-log sigmoid(cos(pred, target)))
Means are over the valid (unpadded) frames only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


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
