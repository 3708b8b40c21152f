"""Frame arithmetic of the wav2vec2-style waveform CNN shared by the student and the teachers.

A CNN is a list of (channels, kernel, stride) layers, written as in fairseq / s3prl configs,
e.g. STANDARD_CNN. Imports only torch: SUPERB submission folders carry a copy of this module.
"""

from __future__ import annotations

import ast
import operator

import torch

# HuBERT / WavLM / DistilHuBERT: 400-sample receptive field, 320-sample hop (50 Hz at 16 kHz).
STANDARD_CNN = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"

ConvLayers = list[tuple[int, int, int]]


def parse_conv_layers(spec: str) -> ConvLayers:
    """'[(512,10,5)] + [(512,3,2)] * 4' -> [(512, 10, 5), (512, 3, 2), ...], without eval()."""
    binary = {ast.Add: operator.add, ast.Mult: operator.mul}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(item) for item in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and type(node.op) in binary:
            return binary[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"conv_feature_layers: cannot read {spec!r}; write it like {STANDARD_CNN!r}")

    layers = value(ast.parse(spec, mode="eval").body)
    if not isinstance(layers, list) or not all(isinstance(x, tuple) and len(x) == 3 for x in layers):
        raise ValueError(f"conv_feature_layers: {spec!r} is not a list of (channels, kernel, stride)")
    return layers


def receptive_field(conv_layers: ConvLayers) -> int:
    """Samples the CNN needs for one output frame (400 for STANDARD_CNN)."""
    field, hop = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * hop
        hop *= stride
    return field


def hop_length(conv_layers: ConvLayers) -> int:
    """Samples between consecutive frames (320 for STANDARD_CNN)."""
    hop = 1
    for _, _, stride in conv_layers:
        hop *= stride
    return hop


def conv_frame_lengths(sample_lengths: torch.Tensor, conv_layers: ConvLayers) -> torch.Tensor:
    """Frames the CNN yields for each waveform length, (B,) -> (B,) (0 when too short)."""
    lengths = sample_lengths
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def num_frames(samples: int, conv_layers: ConvLayers) -> int:
    """conv_frame_lengths for one length given as an int."""
    return int(conv_frame_lengths(torch.tensor([samples]), conv_layers)[0])


def valid_frames(frame_lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(B,) valid frames per utterance -> (B, frames) bool, True on frames inside the utterance."""
    return torch.arange(frames, device=frame_lengths.device)[None, :] < frame_lengths[:, None]


def resample_frames(hidden: torch.Tensor, source_hop: int, target_hop: int) -> torch.Tensor:
    """Frames `source_hop` samples apart -> frames `target_hop` samples apart, on dim 2.

    hidden: (B, L, T, D) -> (B, L, T', D). Frame i of a model with hop h is taken to cover samples
    [h i, h (i + 1)), so both cases put an output frame's centre where its inputs' centre is:
    - finer source (target_hop = r * source_hop): frame i is the mean of source frames r i .. r i + r - 1;
      T' = T // r (a partial group at the end is dropped);
    - coarser source (source_hop = r * target_hop): frame i is the linear interpolation of the source
      at position p = (i + 1/2) / r - 1/2, clamped to [0, T - 1]; T' = T * r;
    - equal hops: `hidden` itself.
    Either hop must be a whole multiple of the other (a ValueError otherwise).
    """
    if source_hop == target_hop:
        return hidden
    batch, layers, frames, dim = hidden.shape
    if target_hop % source_hop == 0:
        ratio = target_hop // source_hop
        kept = frames // ratio
        return hidden[:, :, :kept * ratio].reshape(batch, layers, kept, ratio, dim).mean(dim=3)
    if source_hop % target_hop == 0:
        ratio = source_hop // target_hop
        if frames == 0:
            return hidden
        position = ((torch.arange(frames * ratio, device=hidden.device, dtype=torch.float64) + 0.5) / ratio
                    - 0.5).clamp(0, frames - 1)                           # (T',)
        lower = position.floor().long()
        upper = (lower + 1).clamp(max=frames - 1)
        weight = (position - lower).to(hidden.dtype)[None, None, :, None]  # (1, 1, T', 1)
        return hidden.index_select(2, lower) * (1 - weight) + hidden.index_select(2, upper) * weight
    raise ValueError(f"frame hops {source_hop} and {target_hop}: neither is a whole multiple of the other")
