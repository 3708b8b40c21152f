"""The student's backbone as a transformers `HubertModel`: the config, weights and feature-extractor
settings that `AutoModel` / `AutoFeatureExtractor.from_pretrained` load, and the prediction heads apart.

s3prl's DistillerModel backbone (convolutional feature extractor, projection, weight-normed positional
convolution, post-LN transformer layers) is the architecture of transformers' HubertModel, which is how
DistilHuBERT is published. Hidden states, for a student of N layers:

- ours: [0] the projected CNN output (before the positional convolution), [1..N] the layers;
- HubertModel's `hidden_states`: [0] the encoder input *after* the positional convolution and layer
  norm (no state of ours), [1..N] the layers, equal to ours. Our state 0 is
  `model.feature_projection(model.feature_extractor(input_values).transpose(1, 2))`.

The prediction heads (Linear -> GELU -> SplitLinear on the last layer) have no place in HubertModel;
`heads_tensors` gives them as a separate safetensors file with their teachers and layers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from s3prl_ekd.core.frames import parse_conv_layers
from s3prl_ekd.errors import CheckpointError, ConfigError
from s3prl_ekd.io.audio import SAMPLE_RATE

if TYPE_CHECKING:
    import torch
    from transformers import HubertModel

    from s3prl_ekd.core.student import EKDStudent

# transformers (and torch, for the type hints) are imported inside the functions: the CLI imports
# export.py, and this module with it, for `s3prl-ekd export --help`.

HEADS_FILE = "prediction_heads.safetensors"
HEADS_FORMAT = "s3prl-ekd-prediction-heads-v1"
EXTRACTOR_MODES = {"default": "group", "layer_norm": "layer"}  # ours -> HubertConfig.feat_extract_norm
# Student config keys that become HubertConfig keys one to one.
ONE_TO_ONE = {"encoder_layers": "num_hidden_layers", "encoder_embed_dim": "hidden_size",
              "encoder_ffn_embed_dim": "intermediate_size", "encoder_attention_heads": "num_attention_heads",
              "conv_pos": "num_conv_pos_embeddings", "conv_pos_groups": "num_conv_pos_embedding_groups",
              "dropout": "hidden_dropout", "attention_dropout": "attention_dropout",
              "activation_dropout": "activation_dropout"}
# Keys read by the checks and conversions in `hubert_config_kwargs`.
CONVERTED = ("conv_feature_layers", "extractor_mode", "layer_norm_first")
# Keys that do not change what the backbone computes (training settings, the heads' sizes).
TRAINING_ONLY = {"feature_grad_mult": "scales the CNN's gradient in pretraining",
                 "init_from_teacher": "initialisation from the first teacher",
                 "head_inter_dim": "the prediction heads' width (heads are not in HubertModel)",
                 "residual_inter_dim": "the residual head sets' width (heads are not in HubertModel)"}
# What s3prl's DistillerModel fixes and HubertModel must be told (see the module docstring).
FIXED = {
    "hidden_act": "gelu", "feat_extract_activation": "gelu",  # exact GELU in the layers, CNN and pos conv
    "conv_bias": False,                                       # DistillerModel's CNN has no biases
    "layer_norm_eps": 1e-5,                                   # torch's LayerNorm default, as in s3prl
    "feat_proj_layer_norm": False,                            # no layer norm before the projection
    "feat_proj_dropout": 0.0, "layerdrop": 0.0, "final_dropout": 0.0,
    "conv_pos_batch_norm": False, "do_stable_layer_norm": False,  # weight-normed pos conv, post-LN
    "apply_spec_augment": False, "mask_time_prob": 0.0, "mask_feature_prob": 0.0,  # no masked_spec_embed
}

# Backbone weight names (without "backbone.") -> HubertModel names; POS_G / POS_V stand for the
# positional convolution's weight-norm parameters under whatever names this transformers uses.
POS_G, POS_V = "<pos_conv g>", "<pos_conv v>"
WEIGHT_RULES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.weight", r"feature_extractor.conv_layers.\1.conv.weight"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.(weight_g|parametrizations\.weight\.original0)", POS_G),
    (r"encoder\.pos_conv\.0\.(weight_v|parametrizations\.weight\.original1)", POS_V),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
]


def hubert_config_kwargs(student_config: dict) -> dict:
    """HubertConfig keyword arguments for a student config (StudentConfig as a dict).

    A ConfigError names the first key that has no HubertModel equivalent: an unknown key (a student
    option this exporter does not know), pre-LN layers, an unknown extractor_mode, no layers.
    """
    known = {*ONE_TO_ONE, *CONVERTED, *TRAINING_ONLY}
    for key in student_config:
        if key not in known:
            raise ConfigError(f"student.config.{key}: the transformers export does not know how this student "
                              "option maps to HubertConfig, so it cannot promise the same hidden states; "
                              "export with --format superb")
    if student_config.get("layer_norm_first", False):
        raise ConfigError("student.config.layer_norm_first: true (pre-LN layers) has no HubertModel equivalent: "
                          "transformers' pre-LN encoder layer-normalises its last hidden state and s3prl's does "
                          "not; export with --format superb")
    mode = student_config.get("extractor_mode", "default")
    if mode not in EXTRACTOR_MODES:
        raise ConfigError(f"student.config.extractor_mode: {mode!r} has no HubertModel feature extractor "
                          f"(it has {', '.join(EXTRACTOR_MODES)}); export with --format superb")
    if int(student_config["encoder_layers"]) < 1:
        raise ConfigError(f"student.config.encoder_layers: {student_config['encoder_layers']}; a HubertModel "
                          "needs at least one transformer layer")
    layers = parse_conv_layers(student_config["conv_feature_layers"])
    kwargs = {hf: student_config[ours] for ours, hf in ONE_TO_ONE.items()}
    kwargs.update(FIXED, feat_extract_norm=EXTRACTOR_MODES[mode],
                  conv_dim=[c for c, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
                  conv_stride=[s for _, _, s in layers])
    return kwargs


def hubert_weights(backbone: dict[str, torch.Tensor], model: HubertModel) -> dict[str, torch.Tensor]:
    """The student's backbone weights (keys without 'backbone.') under `model`'s state_dict names.

    s3prl has no projection when the CNN's width equals the model's (post_extract_proj = None):
    HubertModel always has one, so it becomes the identity.
    """
    import torch

    targets = model.state_dict()
    pos = "encoder.pos_conv_embed.conv."
    pos_names = ({POS_G: pos + "parametrizations.weight.original0", POS_V: pos + "parametrizations.weight.original1"}
                 if pos + "parametrizations.weight.original0" in targets else
                 {POS_G: pos + "weight_g", POS_V: pos + "weight_v"})
    mapped = {}
    for key, tensor in backbone.items():
        for pattern, replacement in WEIGHT_RULES:
            if re.fullmatch(pattern, key):
                name = re.sub(pattern, replacement, key)
                mapped[pos_names.get(name, name)] = tensor
                break
        else:
            raise CheckpointError(f"student weight backbone.{key}: no place for it in HubertModel; "
                                  "export with --format superb")
    projection = "feature_projection.projection.weight"
    if projection not in mapped:
        weight = targets[projection]
        if weight.shape[0] != weight.shape[1]:
            raise CheckpointError(f"student weights: no backbone.post_extract_proj, but the CNN width {weight.shape[1]} "
                                  f"differs from the model width {weight.shape[0]}; the checkpoint is incomplete")
        mapped[projection] = torch.eye(weight.shape[0], dtype=weight.dtype)
        mapped["feature_projection.projection.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return mapped


def backbone_state(student_state: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a student_state dict, keys without 'backbone.'."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in student_state["state_dict"].items() if k.startswith(prefix)}


def build_hubert(student_state: dict) -> HubertModel:
    """The HubertModel of a student_state dict (core.student.student_state), weights loaded strictly."""
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(**hubert_config_kwargs(student_state["config"]))
    model = HubertModel(config)
    weights = hubert_weights(backbone_state(student_state), model)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise CheckpointError("student weights do not fill the HubertModel: " + " ".join(lines[1:3])[:300]) from None
    return model.eval()


def feature_extractor():
    """Raw 16 kHz waveforms, not normalised (the student was trained on raw waveforms), zero-padded,
    with an attention mask (the model's padding mask; see `padded_batch_note`)."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                    do_normalize=False, return_attention_mask=True)


def hubert_hidden_states(model: HubertModel, input_values: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The student's 1 + N states from a HubertModel: [0] the projected CNN output, then the layers.

    input_values: (B, S) -> [1 + N] (B, T, D); frames beyond each utterance are not zeroed.
    """
    import torch

    with torch.no_grad():
        cnn = model.feature_projection(model.feature_extractor(input_values).transpose(1, 2))
        out = model(input_values, attention_mask=attention_mask, output_hidden_states=True)
    return [cnn, *out.hidden_states[1:]]


def round_trip_differences(student: EKDStudent, model: HubertModel, wave: torch.Tensor) -> list[float]:
    """Largest |student - HubertModel| of each of the 1 + N states on one utterance (S,)."""
    import torch

    with torch.no_grad():
        ours = student(wave[None], torch.tensor([len(wave)]), predict=False).hidden_states
    theirs = hubert_hidden_states(model, wave[None])
    return [float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True)]


@dataclass
class HeadSet:
    """One prediction-head set: its output and hidden sizes, the teachers its targets come from, and
    the set its output is added to (residual head sets), if any."""

    index: int
    dim: int
    inter_dim: int | None
    teachers: list[str]
    adds_to: int | None = None


def head_sets(state: dict) -> list[HeadSet]:
    """The head sets of a model.pt dict, read from the checkpoint (no aggregation mode is assumed).

    One set per teacher when there are as many sets as teachers; with `residual_heads`, set 0 is
    shared by all teachers and set k (k >= 1) is teacher k - 1's residual, added to set 0; any other
    count: every set is labelled with all teachers.
    """
    student = state["student"]
    dims, targets = list(student["head_dims"]), student["num_targets"]
    names = [f"{k}:{t['name']}" for k, t in enumerate(state["teachers"])]
    weights = student["state_dict"]
    inter = [weights[f"heads.{i}.proj.weight"].shape[0] // targets if f"heads.{i}.proj.weight" in weights else None
             for i in range(len(dims))]
    if student.get("residual_heads") and len(dims) == len(names) + 1:
        return [HeadSet(0, dims[0], inter[0], list(names))] + [
            HeadSet(i, dims[i], inter[i], [names[i - 1]], adds_to=0) for i in range(1, len(dims))]
    if len(dims) == len(names):
        return [HeadSet(i, d, inter[i], [names[i]]) for i, d in enumerate(dims)]
    return [HeadSet(i, d, inter[i], list(names)) for i, d in enumerate(dims)]


def heads_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The prediction heads of a model.pt dict as (tensors, safetensors metadata).

    Tensor names are the student's own ('heads.<set>.proj.weight', ...). Each set maps the last
    hidden state (B, T, D) to (B, L, T, dim): Linear(D, L * inter) -> GELU -> SplitLinear(inter, L, dim);
    the metadata names each set's teachers (`head_sets`) and the targets' layers (`teachers`).
    """
    student = state["student"]
    tensors = {k: v.contiguous() for k, v in student["state_dict"].items() if k.startswith("heads.")}
    metadata = {
        "format": HEADS_FORMAT,
        "aggregation": str(state["aggregation"]),
        "input": "last_hidden_state of the HubertModel (the student's last layer)",
        "architecture": "per set: Linear(hidden, targets * inter_dim) -> GELU -> SplitLinear(inter_dim, targets, dim); "
                        "with one target, SplitLinear is a Linear (split.layer.*); "
                        "a set with adds_to predicts its output plus that set's",
        "targets": str(student["num_targets"]),
        "head_sets": json.dumps([dataclasses.asdict(s) for s in head_sets(state)]),
        "teachers": json.dumps([{"name": t["name"], "layers": list(t["layers"]), "weight": t["weight"],
                                 "dim": t["dim"]} for t in state["teachers"]]),
    }
    return tensors, metadata


def padded_batch_note(extractor_mode: str) -> str:
    """What a zero-padded batch with attention_mask gives, for the model card."""
    if EXTRACTOR_MODES.get(extractor_mode) == "layer":
        return ("This student's CNN layer-normalises each frame, so a zero-padded batch with `attention_mask` "
                "gives each utterance's own hidden states on its frames (beyond them the values are not zero: "
                "cut each utterance at its frame count).")
    return ("This student's CNN (extractor_mode `default`) group-normalises its first layer over time, so "
            "zero padding changes every frame of a shorter utterance. A padded batch with `attention_mask` "
            "gives what the student computed on padded batches in pretraining; the s3prl upstream "
            "(`ekd_distiller`) runs utterances of different lengths one at a time: for its numbers, call the "
            "model on one utterance at a time (batch size 1, no padding).")
