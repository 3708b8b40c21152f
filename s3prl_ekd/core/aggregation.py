"""How the teachers' same-numbered layers become the student's targets.

Every teacher contributes a tensor (B, L, T, D_k): its L selected hidden states, batch first,
frames aligned across teachers (and standardised per feature first with `target_norm: teacher_layer`).

The paper's three modes (Huang et al., ICASSP 2023), with teacher weights w_k and h_k the teacher's
layer-l states:
- layerwise_average: one head set predicts a = sum_k w_k h_k / sum_k w_k;
- layerwise_concat: one head set predicts [h_1; ...; h_K] (feature concatenation);
- multi_head: head set k predicts h_k; the loss of set k is weighted by w_k.

multi_head_residual is ours (the ISCSLP 2024 follow-up "EKD from speech SSL models considering
inter-teacher differences" describes shared and residual heads but publishes no formula). With
S(x) the shared head set's output and R_k(x) teacher k's residual head set (narrower, see
StudentConfig.residual_inter_dim), for every target layer:
    prediction of the average    p_0 = S(x)               target a (as layerwise_average)
    prediction of teacher k      p_k = S(x) + R_k(x)      target h_k
    loss = 1 * L(p_0, a) + sum_k w_k L(p_k, h_k)
where L is the distillation loss of one head set (core/loss.py). So R_k learns h_k - a where the
shared set learns a; the teachers must share one hidden size. Head sets, in order: the average,
then the teachers.
"""

from __future__ import annotations

from typing import Sequence

import torch

from s3prl_ekd.core.config import check_averageable
from s3prl_ekd.errors import ConfigError


def layerwise_average(teacher_hiddens: Sequence[torch.Tensor],
                      weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean over teachers of layer l, for every l.

    [K] (B, L, T, D) -> (B, L, T, D); weights (K,) are normalised to sum to 1
    (default: equal weights).
    """
    check_averageable({f"teacher {k}": h.shape[-1] for k, h in enumerate(teacher_hiddens)}, "aggregation")
    weights = [1.0] * len(teacher_hiddens) if weights is None else list(weights)
    total = float(sum(weights))
    out = teacher_hiddens[0] * (weights[0] / total)
    for hidden, weight in zip(teacher_hiddens[1:], weights[1:]):
        out = out + hidden * (weight / total)
    return out


def layerwise_concat(teacher_hiddens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the teachers' layer-l states on the feature dimension.

    [K] (B, L, T, D_k) -> (B, L, T, sum_k D_k)
    """
    return torch.cat(list(teacher_hiddens), dim=-1)


def build_targets(aggregation: str, teacher_hiddens: Sequence[torch.Tensor],
                  weights: Sequence[float] | None = None) -> list[torch.Tensor]:
    """One target tensor per prediction-head set.

    layerwise_average / layerwise_concat: [K] (B, L, T, D_k) -> [1] (B, L, T, D')
    multi_head: the teachers' own states, [K] (B, L, T, D_k).
    multi_head_residual: [1 + K] (B, L, T, D): the weighted average, then the teachers' own states.
    """
    if aggregation == "layerwise_average":
        return [layerwise_average(teacher_hiddens, weights)]
    if aggregation == "layerwise_concat":
        return [layerwise_concat(teacher_hiddens)]
    if aggregation == "multi_head":
        return list(teacher_hiddens)
    if aggregation == "multi_head_residual":
        return [layerwise_average(teacher_hiddens, weights), *teacher_hiddens]
    raise ConfigError(f"aggregation: unknown mode {aggregation!r}")


def head_dims(aggregation: str, teacher_dims: Sequence[int]) -> list[int]:
    """Output dimension of each prediction-head set, matching `build_targets`."""
    if aggregation in ("layerwise_average", "multi_head_residual"):
        check_averageable({f"teacher {k}": d for k, d in enumerate(teacher_dims)}, "aggregation", aggregation)
        return [teacher_dims[0]] * (1 if aggregation == "layerwise_average" else 1 + len(teacher_dims))
    if aggregation == "layerwise_concat":
        return [sum(teacher_dims)]
    if aggregation == "multi_head":
        return list(teacher_dims)
    raise ConfigError(f"aggregation: unknown mode {aggregation!r}")


def head_weights(aggregation: str, teacher_weights: Sequence[float]) -> list[float]:
    """Loss weight of each head set (teacher_weighting: fixed): per teacher for multi_head, 1 for the
    average and per teacher for multi_head_residual, else 1."""
    if aggregation == "multi_head":
        return list(teacher_weights)
    if aggregation == "multi_head_residual":
        return [1.0, *teacher_weights]
    return [1.0]
