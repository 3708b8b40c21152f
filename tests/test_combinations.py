"""Ways of combining teachers beyond the paper: residual heads, per-teacher target statistics,
learned head-set weights, teachers at other frame rates and a common initialisation. Each against
hand-computed tensors, refused in one line where it cannot apply, and run through s3prl's runner,
live and from a target store."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import model_config, run_pretrain_cli, tiny_student, write_yaml

from s3prl_ekd.core.aggregation import build_targets, head_dims, head_weights
from s3prl_ekd.core.config import load_config
from s3prl_ekd.core.distill import DistillObjective, build_student, head_set_names
from s3prl_ekd.core.frames import resample_frames
from s3prl_ekd.core.loss import UncertaintyWeights
from s3prl_ekd.core.normalization import LayerStats
from s3prl_ekd.core.student import EKDStudent, StudentConfig, student_from_dict, student_state
from s3prl_ekd.errors import ConfigError
from s3prl_ekd.io.audio import load_audio
from s3prl_ekd.io.checkpoint import (
    INIT_KEY,
    LOSS_WEIGHTS_KEY,
    TARGET_NORM_KEY,
    TEACHER_FINGERPRINTS_KEY,
    runner_checkpoints_allowed,
)
from s3prl_ekd.io.events import read_scalars
from s3prl_ekd.io.files import file_sha256
from s3prl_ekd.plugin.pretrain_data import statistics_utterances
from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert
from s3prl_ekd.plugin.teacher_formats import make_random_teacher

FINE_CNN = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)]"  # 160 samples per frame (10 ms)
SIGMOID_LOSS = lambda c: -math.log(1 / (1 + math.exp(-c)))  # noqa: E731  -log sigmoid(cos)


def frames(*rows) -> torch.Tensor:
    """Frames [D] ... -> (B=1, L=1, T, D)."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# -- frames ------------------------------------------------------------------------------------

def test_resample_frames_hand_computed():
    x = frames([0.0], [10.0], [20.0], [30.0], [40.0])
    # 10 ms -> 20 ms: means of pairs; the unpaired last frame is dropped
    assert resample_frames(x, 160, 320).flatten().tolist() == [5.0, 25.0]
    # 40 ms -> 20 ms: output frame i at (i + 1/2) / 2 - 1/2 source frames, clamped at both ends
    y = frames([0.0], [10.0], [20.0])
    assert resample_frames(y, 640, 320).flatten().tolist() == [0.0, 2.5, 7.5, 12.5, 17.5, 20.0]
    # 80 ms -> 20 ms: positions -3/8, -1/8, 1/8, 3/8, 5/8, 7/8, 9/8, 11/8
    z = frames([0.0], [8.0])
    assert resample_frames(z, 1280, 320).flatten().tolist() == [0.0, 0.0, 1.0, 3.0, 5.0, 7.0, 8.0, 8.0]
    assert resample_frames(x, 320, 320) is x
    with pytest.raises(ValueError, match="480 and 320"):
        resample_frames(x, 480, 320)


def test_resample_frames_keeps_batch_layers_and_features_apart():
    x = torch.randn(2, 3, 9, 5)
    pooled = resample_frames(x, 160, 320)
    assert pooled.shape == (2, 3, 4, 5)
    torch.testing.assert_close(pooled[1, 2, 3], (x[1, 2, 6] + x[1, 2, 7]) / 2)
    stretched = resample_frames(x, 960, 320)                           # 3x coarser
    assert stretched.shape == (2, 3, 27, 5)
    torch.testing.assert_close(stretched[0, 1, 4], x[0, 1, 1])        # position (4.5) / 3 - 0.5 = 1
    torch.testing.assert_close(stretched[0, 1, 5], x[0, 1, 1] * 2 / 3 + x[0, 1, 2] / 3)


# -- multi_head_residual -----------------------------------------------------------------------

def test_residual_targets_dims_and_weights_hand_computed():
    a, b = frames([1.0, 2.0]), frames([3.0, 6.0])
    average, first, second = build_targets("multi_head_residual", [a, b], [1.0, 3.0])
    assert average.flatten().tolist() == [2.5, 5.0]                    # 0.25 a + 0.75 b
    assert first is a and second is b
    assert head_dims("multi_head_residual", [32, 32]) == [32, 32, 32]
    assert head_weights("multi_head_residual", [1.0, 3.0]) == [1.0, 1.0, 3.0]
    with pytest.raises(ConfigError, match="multi_head_residual needs teachers of one hidden dimension"):
        head_dims("multi_head_residual", [32, 48])


def test_residual_student_predicts_shared_plus_residual():
    torch.manual_seed(0)
    config = StudentConfig(**tiny_student())
    student = EKDStudent(config, [32, 32, 32], 2, residual=True).eval()
    assert student.heads[0].proj.out_features == 2 * 32          # the shared set: head_inter_dim = 32
    assert student.heads[1].proj.out_features == 2 * 8           # residual sets: a quarter by default
    assert EKDStudent(StudentConfig(**tiny_student(residual_inter_dim=4)), [32, 32], 2,
                      residual=True).heads[1].proj.out_features == 2 * 4
    wave = torch.randn(2, 8000) * 0.1
    with torch.no_grad():
        out = student(wave, torch.tensor([8000, 8000]))
        last = out.hidden_states[-1]
        shared = student.heads[0](last)
        torch.testing.assert_close(out.predictions[0], shared)
        for k in (1, 2):
            torch.testing.assert_close(out.predictions[k], shared + student.heads[k](last))
        clone = student_from_dict(student_state(student)).eval()
        assert clone.residual
        torch.testing.assert_close(clone(wave, torch.tensor([8000, 8000])).predictions[2], out.predictions[2])


def two_base_teachers(aggregation: str, **options) -> dict:
    """A model config of two hub teachers of known shape: objectives are built without loading them."""
    return {"teachers": [{"name": "hubert_base", "layers": [4]}, {"name": "wavlm_base_plus", "layers": [4],
                                                                     "weight": 3.0}],
            "aggregation": aggregation, **options}


def test_residual_loss_hand_computed():
    a, b = frames([1.0, 0.0], [0.0, 1.0]), frames([0.0, 2.0], [2.0, 0.0])
    p0 = frames([0.25, 1.5], [1.5, 0.25])      # equals the average 0.25 a + 0.75 b
    p1 = frames([1.0, 0.0], [1.0, 1.0])        # teacher 0: frame 1 off by (1, 0)
    p2 = frames([0.0, 4.0], [2.0, 0.0])        # teacher 1: frame 0 off by (0, 2)
    objective = DistillObjective(load_config(two_base_teachers("multi_head_residual")))
    targets = objective.targets([a, b])
    loss = objective([p0, p1, p2], torch.tensor([2]), targets).loss
    # per head set: mean over frames of L1 (mean over features) + mean of -log sigmoid(cos)
    average_loss = 0.0 + SIGMOID_LOSS(1.0)
    first_loss = (0.0 + 0.5) / 2 + (SIGMOID_LOSS(1.0) + SIGMOID_LOSS(1 / math.sqrt(2))) / 2
    second_loss = (1.0 + 0.0) / 2 + SIGMOID_LOSS(1.0)
    assert loss.item() == pytest.approx(1.0 * average_loss + 1.0 * first_loss + 3.0 * second_loss, rel=1e-6)

    # uncertainty weighting: sum_s exp(-s_s) L_s + s_s, gradient -exp(-s_s) L_s + 1
    weights = UncertaintyWeights(["average", "teacher0", "teacher1"])
    with torch.no_grad():
        weights.log_variances.copy_(torch.tensor([0.1, -0.2, 0.3]))
    learned = DistillObjective(load_config(two_base_teachers("multi_head_residual", teacher_weighting="uncertainty")),
                               weights)
    total = learned([p0, p1, p2], torch.tensor([2]), targets).loss
    set_losses = [average_loss, first_loss, second_loss]
    s = [0.1, -0.2, 0.3]
    assert total.item() == pytest.approx(sum(math.exp(-v) * L + v for v, L in zip(s, set_losses)), rel=1e-6)
    total.backward()
    expected_grad = [-math.exp(-v) * L + 1 for v, L in zip(s, set_losses)]
    np.testing.assert_allclose(weights.log_variances.grad.tolist(), expected_grad, rtol=1e-5)
    assert weights.weights() == pytest.approx({"average": math.exp(-0.1), "teacher0": math.exp(0.2),
                                               "teacher1": math.exp(-0.3)})


# -- target_norm -------------------------------------------------------------------------------

def test_target_norm_standardises_each_teacher_before_averaging():
    a_stats, b_stats = LayerStats.empty(1, 1), LayerStats.empty(1, 1)
    a_stats.update(torch.tensor([1.0, 3.0]).reshape(2, 1, 1))          # mean 2, std 1
    b_stats.update(torch.tensor([10.0, 30.0]).reshape(2, 1, 1))        # mean 20, std 10
    a, b = frames([1.0], [3.0]), frames([30.0], [10.0])
    plain = DistillObjective(load_config(two_base_teachers("layerwise_average")))
    assert plain.targets([a, b])[0].flatten().tolist() == [22.75, 8.25]  # 0.25 a + 0.75 b: b, 10x larger, dominates
    config = load_config(two_base_teachers("layerwise_average", target_norm="teacher_layer"))
    normed = DistillObjective(config, target_stats=[a_stats, b_stats])
    # a -> (-1, 1), b -> (1, -1); weights 1:3 -> 0.25 a + 0.75 b
    assert normed.targets([a, b])[0].flatten().tolist() == [0.5, -0.5]
    concat = DistillObjective(load_config(two_base_teachers("layerwise_concat", target_norm="teacher_layer")),
                              target_stats=[a_stats, b_stats])
    assert concat.targets([a, b])[0].flatten().tolist() == [-1.0, 1.0, 1.0, -1.0]
    with pytest.raises(RuntimeError, match="no statistics"):
        DistillObjective(config).targets([a, b])


# -- refusals, one line each ---------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"aggregation": "layerwise_average", "teacher_weighting": "uncertainty"},
     r"config\.teacher_weighting: uncertainty learns one weight per prediction-head set, and aggregation "
     r"layerwise_average with 2 teacher\(s\) has one; use aggregation multi_head or multi_head_residual"),
    ({"aggregation": "layerwise_concat", "teacher_weighting": "uncertainty"},
     r"aggregation layerwise_concat with 2 teacher\(s\) has one"),
    ({"aggregation": "multi_head", "teacher_weighting": "uncertainty"},
     r"config\.teachers\[1\]\.weight: 3\.0 has no effect with teacher_weighting: uncertainty"),
    ({"aggregation": "multi_head", "target_norm_utterances": -1},
     r"config\.target_norm_utterances: -1 must be >= 0"),
    ({"aggregation": "multi_head", "init_from": {"name": "hubert_base"}},
     r"config\.init_from: names hubert_base but student\.init_from_teacher is false"),
    ({"aggregation": "multi_head", "init_from": {"name": "hubert_local"}},
     r"config\.init_from\.ckpt: hubert_local needs a checkpoint path"),
    ({"aggregation": "multi_head", "target_norm": "per_teacher"},
     r"config\.target_norm: 'per_teacher' is not one of 'none', 'teacher_layer'"),
])
def test_options_that_cannot_apply_are_one_line(options, message):
    config = {**two_base_teachers("multi_head"), "student": {"init_from_teacher": False}, **options}
    with pytest.raises(ConfigError, match=message) as error:
        load_config(config)
    assert "\n" not in str(error.value)


def test_single_teacher_and_different_widths_refused(tiny_teachers):
    one = {"teachers": [{"name": "hubert_base"}], "aggregation": "multi_head", "teacher_weighting": "uncertainty"}
    with pytest.raises(ConfigError, match=r"aggregation multi_head with 1 teacher\(s\) has one"):
        load_config(one)
    with pytest.raises(ConfigError, match=r"multi_head_residual predicts each teacher's difference .* needs two or more"):
        load_config({"teachers": [{"name": "hubert_base"}], "aggregation": "multi_head_residual"})
    wide = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]},
            {"name": "wavlm_local", "ckpt": str(tiny_teachers["wavlm_wide"]), "layers": [1, 2]}]
    with pytest.raises(ConfigError, match=r"config\.aggregation: multi_head_residual needs teachers of one hidden "
                                          r"dimension, got .*: 32, .*: 48; use multi_head, or teachers of the same size"):
        load_config({"teachers": wide, "aggregation": "multi_head_residual"})


def test_defaults_are_the_paper():
    config = load_config({"teachers": [{"name": "hubert_base"}]})
    assert (config.target_norm, config.teacher_weighting, config.init_from) == ("none", "fixed", None)
    assert config.target_norm_utterances == 2000 and config.student.residual_inter_dim is None
    assert head_set_names(load_config(two_base_teachers("multi_head_residual"))) == [
        "average", "teacher0-hubert_base", "teacher1-wavlm_base_plus"]
    student = build_student(load_config(two_base_teachers("multi_head")), [768, 768])
    assert not student.residual and student_state(student)["residual_heads"] is False


# -- through the pretrain expert -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fine_teacher(tmp_path_factory):
    """A tiny HuBERT whose CNN hops 160 samples (10 ms), in hubert_local's format."""
    return make_random_teacher("hubert", tmp_path_factory.mktemp("fine") / "fine.pt", seed=7,
                               conv_feature_layers=FINE_CNN)


def every_option(tiny_teachers, fine_teacher, **overrides) -> dict:
    """multi_head_residual + target_norm + uncertainty, a 10 ms teacher and a common init from WavLM."""
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 3]},
                {"name": "hubert_local", "ckpt": str(fine_teacher), "layers": [1, 2], "weight": 2.0}]
    return {**model_config(teachers, "multi_head_residual", init_from_teacher=True),
            "target_norm": "teacher_layer", "target_norm_utterances": 3, "teacher_weighting": "uncertainty",
            "init_from": {"name": "wavlm_local", "ckpt": str(tiny_teachers["wavlm_a"])}, **overrides}


def pooled_layers(ckpt: str, layers: list[int], wav: list[torch.Tensor], hop: int) -> torch.Tensor:
    """The teacher's layers by s3prl's hub function, then pairs of 10 ms frames averaged: (B, L, T, D)."""
    import s3prl.hub

    with torch.no_grad():
        states = s3prl.hub.hubert_local(ckpt=ckpt).eval()(wav)["hidden_states"]
    hidden = torch.stack([states[i] for i in layers], dim=1)
    if hop == 160:
        kept = hidden.shape[2] // 2
        hidden = (hidden[:, :, 0:2 * kept:2] + hidden[:, :, 1:2 * kept:2]) / 2
    return hidden


def manual_loss(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(())
    for head in range(prediction.shape[1]):
        pred, tgt = prediction[:, head][valid], target[:, head][valid]
        total = total + (pred - tgt).abs().mean() - F.logsigmoid(F.cosine_similarity(pred, tgt, dim=-1)).mean()
    return total


def test_expert_with_every_option_equals_the_formulas(tiny_teachers, fine_teacher, speech_dir):
    import s3prl.hub

    config = every_option(tiny_teachers, fine_teacher)
    datarc = {"audio_dir": str(speech_dir), "train_batch_size": 2, "num_workers": 0}
    torch.manual_seed(0)
    expert = UpstreamPretrainExpert(datarc, config, device="cpu")
    assert expert.teachers.hops == [320, 160]
    # the common initialisation: WavLM's CNN and layers, recorded with its checkpoint's sha256
    wavlm = s3prl.hub.wavlm_local(ckpt=str(tiny_teachers["wavlm_a"])).model.state_dict()
    copied = expert.student.backbone.state_dict()
    assert torch.equal(copied["encoder.layers.1.fc1.weight"], wavlm["encoder.layers.1.fc1.weight"])
    assert expert.init["source"] == f"wavlm_local@{file_sha256(tiny_teachers['wavlm_a'])}"

    # target statistics over 3 training utterances, computed when training starts
    assert expert.objective.target_stats is None
    expert.get_train_dataloader()
    rows = statistics_utterances(expert.datarc, expert.student.receptive_field, 3)
    assert len(rows) == 3
    by_hand = []
    for teacher, hop in zip(config["teachers"], (320, 160)):
        per_utterance = [pooled_layers(teacher["ckpt"], teacher["layers"], [load_audio(r.path)], hop)[0]
                         for r in rows]                                       # [(L, T, D)]
        stacked = torch.cat(per_utterance, dim=1)                             # (L, frames, D)
        by_hand.append((stacked.mean(dim=1), stacked.std(dim=1, unbiased=False)))
    for stats, (mean, std) in zip(expert.objective.target_stats, by_hand):
        torch.testing.assert_close(stats.mean_std()[0], mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(stats.mean_std()[1], std, atol=1e-4, rtol=1e-4)

    # one step: standardise, average (weights 1 and 2), shared + residual heads, learned weights
    log_variances = torch.tensor([0.2, -0.1, 0.3])
    with torch.no_grad():
        expert.loss_weights.log_variances.copy_(log_variances)
    lengths = torch.tensor([20000, 14000])
    wave = torch.randn(2, 20000) * 0.1
    wave[1, 14000:] = 0
    loss, records = expert((wave, lengths), records=defaultdict(list), global_step=1, log_step=1)
    wavs = [wave[0], wave[1, :14000]]
    hiddens = [pooled_layers(t["ckpt"], t["layers"], wavs, hop) for t, hop in zip(config["teachers"], (320, 160))]
    hiddens = [(h - mean[None, :, None]) / std[None, :, None] for h, (mean, std) in zip(hiddens, by_hand)]
    count = min(h.shape[2] for h in hiddens)
    out = expert.student(wave, lengths)
    count = min(count, out.predictions[0].shape[2])
    hiddens = [h[:, :, :count] for h in hiddens]
    average = (1.0 * hiddens[0] + 2.0 * hiddens[1]) / 3.0
    valid = torch.arange(count)[None, :] < out.frame_lengths[:, None]
    set_losses = [manual_loss(pred[:, :, :count], target, valid)
                  for pred, target in zip(out.predictions, [average, *hiddens])]
    expected = sum(torch.exp(-s) * L + s for s, L in zip(log_variances, set_losses))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert records["weight/average"] == [pytest.approx(math.exp(-0.2))]
    # targets are named by the layers they come from: L1 (both teachers' layer 1), then L3+2
    assert "l1/teacher1-hubert_local/L3+2" in records and "cos/average/L1" in records

    # the checkpoint records; a resumed expert takes them over instead of recomputing
    saved = expert.add_state_to_save({})
    assert saved[TEACHER_FINGERPRINTS_KEY] == [file_sha256(tiny_teachers["hubert_a"]), file_sha256(fine_teacher)]
    assert saved[LOSS_WEIGHTS_KEY] == {"head_sets": ["average", "teacher0-hubert_local", "teacher1-hubert_local"],
                                       "log_variances": pytest.approx([0.2, -0.1, 0.3])}
    assert [s["count"] for s in saved[TARGET_NORM_KEY]] == [stats.count for stats in expert.objective.target_stats]
    assert saved["Upstream_Config"]["teacher_weighting"] == "uncertainty"
    torch.manual_seed(0)
    resumed = UpstreamPretrainExpert(datarc, saved["Upstream_Config"], device="cpu")
    resumed.load_model(saved)
    resumed.teachers.layer_stats = None  # would fail if called: the statistics are not recomputed
    resumed.get_train_dataloader()
    assert [s.to_dict() for s in resumed.objective.target_stats] == saved[TARGET_NORM_KEY]
    assert resumed.loss_weights.log_variances.tolist() == pytest.approx([0.2, -0.1, 0.3])
    assert resumed.init == saved[INIT_KEY]


def test_one_init_from_for_students_of_different_teachers(tiny_teachers, speech_dir):
    datarc = {"audio_dir": str(speech_dir), "train_batch_size": 2, "num_workers": 0}
    common = {"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"])}
    fingerprints = {}
    for key, init_from in (("wavlm_a", common), ("hubert_b", common), ("wavlm_a", None)):
        teachers = [{"name": f"{key.split('_')[0]}_local", "ckpt": str(tiny_teachers[key]), "layers": [1, 2]}]
        config = {**model_config(teachers, "layerwise_average", init_from_teacher=True),
                  **({"init_from": init_from} if init_from else {})}
        torch.manual_seed(3)
        expert = UpstreamPretrainExpert(datarc, config, device="cpu")
        fingerprints[(key, bool(init_from))] = expert.init
    assert fingerprints[("wavlm_a", True)] == fingerprints[("hubert_b", True)]
    assert fingerprints[("wavlm_a", True)]["source"].startswith("hubert_local@")
    assert fingerprints[("wavlm_a", False)]["fingerprint"] != fingerprints[("wavlm_a", True)]["fingerprint"]


# -- through s3prl's runner, live and from a target store ----------------------------------------

SAMPLES = 19200  # 1.2 s each: batched live teachers see no padding, so live equals stored


@pytest.fixture(scope="module")
def equal_audio(speech_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("equal_audio")
    for path in sorted(speech_dir.glob("*.wav"))[:8]:
        wav = load_audio(path).numpy()
        sf.write(out / path.name, np.pad(wav, (0, max(0, SAMPLES - len(wav))))[:SAMPLES], 16000, subtype="FLOAT")
    return out


def test_every_option_through_the_runner_live_and_from_a_store(tiny_teachers, fine_teacher, equal_audio, tmp_path):
    from s3prl_ekd.plugin.targets import build_store

    whole = "config.pretrain_expert.datarc.sequence_length=0"
    config = every_option(tiny_teachers, fine_teacher, target_norm_utterances=0)
    store = tmp_path / "store"
    build_store(write_yaml(tmp_path / "teachers.yaml", config), str(equal_audio), store, dtype="float32",
                log=lambda _: None)
    runs = {}
    for name, extra in (("live", []), ("stored", [f"config.pretrain_expert.datarc.targets={store}"])):
        expdir = run_pretrain_cli(tmp_path, config, name, steps=4, audio_dir=equal_audio, overrides=[whole, *extra])
        runs[name] = expdir
    scalars = {name: read_scalars(expdir) for name, expdir in runs.items()}
    losses = {name: [v for _, v in s["ekd_distiller/train-loss"]] for name, s in scalars.items()}
    assert len(losses["live"]) == 4
    np.testing.assert_allclose(losses["stored"], losses["live"], rtol=1e-4)
    for name in runs:
        weights = [v for _, v in scalars[name]["ekd_distiller/train-weight/teacher1-hubert_local"]]
        assert weights[0] == pytest.approx(1.0) and weights[-1] != pytest.approx(1.0)  # learned, from exp(-0)
        assert "ekd_distiller/train-l1/average/L1" in scalars[name]
    with runner_checkpoints_allowed():
        states = {name: torch.load(max(expdir.glob("states-*.ckpt"), key=lambda p: p.stat().st_mtime),
                                   weights_only=True) for name, expdir in runs.items()}
    live = states["live"]
    assert live["Upstream_Config"]["aggregation"] == "multi_head_residual"
    assert live["Student"]["residual_heads"] and live["Student"]["head_dims"] == [32, 32, 32]
    assert live[INIT_KEY] == states["stored"][INIT_KEY]                  # one common initialisation
    assert live[INIT_KEY]["source"].startswith("wavlm_local@")
    assert live[TEACHER_FINGERPRINTS_KEY] == states["stored"][TEACHER_FINGERPRINTS_KEY]
    assert len(live[LOSS_WEIGHTS_KEY]["log_variances"]) == 3
    # statistics over all 8 utterances: live, computed when training starts; stored, from the store's index
    for live_stats, stored_stats in zip(live[TARGET_NORM_KEY], states["stored"][TARGET_NORM_KEY]):
        assert live_stats["count"] == stored_stats["count"] > 0
        np.testing.assert_allclose(live_stats["total"], stored_stats["total"], rtol=1e-4, atol=1e-3)

    # two students of one initialisation and architecture merge; the ekd_distiller upstream loads the result
    merged = tmp_path / "merged.ckpt"
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "merge", *(str(max(e.glob("states-*.ckpt")))
                                                                             for e in runs.values()),
                           "--out", str(merged)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import s3prl.hub

    upstream = s3prl.hub.ekd_distiller(ckpt=str(merged))
    assert len(upstream([torch.randn(16000) * 0.1])["hidden_states"]) == 3


def test_target_norm_refuses_a_store_without_statistics(tiny_teachers, fine_teacher, speech_dir, monkeypatch):
    from s3prl_ekd.plugin import pretrain_expert
    from s3prl_ekd.plugin.pretrain_data import StoredTargets

    class Store:
        teachers = []
        dtype = "float32"

    monkeypatch.setattr(pretrain_expert, "match_store", lambda folder, config: StoredTargets(Store(), [], []))
    datarc = {"audio_dir": str(speech_dir), "targets": str(speech_dir), "num_workers": 0}
    with pytest.raises(ConfigError, match=r"^pretrain_expert\.datarc\.targets: .* holds no per-teacher statistics, "
                                          r"which target_norm: teacher_layer needs; rebuild it") as error:
        UpstreamPretrainExpert(datarc, every_option(tiny_teachers, fine_teacher), device="cpu")
    assert "\n" not in str(error.value)
