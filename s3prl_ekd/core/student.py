"""The DistilHuBERT-style student: s3prl's DistillerModel backbone (CNN + a few
transformer layers) and one prediction-head set per target set.

Imports only torch, s3prl and core.frames: SUPERB submission folders carry a copy of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import dataclass
from typing import NamedTuple

import torch
from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel
from s3prl.upstream.distiller.module import GradMultiply, SplitLinear
from torch import nn

from s3prl_ekd.core.frames import STANDARD_CNN, conv_frame_lengths, hop_length, receptive_field, valid_frames


@dataclass
class StudentConfig:
    """DistilHuBERT-style student (s3prl's DistillerModel backbone + prediction heads)."""

    encoder_layers: int = 2
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    conv_feature_layers: str = STANDARD_CNN
    extractor_mode: str = "default"  # "default" | "layer_norm"
    conv_pos: int = 128
    conv_pos_groups: int = 16
    layer_norm_first: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    feature_grad_mult: float = 0.1  # scales the CNN's gradient; 0 freezes the CNN (no backward through it)
    head_inter_dim: int | None = None  # hidden width of each head; default encoder_embed_dim
    # hidden width of each teacher's residual head set (aggregation multi_head_residual);
    # default a quarter of the shared heads' width
    residual_inter_dim: int | None = None
    # Copy the CNN and the first `encoder_layers` transformer layers from the first
    # teacher where names and shapes match (DistilHuBERT's initialisation).
    init_from_teacher: bool = True


def distilhubert_base(**overrides) -> StudentConfig:
    """DistilHuBERT's size: standard CNN + 2 x 768 transformer layers (23.5M parameters without heads)."""
    return dataclasses.replace(StudentConfig(), **overrides)


def ekd_student_tiny(**overrides) -> StudentConfig:
    """2 x 64-dim student with a 64-channel CNN: CPU smoke runs (pretrain_configs/tiny_cpu.yaml, bench)."""
    return dataclasses.replace(StudentConfig(
        encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
        conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2", conv_pos=16, conv_pos_groups=4,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_from_teacher=False), **overrides)


def ekd_student_demo(**overrides) -> StudentConfig:
    """2 x 192-dim student with a 128-channel CNN, the size of the demo's teachers' first layers."""
    return dataclasses.replace(StudentConfig(
        encoder_layers=2, encoder_embed_dim=192, encoder_ffn_embed_dim=768, encoder_attention_heads=4,
        conv_feature_layers="[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2", conv_pos=64,
        conv_pos_groups=16), **overrides)


class StudentOutput(NamedTuple):
    hidden_states: list[torch.Tensor]  # [1 + encoder_layers] (B, T, D): pre-transformer, then each layer
    frame_lengths: torch.Tensor        # (B,) valid frames per utterance
    predictions: list[torch.Tensor]    # [head sets] (B, L, T, D_h)


class PredictionHeads(nn.Module):
    """L heads sharing one input: Linear -> GELU -> SplitLinear (DistilHuBERT's output layer)."""

    def __init__(self, in_dim: int, inter_dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads, self.out_dim = num_heads, out_dim
        self.proj = nn.Linear(in_dim, inter_dim * num_heads)
        self.act = nn.GELU()
        self.split = SplitLinear(inter_dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, L, T, out_dim)"""
        batch, frames, _ = x.shape
        out = self.split(self.act(self.proj(x)))                  # (B, T, L * out_dim)
        return out.reshape(batch, frames, self.num_heads, self.out_dim).transpose(1, 2)


class EKDStudent(nn.Module):
    """CNN + transformer backbone with `len(head_dims)` head sets of `num_targets` heads each.

    `residual=True` (aggregation multi_head_residual): head set 0 is shared, head sets 1.. are
    narrower residual sets (width `residual_inter_dim`), and the predictions are
    [shared] + [shared + residual_k]: every entry of `predictions` is a final prediction.
    """

    def __init__(self, config: StudentConfig, head_dims: list[int], num_targets: int, residual: bool = False):
        super().__init__()
        self.config = config
        self.head_dims, self.num_targets, self.residual = list(head_dims), num_targets, residual
        if residual and len(set(head_dims)) > 1:
            raise ValueError(f"residual head sets add to the shared one: one output size needed, got {head_dims}")
        backbone_config = {**dataclasses.asdict(config),
                           "extractor_conv_feature_layers": config.conv_feature_layers,
                           "task_emb_type": "none", "out_layer_type": "none", "encoder_layerdrop": 0.0}
        # DistillerModel prints its own head layout ("predicts only layer 12"), which is not ours:
        # the heads are below, and the pretrain expert prints what they predict.
        with contextlib.redirect_stdout(io.StringIO()):
            self.backbone = DistillerModel(DistillerConfig(backbone_config))
        if config.feature_grad_mult == 0:  # frozen: no optimizer state, nothing for DDP to wait for
            self.backbone.feature_extractor.requires_grad_(False)
        inter_dim = config.head_inter_dim or config.encoder_embed_dim
        inter_dims = [inter_dim] * len(head_dims)
        if residual:
            inter_dims[1:] = [config.residual_inter_dim or max(1, inter_dim // 4)] * (len(head_dims) - 1)
        self.heads = nn.ModuleList(
            PredictionHeads(config.encoder_embed_dim, inter, num_targets, dim) for inter, dim in zip(inter_dims, head_dims))
        # (cnn, wave (1, S)) -> (1, C, T): the CNN's output looked up elsewhere instead of computed, for one
        # utterance without gradients (`s3prl-ekd downstream --share-cnn-features`); None computes it.
        self.cnn_features = None

    @property
    def downsample_rate(self) -> int:
        return hop_length(self.backbone.conv_layers)

    @property
    def receptive_field(self) -> int:
        """The shortest waveform (samples) that yields one frame."""
        return receptive_field(self.backbone.conv_layers)

    def drop_heads(self) -> EKDStudent:
        """Remove the prediction heads (for use as a backbone: no parameter left without a gradient)."""
        self.heads = nn.ModuleList()
        return self

    def forward(self, wave: torch.Tensor, wave_lengths: torch.Tensor, predict: bool = True) -> StudentOutput:
        """wave: (B, S) zero-padded, wave_lengths: (B,) -> StudentOutput."""
        if self.cnn_features is not None and wave.shape[0] == 1 and not torch.is_grad_enabled():
            features = self.cnn_features(self.backbone.feature_extractor, wave)
        elif self.backbone.feature_grad_mult > 0:
            features = self.backbone.feature_extractor(wave)        # (B, C, T)
            if self.backbone.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.backbone.feature_grad_mult)
        else:  # a frozen CNN, as in s3prl's DistillerModel: no graph, no backward through it
            with torch.no_grad():
                features = self.backbone.feature_extractor(wave)    # (B, C, T)
        features = features.transpose(1, 2)                          # (B, T, C)
        frames = features.shape[1]
        frame_lengths = conv_frame_lengths(wave_lengths, self.backbone.conv_layers).clamp(max=frames)
        padding = ~valid_frames(frame_lengths, frames)               # (B, T)
        x = self.backbone.post_extract_proj(features) if self.backbone.post_extract_proj else features
        x = x.masked_fill(padding[..., None], 0.0)
        _, layer_hiddens = self.backbone.encoder(x, padding, get_hidden=True)
        hidden_states = [x] + list(layer_hiddens)
        predictions = [heads(hidden_states[-1]) for heads in self.heads] if predict else []
        if self.residual and predictions:
            shared = predictions[0]
            predictions = [shared] + [shared + residual for residual in predictions[1:]]
        return StudentOutput(hidden_states, frame_lengths, predictions)


def student_from_dict(state: dict, heads: bool = True) -> EKDStudent:
    """Rebuild a student from the plain dict `student_state` returns (config, dims, weights);
    `heads=False` builds the backbone alone."""
    model = EKDStudent(StudentConfig(**state["config"]), state["head_dims"], state["num_targets"],
                       residual=state.get("residual_heads", False))
    if not heads:
        model.drop_heads()
        weights = {k: v for k, v in state["state_dict"].items() if not k.startswith("heads.")}
    else:
        weights = state["state_dict"]
    model.load_state_dict(weights)
    return model


def student_state(model: EKDStudent) -> dict:
    """Plain dict of tensors and Python values: loadable with torch.load(weights_only=True)."""
    return {"config": dataclasses.asdict(model.config), "head_dims": list(model.head_dims),
            "num_targets": model.num_targets, "residual_heads": model.residual,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
