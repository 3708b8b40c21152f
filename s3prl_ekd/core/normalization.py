"""Per-teacher target normalisation (`target_norm: teacher_layer`).

Teachers' hidden states differ in scale by orders of magnitude (s3prl issue #378), so in a layerwise
average one teacher can drown the others. Each stored teacher layer is standardised per feature by
a mean and standard deviation computed once over the training audio: `LayerStats` accumulates them
(in float64, mergeable across shards), `standardise` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_FLOOR = 1e-5  # a feature that never varies is divided by this, not by 0


@dataclass
class LayerStats:
    """Running first and second moments of one teacher's L selected layers, per feature."""

    count: int                 # frames seen
    total: torch.Tensor        # (L, D) float64: sum over frames
    squares: torch.Tensor      # (L, D) float64: sum of squares over frames

    @classmethod
    def empty(cls, layers: int, dim: int) -> LayerStats:
        return cls(0, torch.zeros(layers, dim, dtype=torch.float64), torch.zeros(layers, dim, dtype=torch.float64))

    def update(self, frames: torch.Tensor) -> None:
        """Add (T, L, D) frames of one utterance."""
        frames = frames.detach().to("cpu", torch.float64)
        self.count += frames.shape[0]
        self.total += frames.sum(dim=0)
        self.squares += frames.pow(2).sum(dim=0)

    def merge(self, other: LayerStats) -> LayerStats:
        return LayerStats(self.count + other.count, self.total + other.total, self.squares + other.squares)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mean (L, D), std (L, D) float32 (population std, floored at STD_FLOOR)."""
        if self.count == 0:
            raise ValueError("no frames accumulated: statistics of an empty set")
        mean = self.total / self.count
        var = (self.squares / self.count - mean.pow(2)).clamp(min=0)
        return mean.float(), var.sqrt().clamp(min=STD_FLOOR).float()

    def to_dict(self) -> dict:
        """Plain lists (JSON / weights_only checkpoints)."""
        return {"count": self.count, "total": self.total.tolist(), "squares": self.squares.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> LayerStats:
        return cls(int(data["count"]), torch.tensor(data["total"], dtype=torch.float64),
                   torch.tensor(data["squares"], dtype=torch.float64))


def standardise(hidden: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, L, T, D) teacher layers -> (B, L, T, D) standardised per layer and feature; mean, std (L, D)."""
    return (hidden - mean[None, :, None, :].to(hidden)) / std[None, :, None, :].to(hidden)
