"""Build HuBERT / WavLM models with s3prl's own classes and save them in the
checkpoint formats that s3prl's `hubert_local` and `wavlm_local` read.

Used for tiny test teachers, real-size random teachers (benchmarks) and the
teachers the demo trains itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from s3prl_ekd.core.frames import STANDARD_CNN
from s3prl_ekd.io.audio import SAMPLE_RATE
from s3prl_ekd.io.files import atomic_torch_save

# Sizes: name -> architecture fields shared by HuBERT and WavLM.
SIZES = {
    # Real Base size (HuBERT Base, WavLM Base+): 95M parameters.
    "base": dict(encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
                 encoder_attention_heads=12, conv_feature_layers=STANDARD_CNN,
                 conv_pos=128, conv_pos_groups=16),
    # Small enough for CPU tests, same 320-sample hop as the real models.
    "tiny": dict(encoder_layers=3, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                 encoder_attention_heads=2,
                 conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
                 conv_pos=16, conv_pos_groups=4),
}


def architecture(size: str, **overrides) -> dict:
    """The architecture fields for `size` ("tiny" | "base"), with overrides applied."""
    if size not in SIZES:
        raise ValueError(f"unknown teacher size {size!r}; use one of {sorted(SIZES)}")
    return {**SIZES[size], **overrides}


def build_hubert(size: str = "tiny", num_classes: int = 100, **overrides):
    """A randomly initialised s3prl `HubertModel` and its (model_cfg, task_cfg) dicts."""
    from s3prl.upstream.hubert.hubert_model import (
        HubertConfig,
        HubertModel,
        HubertPretrainingConfig,
    )

    arch = architecture(size, **overrides)  # any HubertConfig field may be overridden, e.g. extractor_mode
    model_cfg = {**dict(label_rate=50.0, extractor_mode="default", encoder_layerdrop=0.0, dropout=0.1,
                        attention_dropout=0.1, activation_dropout=0.0,
                        final_dim=min(256, arch["encoder_embed_dim"])), **arch}
    task_cfg = dict(label_rate=50.0, sample_rate=SAMPLE_RATE, normalize=False)
    symbols = [[str(i) for i in range(num_classes)]]
    model = HubertModel(HubertConfig(**model_cfg), HubertPretrainingConfig(**task_cfg), symbols)
    return model, model_cfg, task_cfg, symbols


def build_wavlm(size: str = "tiny", **overrides):
    """A randomly initialised s3prl `WavLM` and its cfg dict."""
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    cfg = {**dict(extractor_mode="default", encoder_layerdrop=0.0, normalize=False, relative_position_embedding=True,
                  num_buckets=320, max_distance=800, gru_rel_pos=True), **architecture(size, **overrides)}
    return WavLM(WavLMConfig(cfg)), cfg


def save_hubert_local(model, model_cfg: dict, task_cfg: dict, symbols, path) -> Path:
    """Write the "converted" HuBERT checkpoint that `s3prl.hub.hubert_local(ckpt=path)` loads."""
    return atomic_torch_save({"task_cfg": dict(task_cfg), "model_cfg": dict(model_cfg),
                         "model_weight": model.state_dict(),
                         "dictionaries_symbols": symbols}, path)


def save_wavlm_local(model, cfg: dict, path) -> Path:
    """Write the checkpoint that `s3prl.hub.wavlm_local(ckpt=path)` loads."""
    return atomic_torch_save({"cfg": dict(cfg), "model": model.state_dict()}, path)


def make_random_teacher(kind: str, path, size: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Save a random-weight teacher of `kind` ("hubert" | "wavlm") at `path`."""
    torch.manual_seed(seed)
    if kind == "hubert":
        model, model_cfg, task_cfg, symbols = build_hubert(size, **overrides)
        return save_hubert_local(model, model_cfg, task_cfg, symbols, path)
    if kind == "wavlm":
        model, cfg = build_wavlm(size, **overrides)
        return save_wavlm_local(model, cfg, path)
    raise ValueError(f"unknown teacher kind {kind!r}; use 'hubert' or 'wavlm'")
