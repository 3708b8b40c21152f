"""Half precision without changing what is taught.

Targets in bfloat16 / float16 (a teacher run under autocast, or a target store) are checked
against float32 per teacher layer; one that overflows or differs by more than a tolerance is
refused with one line (s3prl's distiller runs its teacher in float32 for this reason; its users
saw fp16 ruin distillation from large-norm teachers, s3prl issue #378). Keeping the positional
convolutions in float32 inside autocast is a run-time change to s3prl's modules:
`s3prl_ekd.patches.keep_pos_conv_fp32`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from s3prl_ekd.errors import ConfigError

# Default bound on ||half - float32|| / ||float32|| per teacher layer: several times the error that
# bfloat16 storage or autocast gives a healthy teacher (docs/method.md, "Half precision"), far below
# what an overflowing layer gives.
DEFAULT_TOLERANCE = 0.05


def layer_errors(reference: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error and squared norm per layer.

    reference, approx: (..., L, D) with layers on dim -2 -> two (L,) float64 tensors.
    """
    reference, approx = reference.double(), approx.double()
    dims = [d for d in range(reference.dim()) if d != reference.dim() - 2]
    return (approx - reference).pow(2).sum(dim=dims), reference.pow(2).sum(dim=dims)


def check_targets(name: str, layers: Sequence[int], approx: torch.Tensor, dtype: str) -> None:
    """ConfigError naming teacher and layer if `approx` ((..., L, D) in `dtype`) holds inf or NaN."""
    bad = ~torch.isfinite(approx)
    if bad.any():
        layer = layers[int(bad.flatten(0, -3).any(dim=(0, -1)).nonzero()[0]) if approx.dim() > 2 else 0]
        raise ConfigError(f"{name} layer {layer}: targets overflow {dtype} (largest finite value "
                          f"{torch.finfo(getattr(torch, dtype)).max:g}); use float32 (or bfloat16) targets")


def check_tolerance(name: str, layers: Sequence[int], relative: Sequence[float], dtype: str,
                    tolerance: float = DEFAULT_TOLERANCE) -> None:
    for layer, error in zip(layers, relative):
        if not error <= tolerance:  # also catches NaN
            raise ConfigError(f"{name} layer {layer}: {dtype} targets differ from float32 by {100 * error:.2f}% "
                              f"(tolerance {100 * tolerance:g}%); use float32 targets for this teacher")
