"""s3prl upstream for EKD students: rebuilds the student stored in a checkpoint and returns
its hidden states in the `UpstreamBase` format s3prl's Featurizer and S3PRLUpstream read.

An exported SUPERB submission folder (`s3prl-ekd export`) carries a copy of this module and
of the few it imports (s3prl_ekd.errors, io.strict, io.checkpoint, core.frames, core.student).

Which hidden states go downstream (`hidden_states` option, from `-g model_config.yaml`
or a keyword argument; a keyword wins over the file):

- `backbone` (default, the EKD paper's choice): the CNN output after the input
  projection, then every transformer layer: 1 + encoder_layers states of the student's dim.
- `heads`: the prediction heads' outputs, head set by head set, target layer by target
  layer. `layerwise_average`: one state per target; `layerwise_concat`: each target's
  concatenated output split back into per-teacher chunks (teacher order, then target);
  `multi_head`: each teacher's head for each target; `multi_head_residual`: the shared head
  set's (the teachers' average), then each teacher's final prediction (shared + residual).
  A student without heads (`s3prl-ekd merge` of students of different teachers) refuses it.
- `backbone+heads`: both lists, backbone first.

s3prl's Featurizer sums the selected states with learned weights, so they must share one
dimension: a selection whose states differ in size (e.g. heads of teachers of different
widths) is refused at construction with an error naming the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from s3prl.upstream.interfaces import UpstreamBase
from torch.nn.utils.rnn import pad_sequence

from s3prl_ekd.core.frames import valid_frames
from s3prl_ekd.core.student import EKDStudent, StudentOutput, student_from_dict
from s3prl_ekd.errors import AudioError, ConfigError
from s3prl_ekd.io.checkpoint import read_checkpoint
from s3prl_ekd.io.strict import from_dict, read_yaml_mapping

HIDDEN_STATE_SETS = ("backbone", "heads", "backbone+heads")


@dataclass
class UpstreamOptions:
    """Options of the ekd_distiller upstream (`-g` YAML or keyword arguments)."""

    hidden_states: str = "backbone"  # one of HIDDEN_STATE_SETS, see the module docstring


def load_options(model_config: str | Path | None = None, **overrides) -> UpstreamOptions:
    """Options from an optional YAML file, then keyword overrides (None = not given); strict keys."""
    values = read_yaml_mapping(model_config, "ekd_distiller upstream config (-g)") if model_config else {}
    where = str(model_config) if model_config is not None else "ekd_distiller options"
    values = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    options = from_dict(UpstreamOptions, values, where)
    if options.hidden_states not in HIDDEN_STATE_SETS:
        raise ConfigError(f"{where}: hidden_states={options.hidden_states!r} is not one of "
                          f"{', '.join(HIDDEN_STATE_SETS)}")
    return options


def head_states(predictions: list[torch.Tensor], aggregation: str,
                teacher_dims: list[int | None]) -> list[torch.Tensor]:
    """Prediction-head outputs as one (B, T, D) state per (head set or teacher chunk, target).

    predictions: [head sets] (B, L, T, D_h). layerwise_concat's single set (B, L, T, sum D_k)
    is split into the teachers' chunks (B, L, T, D_k). Order: teacher (or set), then target.
    """
    if aggregation == "layerwise_concat":
        if any(dim is None for dim in teacher_dims):
            raise ConfigError("hidden_states: the per-teacher dimensions of this layerwise_concat model are "
                              "unknown, so its heads cannot be split; use hidden_states: backbone")
        chunks = list(predictions[0].split(list(teacher_dims), dim=-1))
    else:
        chunks = list(predictions)
    return [chunk[:, target] for chunk in chunks for target in range(chunk.shape[1])]


def head_state_names(aggregation: str, teachers: list[dict]) -> list[str]:
    """Names of `head_states`' outputs, e.g. 'head/0:hubert_base/L4' or 'head/average/L4+L8'."""
    targets = list(zip(*(t["layers"] for t in teachers)))
    average = ["head/average/L" + "+".join(dict.fromkeys(map(str, layers))) for layers in targets]
    if aggregation == "layerwise_average":
        return average
    per_teacher = [f"head/{k}:{t['name']}/L{t['layers'][i]}" for k, t in enumerate(teachers) for i in range(len(targets))]
    return average + per_teacher if aggregation == "multi_head_residual" else per_teacher


class UpstreamExpert(UpstreamBase):
    """The EKD student as an s3prl upstream; `ckpt` is a states-*.ckpt or an exported model.pt."""

    def __init__(self, ckpt: str, model_config: str | None = None, hidden_states: str | None = None,
                 refresh: bool = False, **kwargs):
        unknown = set(kwargs) - {"hooks", "hook_postprocess"}
        if unknown:
            raise ConfigError(f"ekd_distiller: unknown option(s) {sorted(unknown)}; "
                              f"valid: hidden_states (one of {', '.join(HIDDEN_STATE_SETS)})")
        super().__init__(**kwargs)
        self.options = load_options(model_config, hidden_states=hidden_states)
        state = read_checkpoint(ckpt)
        self.aggregation: str = state["aggregation"]
        self.teachers: list[dict] = state["teachers"]
        self.step: int = state["step"]
        if self._uses("heads") and not state["student"]["head_dims"]:
            raise ConfigError(f"{ckpt}: hidden_states={self.options.hidden_states}, but this student has no "
                              "prediction heads (a merge of students of different teachers keeps the backbone "
                              "only); use hidden_states: backbone")
        # Heads only when asked for: a backbone-only model has no parameter that never gets a gradient.
        self.student: EKDStudent = student_from_dict(state["student"], heads=self._uses("heads"))
        self.student.eval()
        self.hidden_state_names = self._names()
        self.hidden_state_dims = self._dims()
        if len(set(self.hidden_state_dims)) > 1:
            listed = ", ".join(f"{n}: {d}" for n, d in zip(self.hidden_state_names, self.hidden_state_dims))
            raise ConfigError(f"{ckpt}: hidden_states={self.options.hidden_states} selects states of different "
                              f"sizes ({listed}); s3prl's Featurizer needs one size: use hidden_states: backbone"
                              + ("" if self.options.hidden_states == "heads" else " or heads"))

    def _uses(self, part: str) -> bool:
        return part in self.options.hidden_states.split("+")

    def _names(self) -> list[str]:
        names = []
        if self._uses("backbone"):
            names += ["cnn"] + [f"layer{i + 1}" for i in range(self.student.config.encoder_layers)]
        if self._uses("heads"):
            names += head_state_names(self.aggregation, self.teachers)
        return names

    def _dims(self) -> list[int | None]:
        dims = []
        if self._uses("backbone"):
            dims += [self.student.config.encoder_embed_dim] * (1 + self.student.config.encoder_layers)
        if self._uses("heads"):
            if self.aggregation == "layerwise_concat":
                per_chunk = [t["dim"] for t in self.teachers]
                if None in per_chunk:
                    raise ConfigError(f"hidden_states={self.options.hidden_states}: the per-teacher sizes of this "
                                      "layerwise_concat model are unknown (its teachers' checkpoints could not be "
                                      "read), so its heads cannot be split; use hidden_states: backbone")
            else:
                per_chunk = self.student.head_dims
            dims += [d for d in per_chunk for _ in range(self.student.num_targets)]
        return dims

    def get_downsample_rates(self, key: str) -> int:
        return self.student.downsample_rate

    @property
    def min_samples(self) -> int:
        """The CNN's receptive field: the shortest waveform that yields one frame (400 for the standard CNN)."""
        return self.student.receptive_field

    @property
    def length_dependent_cnn(self) -> bool:
        """The standard ('default') CNN group-normalises its first layer over time, so zero padding
        would change every frame of a shorter utterance: such batches run one utterance at a time."""
        return self.student.config.extractor_mode == "default"

    def _run_student(self, wavs: list[torch.Tensor]) -> StudentOutput:
        """[B] (S_b,) -> StudentOutput with states zeroed beyond each utterance's frames."""
        for i, wav in enumerate(wavs):
            if wav.dim() != 1 or len(wav) < self.min_samples:
                raise AudioError(f"ekd_distiller: waveform {i} has shape {tuple(wav.shape)}; expected a 1-D 16 kHz "
                                 f"waveform of at least {self.min_samples} samples (the student's CNN window)")
        lengths = torch.tensor([len(w) for w in wavs], device=wavs[0].device)
        predict = self._uses("heads")
        if self.length_dependent_cnn and len(set(lengths.tolist())) > 1:
            outs = [self.student(w[None], n[None], predict=predict) for w, n in zip(wavs, lengths)]
            out = StudentOutput(
                [pad_frames([o.hidden_states[i] for o in outs], frame_dim=1) for i in range(len(outs[0].hidden_states))],
                torch.cat([o.frame_lengths for o in outs]),
                [pad_frames([o.predictions[i] for o in outs], frame_dim=2) for i in range(len(outs[0].predictions))])
        else:
            out = self.student(pad_sequence(wavs, batch_first=True), lengths, predict=predict)
        valid = valid_frames(out.frame_lengths, out.hidden_states[0].shape[1])  # (B, T)
        return StudentOutput([h * valid[..., None] for h in out.hidden_states], out.frame_lengths,
                             [p * valid[:, None, :, None] for p in out.predictions])

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        """[B] (S_b,) 16 kHz waveforms -> {'hidden_states': [N] (B, T, D), 'last_hidden_state': (B, T, D)}."""
        out = self._run_student(wavs)
        states = []
        if self._uses("backbone"):
            states += out.hidden_states
        if self._uses("heads"):
            states += head_states(out.predictions, self.aggregation, [t["dim"] for t in self.teachers])
        return {"hidden_states": states, "last_hidden_state": states[-1]}


def pad_frames(tensors: list[torch.Tensor], frame_dim: int) -> torch.Tensor:
    """Concatenate batch-1 tensors on dim 0, zero-padding dimension `frame_dim` to the longest."""
    frames = max(t.shape[frame_dim] for t in tensors)
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 1 - frame_dim) + [0, frames - t.shape[frame_dim]]
        padded.append(torch.nn.functional.pad(t, pad))
    return torch.cat(padded, dim=0)
