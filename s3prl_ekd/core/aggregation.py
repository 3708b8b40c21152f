"""How the teachers' same-numbered layers become the student's targets.

Every teacher contributes a tensor (B, L, T, D_k): its L selected hidden
states, batch first, frames aligned across teachers.
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
    """
    if aggregation == "layerwise_average":
        return [layerwise_average(teacher_hiddens, weights)]
    if aggregation == "layerwise_concat":
        return [layerwise_concat(teacher_hiddens)]
    if aggregation == "multi_head":
        return list(teacher_hiddens)
    raise ConfigError(f"aggregation: unknown mode {aggregation!r}")


def head_dims(aggregation: str, teacher_dims: Sequence[int]) -> list[int]:
    """Output dimension of each prediction-head set, matching `build_targets`."""
    if aggregation == "layerwise_average":
        check_averageable({f"teacher {k}": d for k, d in enumerate(teacher_dims)}, "aggregation")
        return [teacher_dims[0]]
    if aggregation == "layerwise_concat":
        return [sum(teacher_dims)]
    if aggregation == "multi_head":
        return list(teacher_dims)
    raise ConfigError(f"aggregation: unknown mode {aggregation!r}")


def head_weights(aggregation: str, teacher_weights: Sequence[float]) -> list[float]:
    """Loss weight of each head set: per teacher for multi_head, else 1."""
    return list(teacher_weights) if aggregation == "multi_head" else [1.0]
