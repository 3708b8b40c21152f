"""Frozen teachers loaded through `s3prl.hub`, returning the layers the heads predict.

Layer numbering is s3prl's: hidden_states[0] is the pre-transformer output and
hidden_states[l] the output of transformer layer l. Each teacher runs once per
batch under torch.inference_mode(); only the selected layers are kept.

A teacher whose frames are another whole ratio apart than the student's (a 10 ms or 40 ms hop
for a 20 ms student) has its layers resampled onto the student's frames (core/frames.py:
`resample_frames`). Its hop is measured, not asked: some s3prl upstreams report a fixed
`get_downsample_rates` whatever their CNN.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import nn

from s3prl_ekd.core.config import TeacherConfig, check_averageable, check_layer_counts, check_layers, default_layers
from s3prl_ekd.core.frames import resample_frames
from s3prl_ekd.core.normalization import LayerStats
from s3prl_ekd.core.precision import DEFAULT_TOLERANCE, check_targets, check_tolerance, layer_errors
from s3prl_ekd.errors import CheckpointError, ConfigError
from s3prl_ekd.io.audio import SAMPLE_RATE

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_FRAME_MISMATCH = 2  # teachers may disagree by a frame or two at the edges (s3prl issue 331)
STUDENT_HOP = 320       # samples per frame of the standard CNN (20 ms at 16 kHz)
# Two probe lengths HOP_PROBE_SAMPLES apart: their frame counts differ by exactly
# HOP_PROBE_SAMPLES / hop for every hop dividing 6 s (any finer than 320, or up to 6x coarser).
HOP_PROBE_SAMPLES = 6 * SAMPLE_RATE


def load_upstream(teacher: TeacherConfig) -> nn.Module:
    """The s3prl upstream for `teacher`, through s3prl.hub (never torch.hub over the network)."""
    import s3prl.hub

    if not hasattr(s3prl.hub, teacher.name):
        raise ConfigError(f"teachers: {teacher.name!r} is not an s3prl.hub entry; "
                          "see `python -c 'import s3prl.hub; print(s3prl.hub.options())'`")
    kwargs = {"ckpt": teacher.ckpt} if teacher.ckpt else {}
    try:
        return getattr(s3prl.hub, teacher.name)(**kwargs)
    except (FileNotFoundError, AssertionError, KeyError, RuntimeError, ValueError) as error:
        where = teacher.ckpt or teacher.name
        raise CheckpointError(f"teacher {teacher.name} ({where}): cannot load ({type(error).__name__}: {error}); "
                              f"check that ckpt is a {teacher.name} checkpoint") from error


def freeze(upstream: nn.Module) -> nn.Module:
    """Eval mode, no gradients, no layer drop."""
    upstream.eval()
    upstream.requires_grad_(False)
    encoder = getattr(getattr(upstream, "model", None), "encoder", None)
    if encoder is not None and hasattr(encoder, "layerdrop"):
        encoder.layerdrop = 0.0
    return upstream


def align_frames(hiddens: Sequence[torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    """Cut every (B, L, T_k, D_k) to the shortest T_k; a larger mismatch is an error."""
    lengths = [h.shape[2] for h in hiddens]
    if max(lengths) - min(lengths) > MAX_FRAME_MISMATCH:
        listed = ", ".join(f"{n}: {t}" for n, t in zip(names, lengths))
        raise ConfigError(f"teachers return different frame counts for the same audio ({listed}); "
                          "their frame rates differ")
    shortest = min(lengths)
    return [h[:, :, :shortest] for h in hiddens]


class TeacherEnsemble(nn.Module):
    """K frozen teachers; `forward` gives each teacher's selected layers on frames `target_hop`
    samples apart, (B, L, T, D_k).

    Call `probe()` (done by the pretrain expert) to learn depths, dimensions and frame hops,
    fill in default layers, and check layer indices, frame rates and dimensions.
    """

    def __init__(self, configs: Sequence[TeacherConfig], teacher_dtype: str = "float32",
                 target_hop: int = STUDENT_HOP):
        super().__init__()
        self.configs = list(configs)
        self.names = [f"{c.name}#{i}" for i, c in enumerate(self.configs)]
        self.upstreams = nn.ModuleList(freeze(load_upstream(c)) for c in self.configs)
        self.teacher_dtype = teacher_dtype
        self.target_hop = target_hop
        self.dims: list[int] = []
        self.depths: list[int] = []
        self.hops: list[int] = []  # measured samples per frame of each teacher (probe)

    def train(self, mode: bool = True):
        return super().train(False)  # teachers stay in eval mode whatever the runner asks

    def _hop(self, i: int, short_frames: int, device) -> int:
        """Teacher i's samples per frame: its frame count on 1 s + HOP_PROBE_SAMPLES of silence minus
        `short_frames` (on 1 s); a ConfigError (one line) if it is not a whole ratio of `target_hop`."""
        long = [torch.zeros(SAMPLE_RATE + HOP_PROBE_SAMPLES, device=device)]
        added = self.upstreams[i](long)["hidden_states"][0].shape[1] - short_frames
        hop = HOP_PROBE_SAMPLES / max(added, 1)
        if hop != int(hop) or (self.target_hop % hop and hop % self.target_hop):
            raise ConfigError(f"teachers[{i}] ({self.configs[i].name}): its frames are {hop:.4g} samples apart and "
                              f"the student's {self.target_hop}; one must be a whole multiple of the other to "
                              f"resample targets onto the student's frames (e.g. {self.target_hop // 2}, "
                              f"{self.target_hop} or {self.target_hop * 2}); use another teacher or student CNN")
        return int(hop)

    @torch.inference_mode()
    def measure_hops(self, device: str | torch.device | None = None) -> list[int]:
        """Each teacher's samples per frame, measured on silence (see `_hop`)."""
        device = device or next(self.parameters()).device
        short = [torch.zeros(SAMPLE_RATE, device=device)]
        self.hops = [self._hop(i, upstream(short)["hidden_states"][0].shape[1], device)
                     for i, upstream in enumerate(self.upstreams)]
        return self.hops

    @torch.inference_mode()
    def probe(self, device: str | torch.device = "cpu", aggregation: str | None = None) -> None:
        """Run silence through each teacher to check the config against the real models and measure
        its frame hop."""
        wav = [torch.zeros(SAMPLE_RATE, device=device)]
        self.depths, self.dims, hops = [], [], []
        for i, (config, upstream) in enumerate(zip(self.configs, self.upstreams)):
            states = upstream(wav)["hidden_states"]
            depth, dim = len(states) - 1, states[-1].shape[-1]
            hops.append(self._hop(i, states[0].shape[1], device))
            self.depths.append(depth)
            self.dims.append(dim)
            if config.layers is None:
                config.layers = default_layers(depth)
            check_layers(config, depth, f"teachers[{i}]")
        self.hops = hops
        check_layer_counts(self.configs, "config")
        if aggregation in ("layerwise_average", "multi_head_residual"):
            check_averageable(dict(zip(self.names, self.dims)), "aggregation", aggregation)

    def _autocast(self, device: torch.device, dtype: str):
        if dtype in AUTOCAST_DTYPES and (device.type == "cuda" or dtype == "bfloat16"):
            return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])
        if device.type != "cuda":
            return contextlib.nullcontext()
        # float32 means float32 even inside the runner's fp16 autocast (large-norm teachers
        # can overflow in fp16, s3prl issue 378)
        return torch.autocast("cuda", enabled=False)

    @property
    def compute_dtype(self) -> str:
        """The dtype the teachers run in: teacher_dtype on CUDA; float32 on CPU."""
        device = next(self.parameters()).device
        return self.teacher_dtype if device.type == "cuda" else "float32"

    @torch.inference_mode()
    def check_precision(self, wavs: list[torch.Tensor], tolerance: float = DEFAULT_TOLERANCE,
                        dtype: str | None = None) -> list[list[float]]:
        """Relative error of `dtype` (default: the compute dtype) targets against float32, per teacher
        and layer, on `wavs`; a ConfigError (one line) on overflow or an error above `tolerance`."""
        dtype = dtype or self.compute_dtype
        reference = self(wavs, dtype="float32")
        approx = self(wavs, dtype=dtype, cast=False)
        errors = []
        for config, name, ref, half in zip(self.configs, self.names, reference, approx):
            check_targets(name, config.layers, half.transpose(1, 2), dtype)
            squared_error, squared_norm = layer_errors(ref.transpose(1, 2), half.float().transpose(1, 2))
            relative = (squared_error / squared_norm.clamp(min=1e-30)).sqrt().tolist()
            check_tolerance(name, config.layers, relative, dtype, tolerance)
            errors.append(relative)
        return errors

    @torch.inference_mode()
    def forward(self, wavs: list[torch.Tensor], dtype: str | None = None, cast: bool = True) -> list[torch.Tensor]:
        """wavs: B unpadded (samples,) tensors -> [K] (B, L, T, D_k) on frames `target_hop` apart,
        aligned; float32 unless `cast=False` (then as computed). `dtype` overrides teacher_dtype
        (CUDA; bfloat16 also on CPU)."""
        if not self.hops:
            self.measure_hops(wavs[0].device)
        hiddens = []
        with self._autocast(wavs[0].device, dtype or self.compute_dtype):
            for config, upstream, hop in zip(self.configs, self.upstreams, self.hops):
                states = upstream(wavs)["hidden_states"]
                selected = torch.stack([states[layer] for layer in config.layers], dim=1)
                selected = resample_frames(selected.float() if cast else selected, hop, self.target_hop)
                hiddens.append(selected)
                del states  # the unselected layers are freed here
        return align_frames(hiddens, self.names)

    @torch.inference_mode()
    def layer_stats(self, wavs: Iterable[torch.Tensor]) -> list[LayerStats]:
        """Per teacher, the running moments of its selected layers (as `forward` returns them, in
        float32) over `wavs`, each (samples,) utterance run alone and whole."""
        stats = [LayerStats.empty(len(c.layers), d) for c, d in zip(self.configs, self.dims)]
        for wav in wavs:
            for stat, hidden in zip(stats, self([wav], dtype="float32")):
                stat.update(hidden[0].transpose(0, 1))  # (T, L, D)
        return stats
