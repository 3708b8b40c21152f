"""Train the demo's three small teachers without labels, so that they carry different knowledge.

`hubert`: HuBERT masked prediction of MFCC k-means targets; `robust_hubert`: the same from distorted
input (noise, reverberation, band-limiting) against clean targets, in the recipe continued from the
trained `hubert` as RobustHuBERT continues from HuBERT Base; `wavlm`: s3prl's WavLM with
utterance-mixing denoising. Checkpoints load with `s3prl.hub.hubert_local` / `wavlm_local`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from s3prl_ekd.core import frames
from s3prl_ekd.errors import AudioError, ConfigError
from s3prl_ekd.io.audio import SAMPLE_RATE, audio_info, load_audio
from s3prl_ekd.io.files import atomic_torch_save, atomic_write_json, file_sha256
from s3prl_ekd.plugin.teacher_formats import build_hubert, build_wavlm, save_hubert_local, save_wavlm_local

MIN_SECONDS = 0.5  # shorter utterances leave too few frames for 10-frame mask spans

# Architecture of the demo teachers (teacher_zoo fields): 2.2M parameters, fast on 2 CPU cores.
# The CNN, which dominates the CPU time, is 4x narrower than HuBERT's but keeps its 320-sample hop.
DEFAULT_SIZE = dict(
    encoder_layers=4, encoder_embed_dim=192, encoder_ffn_embed_dim=768, encoder_attention_heads=4,
    conv_feature_layers="[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2",
    conv_pos=64, conv_pos_groups=16,
)
# MFCC frames use the CNN's receptive field as window and its hop (400 and 320 samples, 50 Hz),
# so label i belongs to CNN frame i.
CONV_LAYERS = frames.parse_conv_layers(DEFAULT_SIZE["conv_feature_layers"])
HOP, WINDOW = frames.hop_length(CONV_LAYERS), frames.receptive_field(CONV_LAYERS)
DEFAULT_STEPS = 3000  # the shipped teachers' recipe (pretrain_configs/teachers/README.md)
DEFAULT_LR = 1e-3
DEFAULT_CLUSTERS = 50
# HuBERT Base predicts masked frames only; the demo's short runs also predict the unmasked ones
# (HuBERT's pred_nomask_weight), which teaches the CNN the acoustic classes much sooner.
DEFAULT_UNMASKED_WEIGHT = 1.0
FEATURES_PENALTY_WEIGHT = 10.0  # HuBERT's loss_weights: [10] on the CNN output's mean square
WAVLM_MIX_PROB = 0.5  # fraction of utterances that get a second speaker mixed in
# The mixed-in speaker's power relative to the primary's, in dB, drawn per mix. In this range the
# primary speaker is always the louder one; WavLM's own range is (-5, 5), where loudness alone cannot
# tell the primary speaker. RECIPE's "wavlm_first" run relies on this default, and the demo's
# retraining key holds only RECIPE's settings, so changing it changes that teacher unnoticed.
WAVLM_MIX_GAIN_DB = (-10.0, 0.0)
KMEANS_VERSION = 1  # bump when the MFCC/k-means recipe changes, to invalidate caches
# The corpus the shipped teachers learnt from: the train split of
# `s3prl-ekd corpus synth DIR --utterances 1000 --speakers 12 --seed 0` (800 utterances, 39 min).
# Its sentences are the first 800 of the seed-0 sequence; the demo's test split (seed 0, 1200
# utterances) says sentences 800-1199, so no test sentence was heard by a teacher.
RECIPE_CORPUS = {"utterances": 1000, "speakers": 12, "seed": 0}
RECIPE_SEED = 0
# The shipped teachers' recipe, as named training runs in order: (name, kind, settings), where the
# settings are TeacherTrainingOptions fields and "init" names an earlier run to continue from. The
# runs named like a teacher kind are the teachers. robust_hubert continues hubert on half-distorted
# input, as RobustHuBERT continues HuBERT Base; wavlm continues wavlm_first with the second speaker at
# WavLM's own levels. Why each choice: pretrain_configs/teachers/README.md.
RECIPE = (
    ("hubert", "hubert", {"steps": DEFAULT_STEPS}),
    ("wavlm_first", "wavlm", {"steps": DEFAULT_STEPS}),
    ("robust_hubert", "robust_hubert", {"steps": 1500, "lr": 5e-4, "distort_prob": 0.5, "init": "hubert"}),
    ("wavlm", "wavlm", {"steps": 1500, "lr": 5e-4, "mix_gain_db": (-5.0, 5.0), "init": "wavlm_first"}),
)


# ---------------------------------------------------------------------------------------------
# Targets: MFCC k-means labels at 50 Hz
# ---------------------------------------------------------------------------------------------

def num_frames(samples: int) -> int:
    """Frames the teachers' CNN (and the MFCC below) gives for `samples` samples (0 if too short)."""
    return frames.num_frames(samples, CONV_LAYERS)


def mfcc_features(wav: torch.Tensor) -> torch.Tensor:
    """HuBERT's first-iteration features: 13 Kaldi MFCCs + deltas + delta-deltas.

    (samples,) -> (num_frames(samples), 39), 25 ms window and 20 ms hop, aligned with the CNN frames.
    """
    import torchaudio

    mfcc = torchaudio.compliance.kaldi.mfcc(
        wav.unsqueeze(0), sample_frequency=SAMPLE_RATE, frame_length=1000 * WINDOW / SAMPLE_RATE,
        frame_shift=1000 * HOP / SAMPLE_RATE, use_energy=False, dither=0.0)  # (frames, 13)
    deltas = torchaudio.functional.compute_deltas(mfcc.T)  # (13, frames)
    delta_deltas = torchaudio.functional.compute_deltas(deltas)
    return torch.cat([mfcc, deltas.T, delta_deltas.T], dim=1)


def kmeans(points: torch.Tensor, n_clusters: int, *, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ initialisation, deterministic for a seed.

    points (N, D) -> centroids (n_clusters, D).
    """
    if points.shape[0] < n_clusters:
        raise ConfigError(f"n_clusters: {n_clusters} clusters need at least as many MFCC frames, "
                          f"the corpus has {points.shape[0]}; use fewer clusters or more audio")
    generator = torch.Generator().manual_seed(seed)
    points = points.double()
    centroids = points[torch.randint(points.shape[0], (1,), generator=generator)]
    nearest = torch.cdist(points, centroids).squeeze(1) ** 2  # (N,)
    for _ in range(1, n_clusters):
        pick = torch.multinomial(nearest / nearest.sum(), 1, generator=generator)
        centroids = torch.cat([centroids, points[pick]])
        nearest = torch.minimum(nearest, torch.cdist(points, points[pick]).squeeze(1) ** 2)
    for _ in range(iterations):
        assignment = assign_clusters(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=n_clusters).unsqueeze(1)
        # An empty cluster keeps its centroid rather than collapsing to zero.
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids.float()


def assign_clusters(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid: points (N, D), centroids (K, D) -> (N,) int64."""
    return torch.cdist(points.to(centroids.dtype), centroids).argmin(dim=1)


@dataclass
class ClusterTargets:
    """MFCC k-means labels of a corpus: `labels[i]` (num_frames(len(audio i)),) int64 for file i."""

    files: list[str]
    centroids: torch.Tensor  # (n_clusters, 39), in standardised MFCC space
    mean: torch.Tensor  # (39,) feature standardisation
    std: torch.Tensor  # (39,)
    labels: list[torch.Tensor]

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]


def _corpus_key(files: list[Path], n_clusters: int, seed: int) -> str:
    digest = hashlib.sha256(f"v{KMEANS_VERSION} k={n_clusters} seed={seed}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cluster_targets(files: list[Path], audio: list[torch.Tensor], *, n_clusters: int = DEFAULT_CLUSTERS,
                    seed: int = 0, cache_dir: Path | None = None) -> ClusterTargets:
    """K-means labels for every file, computed once per (file list, n_clusters, seed).

    With `cache_dir`, the result is stored as `kmeans-<hash>.pt` there and reused while the files
    (path, size, mtime) are unchanged.
    """
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"kmeans-{_corpus_key(files, n_clusters, seed)}.pt"
        if cache.is_file():
            state = torch.load(cache, map_location="cpu", weights_only=True)
            return ClusterTargets(files=state["files"], centroids=state["centroids"], mean=state["mean"],
                                  std=state["std"], labels=[lab.long() for lab in state["labels"]])
    features = [mfcc_features(wav) for wav in audio]
    stacked = torch.cat(features)  # (all frames, 39)
    mean, std = stacked.mean(dim=0), stacked.std(dim=0).clamp(min=1e-5)
    # Lloyd iterations on at most 100k frames; labels are assigned to every frame.
    generator = torch.Generator().manual_seed(seed)
    sample = stacked[torch.randperm(stacked.shape[0], generator=generator)[:100_000]]
    centroids = kmeans((sample - mean) / std, n_clusters, seed=seed)
    labels = [assign_clusters((feat - mean) / std, centroids) for feat in features]
    targets = ClusterTargets(files=[str(f) for f in files], centroids=centroids, mean=mean, std=std,
                             labels=labels)
    if cache is not None:
        atomic_torch_save({"files": targets.files, "centroids": centroids, "mean": mean, "std": std,
                           "labels": [lab.to(torch.int16) for lab in labels]}, cache)
    return targets


# ---------------------------------------------------------------------------------------------
# Input corruptions: distortion (robust HuBERT) and utterance mixing (WavLM)
# ---------------------------------------------------------------------------------------------

def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _power(wav: torch.Tensor) -> torch.Tensor:
    return wav.pow(2).mean().clamp(min=1e-10)


def distort(wav: torch.Tensor, generator: torch.Generator, *, snr_db: tuple[float, float] = (0.0, 20.0),
            reverb_prob: float = 0.5, rt60: tuple[float, float] = (0.2, 0.8),
            bandlimit_prob: float = 0.5, low_cut_hz: tuple[float, float] = (0.0, 400.0),
            high_cut_hz: tuple[float, float] = (1500.0, 4000.0)) -> torch.Tensor:
    """A distorted copy of one utterance: (samples,) -> (samples,), same length.

    In order: with `reverb_prob`, reverberation by an exponentially decaying noise impulse response
    (RT60 drawn from `rt60` seconds); with `bandlimit_prob`, a band-pass keeping
    [low_cut_hz, high_cut_hz]; always, additive coloured noise (spectral slope 1/f^a, a in [0, 2])
    at an SNR drawn from `snr_db`. Every random draw comes from `generator`.
    """
    samples = wav.shape[0]
    out = wav
    if torch.rand((), generator=generator).item() < reverb_prob:
        decay_s = _uniform(generator, *rt60)
        taps = int(decay_s * SAMPLE_RATE)
        time_s = torch.arange(taps) / SAMPLE_RATE
        impulse = torch.randn(taps, generator=generator) * torch.exp(-6.9 * time_s / decay_s)
        impulse[0] = 1.0  # the direct path
        impulse = impulse / impulse.norm()
        import torchaudio

        reverberant = torchaudio.functional.fftconvolve(out, impulse)[:samples]
        out = reverberant * (_power(out) / _power(reverberant)).sqrt()
    if torch.rand((), generator=generator).item() < bandlimit_prob:
        low, high = _uniform(generator, *low_cut_hz), _uniform(generator, *high_cut_hz)
        spectrum = torch.fft.rfft(out)
        freqs = torch.fft.rfftfreq(samples, d=1 / SAMPLE_RATE)
        out = torch.fft.irfft(spectrum * ((freqs >= low) & (freqs <= high)), n=samples)
    slope = _uniform(generator, 0.0, 2.0)
    noise_spectrum = torch.fft.rfft(torch.randn(samples, generator=generator))
    freqs = torch.fft.rfftfreq(samples, d=1 / SAMPLE_RATE).clamp(min=20.0)
    noise = torch.fft.irfft(noise_spectrum * freqs.pow(-slope / 2), n=samples)
    snr = _uniform(generator, *snr_db)
    noise = noise * (_power(out) / _power(noise) / 10 ** (snr / 10)).sqrt()
    return out + noise


def mix_utterances(primary: torch.Tensor, secondary: torch.Tensor, generator: torch.Generator, *,
                   overlap: tuple[float, float] = (0.1, 0.5),
                   gain_db: tuple[float, float] = WAVLM_MIX_GAIN_DB) -> torch.Tensor:
    """WavLM's utterance mixing: `primary` (P,) with a segment of `secondary` (S,) added -> (P,).

    The segment covers a fraction of the primary drawn from `overlap` (at most half, so the primary
    speaker stays the main one), starts at a random place, and is scaled so that its power is
    `gain_db` (drawn) relative to the primary utterance's power.
    """
    length = min(int(_uniform(generator, *overlap) * primary.shape[0]), secondary.shape[0])
    if length == 0:
        return primary.clone()
    start = int(torch.randint(primary.shape[0] - length + 1, (), generator=generator))
    source = int(torch.randint(secondary.shape[0] - length + 1, (), generator=generator))
    segment = secondary[source:source + length]
    gain = _uniform(generator, *gain_db)
    segment = segment * (_power(primary) / _power(segment) * 10 ** (gain / 10)).sqrt()
    mixed = primary.clone()
    mixed[start:start + length] += segment
    return mixed


# ---------------------------------------------------------------------------------------------
# Masked-prediction objectives on s3prl's models
# ---------------------------------------------------------------------------------------------

class MaskedPredictionLoss(NamedTuple):
    """The training loss and, for monitoring, its masked-prediction part and top-1 accuracy."""

    loss: torch.Tensor  # scalar: cross_entropy + FEATURES_PENALTY_WEIGHT * CNN output mean square
    cross_entropy: float  # over masked frames
    accuracy: float  # fraction of masked frames whose k-means cluster is ranked first


def hubert_masked_loss(model, wavs: torch.Tensor, labels: torch.Tensor, *,
                       unmasked_weight: float = 0.0) -> MaskedPredictionLoss:
    """HuBERT's pretraining loss with s3prl's `HubertModel.forward` (masking, label embeddings,
    cosine logits / logit_temp, final_proj): cross-entropy over masked frames (logit 0 is the true
    cluster), plus `unmasked_weight` x the same over unmasked frames (HuBERT's pred_nomask_weight),
    plus 10 x the CNN output's mean square (HuBERT's features_pen).

    wavs (B, samples), labels (B, frames) int64.
    """
    no_padding = torch.zeros(wavs.shape, dtype=torch.bool)
    result = model(wavs, target_list=[labels], padding_mask=no_padding, mask=True)
    masked = result["logit_m_list"][0].float()  # (masked frames, 1 + n_clusters)
    unmasked = result["logit_u_list"][0].float()  # (other frames, 1 + n_clusters)
    cross_entropy = F.cross_entropy(masked, masked.new_zeros(masked.shape[0], dtype=torch.long))
    loss = cross_entropy + FEATURES_PENALTY_WEIGHT * result["features_pen"]
    if unmasked_weight > 0 and unmasked.shape[0] > 0:
        loss = loss + unmasked_weight * F.cross_entropy(
            unmasked, unmasked.new_zeros(unmasked.shape[0], dtype=torch.long))
    return MaskedPredictionLoss(loss=loss, cross_entropy=float(cross_entropy.detach()),
                                accuracy=float((masked.argmax(dim=1) == 0).float().mean()))


def wavlm_masked_loss(model, head: torch.nn.Linear, wavs: torch.Tensor, labels: torch.Tensor, *,
                      unmasked_weight: float = 0.0) -> MaskedPredictionLoss:
    """Masked prediction through s3prl's `WavLM` modules, which have no pretraining forward:
    CNN -> layer norm -> projection -> `apply_mask` -> encoder, then `head` maps frames to cluster
    logits; the same loss terms as `hubert_masked_loss`.

    wavs (B, samples), labels (B, frames) int64.
    """
    features = model.feature_extractor(wavs)  # (B, C, T)
    features_pen = features.float().pow(2).mean()
    frames = min(features.shape[2], labels.shape[1])
    features, labels = features[..., :frames], labels[:, :frames]
    features = model.layer_norm(features.transpose(1, 2))  # (B, T, C)
    if model.post_extract_proj is not None:
        features = model.post_extract_proj(features)  # (B, T, D)
    features = model.dropout_input(features)
    no_padding = torch.zeros(features.shape[:2], dtype=torch.bool)
    x, mask_indices = model.apply_mask(features, no_padding)  # mask_indices (B, T) bool
    x, _ = model.encoder(x, padding_mask=no_padding)  # (B, T, D)
    logits = head(x).float()  # (B, T, n_clusters)
    masked, targets = logits[mask_indices], labels[mask_indices]
    cross_entropy = F.cross_entropy(masked, targets)
    loss = cross_entropy + FEATURES_PENALTY_WEIGHT * features_pen
    if unmasked_weight > 0 and (~mask_indices).any():
        loss = loss + unmasked_weight * F.cross_entropy(logits[~mask_indices], labels[~mask_indices])
    return MaskedPredictionLoss(loss=loss, cross_entropy=float(cross_entropy.detach()),
                                accuracy=float((masked.argmax(dim=1) == targets).float().mean()))


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

def _require(ok: bool, name: str, value, need: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is not allowed; use {need}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TeacherTrainingOptions:
    """How one teacher is trained. Every field is checked on construction (a ConfigError names it);
    `size` is stored resolved (DEFAULT_SIZE with its overrides), `mix_gain_db` as a float pair."""

    steps: int = DEFAULT_STEPS
    seed: int = 0
    batch_size: int = 8
    crop_seconds: float = 2.0  # crops of this length, or of the batch's shortest utterance
    lr: float = DEFAULT_LR  # AdamW's peak learning rate: 10% linear warm-up, then cosine decay
    n_clusters: int = DEFAULT_CLUSTERS  # k-means clusters of the MFCC targets
    unmasked_weight: float = DEFAULT_UNMASKED_WEIGHT  # HuBERT's pred_nomask_weight
    cache_dir: Path | None = None  # where k-means targets are cached; None: the checkpoint's folder
    # Continue from this checkpoint (the kind's format, same size and, for hubert, clusters).
    init_from: Path | None = None
    distort_prob: float = 1.0  # robust_hubert: fraction of the inputs distorted
    mix_gain_db: tuple[float, float] = WAVLM_MIX_GAIN_DB  # wavlm: (low, high) of the second speaker
    size: dict | None = None  # overrides of DEFAULT_SIZE
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self) -> None:
        _require(_is_int(self.steps) and self.steps >= 1, "steps", self.steps, "an integer >= 1")
        _require(_is_int(self.seed), "seed", self.seed, "an integer")
        _require(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size,
                 "an integer >= 1")
        _require(_is_number(self.crop_seconds) and self.crop_seconds >= MIN_SECONDS, "crop_seconds",
                 self.crop_seconds, f"a number of seconds >= {MIN_SECONDS}")
        _require(_is_number(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        _require(_is_int(self.n_clusters) and self.n_clusters >= 2, "n_clusters", self.n_clusters,
                 "an integer >= 2")
        _require(_is_number(self.unmasked_weight) and self.unmasked_weight >= 0, "unmasked_weight",
                 self.unmasked_weight, "a number >= 0")
        _require(_is_number(self.distort_prob) and 0 <= self.distort_prob <= 1, "distort_prob",
                 self.distort_prob, "a probability, 0 <= distort_prob <= 1")
        gain = tuple(self.mix_gain_db) if isinstance(self.mix_gain_db, (tuple, list)) else ()
        _require(len(gain) == 2 and all(map(_is_number, gain)) and gain[0] <= gain[1], "mix_gain_db",
                 self.mix_gain_db, "two numbers (low, high) with low <= high, in dB")
        _require(isinstance(self.progress, bool), "progress", self.progress, "True or False")
        object.__setattr__(self, "mix_gain_db", tuple(float(x) for x in gain))
        object.__setattr__(self, "size", resolve_size(self.size))
        for name in ("cache_dir", "init_from"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


def resolve_size(size: dict | None) -> dict:
    """DEFAULT_SIZE with `size`'s overrides; an unknown key, or a CNN whose frames would not match
    the MFCC targets' (WINDOW, HOP), is a ConfigError."""
    size = dict(size or {})
    unknown = sorted(set(size) - set(DEFAULT_SIZE))
    if unknown:
        raise ConfigError(f"size: unknown key(s) {unknown}; use some of {sorted(DEFAULT_SIZE)}")
    size = {**DEFAULT_SIZE, **size}
    layers = frames.parse_conv_layers(size["conv_feature_layers"])
    if (frames.hop_length(layers), frames.receptive_field(layers)) != (HOP, WINDOW):
        raise ConfigError(f"size.conv_feature_layers: {size['conv_feature_layers']!r} has another hop or receptive "
                          f"field than the MFCC targets ({HOP}, {WINDOW} samples); keep the strides and kernels")
    return size


# ---------------------------------------------------------------------------------------------
# Teacher kinds: a model in one of s3prl's checkpoint formats, and an input corruption
# ---------------------------------------------------------------------------------------------

class _TeacherModel:
    """A teacher being trained in one of s3prl's checkpoint formats: its trainable parameters, its
    masked-prediction loss and its checkpoint. Constructing one draws its initial weights from
    torch's global RNG."""

    form: str  # the s3prl hub entry that loads the checkpoint
    cfg_key: str  # where the checkpoint holds the model config
    weights_key: str  # where it holds the weights
    model: torch.nn.Module
    cfg: dict  # the model config saved with the weights

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def loss(self, wavs: torch.Tensor, labels: torch.Tensor, unmasked_weight: float) -> MaskedPredictionLoss:
        raise NotImplementedError

    def save(self, path: Path) -> Path:
        raise NotImplementedError

    def continue_from(self, init_from: Path) -> None:
        """Copy a checkpoint's weights into the model; another format, architecture or cluster count is
        a ConfigError naming the file."""
        try:
            state = torch.load(init_from, map_location="cpu", weights_only=True)
            saved_cfg, weights = state[self.cfg_key], state[self.weights_key]
        except (OSError, KeyError, RuntimeError, TypeError) as error:
            raise ConfigError(f"init_from {init_from}: not a readable {self.form} checkpoint ({error})") from error
        differing = sorted(k for k in self.cfg if saved_cfg.get(k) != self.cfg[k])
        if differing:
            raise ConfigError(f"init_from {init_from}: its {', '.join(differing)} differ from the teacher being "
                              "trained; continue from a checkpoint of the same size")
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as error:  # e.g. another number of k-means clusters
            raise ConfigError(f"init_from {init_from}: weights do not fit ({str(error).splitlines()[0]}); train "
                              "with the same --clusters as that checkpoint") from error


class _HubertModel(_TeacherModel):
    """s3prl's HubertModel, whose own final_proj and label embeddings predict the clusters."""

    form, cfg_key, weights_key = "hubert_local", "model_cfg", "model_weight"

    def __init__(self, architecture: dict, n_clusters: int):
        self.model, self.cfg, self.task_cfg, self.symbols = build_hubert("tiny", num_classes=n_clusters,
                                                                         **architecture)

    def loss(self, wavs, labels, unmasked_weight):
        return hubert_masked_loss(self.model, wavs, labels, unmasked_weight=unmasked_weight)

    def save(self, path):
        return save_hubert_local(self.model, self.cfg, self.task_cfg, self.symbols, path)


class _WavLMModel(_TeacherModel):
    """s3prl's WavLM with a linear prediction head. The head is a pretraining module: trained, not
    saved, so a continued run starts it afresh."""

    form, cfg_key, weights_key = "wavlm_local", "cfg", "model"

    def __init__(self, architecture: dict, n_clusters: int):
        self.model, self.cfg = build_wavlm("tiny", **architecture)
        self.head = torch.nn.Linear(architecture["encoder_embed_dim"], n_clusters)

    def parameters(self):
        return [*self.model.parameters(), *self.head.parameters()]

    def loss(self, wavs, labels, unmasked_weight):
        return wavlm_masked_loss(self.model, self.head, wavs, labels, unmasked_weight=unmasked_weight)

    def save(self, path):
        return save_wavlm_local(self.model, self.cfg, path)


class _Batches:
    """Random crops of the corpus: each step draws `batch_size` utterances (epoch-wise shuffling),
    crops them to a common length (crop_samples or the shortest one), starting on a 320-sample
    boundary so that the k-means labels stay aligned. Every draw comes from `generator`."""

    def __init__(self, audio, labels, batch_size: int, crop_samples: int, generator: torch.Generator):
        self.audio, self.labels = audio, labels
        self.batch_size, self.crop_samples, self.generator = batch_size, crop_samples, generator
        self.order: list[int] = []

    def _next_index(self) -> int:
        if not self.order:
            self.order = torch.randperm(len(self.audio), generator=self.generator).tolist()
        return self.order.pop()

    def random_index(self) -> int:
        return int(torch.randint(len(self.audio), (), generator=self.generator))

    def next(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """-> (utterance indices, clean crops (B, samples), labels (B, frames))."""
        indices = [self._next_index() for _ in range(self.batch_size)]
        length = min(self.crop_samples, *(self.audio[i].shape[0] for i in indices))
        frames = num_frames(length)
        wavs, labels = [], []
        for i in indices:
            start_frame = int(torch.randint((self.audio[i].shape[0] - length) // HOP + 1, (),
                                            generator=self.generator))
            wavs.append(self.audio[i][start_frame * HOP:start_frame * HOP + length])
            labels.append(self.labels[i][start_frame:start_frame + frames])
        return indices, torch.stack(wavs), torch.stack(labels)


# An input corruption: (clean crops (B, samples), their utterance indices, the batches, options)
# -> inputs (B, samples). It draws from the batches' generator, after the crops of its step.
Corruption = Callable[[torch.Tensor, list[int], _Batches, TeacherTrainingOptions], torch.Tensor]


def clean_input(wavs: torch.Tensor, indices: list[int], batches: _Batches,
                options: TeacherTrainingOptions) -> torch.Tensor:
    """No corruption: the masked-prediction targets' own audio (HuBERT)."""
    return wavs


def distorted_input(wavs: torch.Tensor, indices: list[int], batches: _Batches,
                    options: TeacherTrainingOptions) -> torch.Tensor:
    """Each crop distorted (`distort`) with probability `options.distort_prob` (robust HuBERT).

    At distort_prob 1 no coin is drawn, so such a run's stream holds the distortions alone.
    """
    generator = batches.generator
    return torch.stack([distort(wav, generator) if options.distort_prob == 1.0
                        or torch.rand((), generator=generator).item() < options.distort_prob else wav
                        for wav in wavs])


def mixed_input(wavs: torch.Tensor, indices: list[int], batches: _Batches,
                options: TeacherTrainingOptions) -> torch.Tensor:
    """WavLM's utterance mixing: per crop, another utterance is drawn, then with WAVLM_MIX_PROB (and
    if it is not the crop's own) a segment of it is mixed in at `options.mix_gain_db`."""
    mixed = []
    for i, wav in zip(indices, wavs):
        other = batches.random_index()
        if other != i and torch.rand((), generator=batches.generator).item() < WAVLM_MIX_PROB:
            wav = mix_utterances(wav, batches.audio[other], batches.generator, gain_db=options.mix_gain_db)
        mixed.append(wav)
    return torch.stack(mixed)


@dataclass(frozen=True)
class TeacherType:
    """What sets one kind of teacher apart: its model and checkpoint format, its input corruption, and
    the options only it uses (recorded in the loss file)."""

    model: type[_TeacherModel]
    corruption: Corruption
    settings: tuple[str, ...] = ()

    @property
    def hub_entry(self) -> str:
        """The s3prl hub entry that loads this kind's checkpoints."""
        return self.model.form


TEACHER_TYPES: dict[str, TeacherType] = {
    "hubert": TeacherType(_HubertModel, clean_input),
    "robust_hubert": TeacherType(_HubertModel, distorted_input, ("distort_prob",)),
    "wavlm": TeacherType(_WavLMModel, mixed_input, ("mix_gain_db",)),
}
KINDS: tuple[str, ...] = tuple(TEACHER_TYPES)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass
class TeacherTrainingResult:
    kind: str
    ckpt_path: Path
    loss_curve_path: Path
    loss_curve: list[tuple[int, float]]  # (step, training loss), steps 1..steps
    cross_entropy_curve: list[tuple[int, float]]  # (step, masked-prediction cross-entropy)
    accuracy_curve: list[tuple[int, float]]  # (step, masked-prediction top-1 accuracy)
    seconds: float  # whole call, including audio loading and k-means
    seconds_per_step: float  # wall-clock, training loop only
    cpu_seconds_per_step: float  # CPU time of this process (all threads), training loop only
    num_parameters: int  # of the saved model
    config: dict = field(default_factory=dict)  # the resolved settings, as written to the loss file


def loss_curve_path(ckpt_path: str | Path) -> Path:
    """Where `train_teacher` writes the loss curve of the checkpoint at `ckpt_path`."""
    return Path(ckpt_path).with_suffix(".loss.json")


def _load_corpus(audio_files: list[Path]) -> list[torch.Tensor]:
    audio = []
    for path in audio_files:
        info = audio_info(path)
        if info.frames < MIN_SECONDS * SAMPLE_RATE:
            raise AudioError(f"{path}: {info.frames / SAMPLE_RATE:.2f} s is too short to train a teacher "
                             f"(minimum {MIN_SECONDS} s); remove it from the file list")
        audio.append(load_audio(path))
    return audio


def train_teacher(kind: str, audio_files: list[Path], out_path: Path,
                  options: TeacherTrainingOptions | None = None) -> TeacherTrainingResult:
    """Train a `kind` teacher (a key of TEACHER_TYPES) on `audio_files` (16 kHz mono) and save it at
    `out_path` in its kind's format, from scratch or continued from `options.init_from`.

    The loss curve and the resolved settings go to `loss_curve_path(out_path)`. K-means targets are
    cached in `options.cache_dir` (default: `out_path`'s folder), so teachers trained on the same
    files share them. Same kind, files and options give the same checkpoint on CPU. Global RNG
    states are restored afterwards.
    """
    started = time.perf_counter()
    options = TeacherTrainingOptions() if options is None else options
    if kind not in TEACHER_TYPES:
        raise ConfigError(f"kind: unknown teacher kind {kind!r}; use one of {list(KINDS)}")
    audio_files = [Path(f) for f in audio_files]
    if not audio_files:
        raise AudioError("teacher training: the audio file list is empty; pass the corpus' wav files")
    if options.init_from is not None and not options.init_from.is_file():
        raise ConfigError(f"init_from: {options.init_from} is not a file; give a checkpoint to continue from")
    out_path = Path(out_path)
    config = dict(kind=kind, steps=options.steps, seed=options.seed, size=options.size,
                  batch_size=options.batch_size, crop_seconds=options.crop_seconds, lr=options.lr,
                  n_clusters=options.n_clusters, unmasked_weight=options.unmasked_weight,
                  num_files=len(audio_files))
    if options.init_from is not None:
        config["init_from"] = {"file": options.init_from.name, "sha256": file_sha256(options.init_from)}
    for name in TEACHER_TYPES[kind].settings:
        value = getattr(options, name)
        config[name] = list(value) if isinstance(value, tuple) else value

    audio = _load_corpus(audio_files)
    targets = cluster_targets(audio_files, audio, n_clusters=options.n_clusters, seed=options.seed,
                              cache_dir=out_path.parent if options.cache_dir is None else options.cache_dir)

    numpy_state = np.random.get_state()  # s3prl's compute_mask_indices draws from numpy's global RNG
    train_started, cpu_started = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        np.random.seed(options.seed)
        records, teacher = _train(kind, audio, targets, options)
    np.random.set_state(numpy_state)
    train_seconds = time.perf_counter() - train_started
    cpu_seconds = time.process_time() - cpu_started
    teacher.save(out_path)

    result = TeacherTrainingResult(
        kind=kind, ckpt_path=out_path, loss_curve_path=loss_curve_path(out_path),
        loss_curve=[(step, r.loss) for step, r in records],
        cross_entropy_curve=[(step, r.cross_entropy) for step, r in records],
        accuracy_curve=[(step, r.accuracy) for step, r in records],
        seconds=time.perf_counter() - started, seconds_per_step=train_seconds / options.steps,
        cpu_seconds_per_step=cpu_seconds / options.steps,
        num_parameters=sum(p.numel() for p in teacher.model.parameters()), config=config)
    summary = {**config, "seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
               "cpu_seconds_per_step": result.cpu_seconds_per_step,
               "num_parameters": result.num_parameters, "loss": result.loss_curve,
               "cross_entropy": result.cross_entropy_curve, "accuracy": result.accuracy_curve}
    atomic_write_json(result.loss_curve_path, summary)
    return result


def _train(kind: str, audio: list[torch.Tensor], targets: ClusterTargets, options: TeacherTrainingOptions):
    """The training loop proper; call with the global RNGs seeded.

    Draw order: the model's initial weights from torch's global RNG; then, per step, the batch's crops
    and then its corruption from one generator seeded `seed + 1`; masking and dropout inside the loss
    from the global RNGs.
    -> ([(step, MaskedPredictionLoss with float loss)], the trained _TeacherModel).
    """
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    spec = TEACHER_TYPES[kind]
    teacher = spec.model(options.size, targets.n_clusters)
    if options.init_from is not None:
        teacher.continue_from(options.init_from)
    parameters = teacher.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, options.steps // 10),
                                               num_training_steps=options.steps)
    batches = _Batches(audio, targets.labels, options.batch_size, int(options.crop_seconds * SAMPLE_RATE),
                       torch.Generator().manual_seed(options.seed + 1))

    teacher.model.train()
    records: list[tuple[int, MaskedPredictionLoss]] = []
    bar = tqdm(range(1, options.steps + 1), desc=f"teacher {kind}", disable=not options.progress,
               dynamic_ncols=True)
    for step in bar:
        indices, wavs, labels = batches.next()  # wavs (B, samples), labels (B, frames)
        wavs = spec.corruption(wavs, indices, batches, options)
        result = teacher.loss(wavs, labels, options.unmasked_weight)
        optimizer.zero_grad()
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimizer.step()
        schedule.step()
        records.append((step, result._replace(loss=float(result.loss.detach()))))
        bar.set_postfix(loss=f"{records[-1][1].loss:.3f}", acc=f"{result.accuracy:.2f}")
    teacher.model.eval()
    return records, teacher


# ---------------------------------------------------------------------------------------------
# Command line: `s3prl-ekd teachers train`
# ---------------------------------------------------------------------------------------------

def register_cli(subparsers) -> None:
    teachers = subparsers.add_parser("teachers", help="train small teachers without labels (demo)")
    actions = teachers.add_subparsers(dest="teachers_command", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", help="train one teacher on a folder of 16 kHz speech",
        description="Train a hubert / robust_hubert / wavlm teacher by masked prediction of MFCC k-means "
                    "targets; the checkpoint loads with s3prl's hubert_local / wavlm_local.")
    train.add_argument("--kind", choices=KINDS, required=True)
    train.add_argument("--audio-dir", type=Path, required=True, help="folder searched for .wav/.flac/.ogg")
    train.add_argument("--out", type=Path, required=True, help="checkpoint path; the loss curve goes beside it")
    train.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--crop-seconds", type=float, default=2.0)
    train.add_argument("--lr", type=float, default=DEFAULT_LR)
    train.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="k-means clusters (targets)")
    train.add_argument("--init", type=Path, help="continue from this checkpoint of the same kind and size")
    train.add_argument("--distort-prob", type=float, default=1.0,
                       help="robust_hubert: fraction of the inputs distorted (default 1)")
    train.add_argument("--mix-gain-db", type=_gain_range, default=WAVLM_MIX_GAIN_DB, metavar="LOW,HIGH",
                       help="wavlm: range of the mixed-in speaker's power relative to the primary's, in dB "
                            "(default -10,0: the primary stays louder; WavLM's is --mix-gain-db=-5,5)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cli_train)


def _gain_range(text: str) -> tuple[float, float]:
    import argparse

    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers, LOW,HIGH (e.g. -5,5)") from None
    return low, high


def _cli_train(args) -> int:
    from s3prl_ekd.io.audio import list_audio_files

    options = TeacherTrainingOptions(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, crop_seconds=args.crop_seconds,
        lr=args.lr, n_clusters=args.clusters, init_from=args.init, distort_prob=args.distort_prob,
        mix_gain_db=args.mix_gain_db, progress=not args.quiet)
    result = train_teacher(args.kind, list_audio_files(args.audio_dir), args.out, options)
    tenth = max(1, len(result.loss_curve) // 10)
    first = sum(loss for _, loss in result.loss_curve[:tenth]) / tenth
    last = sum(loss for _, loss in result.loss_curve[-tenth:]) / tenth
    print(f"{result.ckpt_path}: {result.kind} teacher, {result.num_parameters / 1e6:.2f}M parameters, "
          f"loss {first:.3f} -> {last:.3f} over {options.steps} steps ({result.seconds:.0f} s, "
          f"{result.seconds_per_step:.2f} s/step); curve: {result.loss_curve_path}")
    return 0
