"""Student shapes per aggregation mode, padding invariance, and where gradients go."""

import dataclasses

import pytest
import torch
from conftest import tiny_student as tiny_student_config

from s3prl_ekd.core import aggregation
from s3prl_ekd.core.config import TeacherConfig
from s3prl_ekd.core.distill import align, init_from_teacher
from s3prl_ekd.core.frames import conv_frame_lengths
from s3prl_ekd.core.loss import distill_loss, total_loss
from s3prl_ekd.core.student import EKDStudent, StudentConfig, student_from_dict, student_state
from s3prl_ekd.core.teachers import TeacherEnsemble


def tiny_student(head_dims, num_targets, **kw):
    return EKDStudent(StudentConfig(**tiny_student_config(**kw)), head_dims, num_targets)


@pytest.mark.parametrize("keys", [("hubert_a", "wavlm_wide"), ("hubert_a", "hubert_b", "wavlm_wide")])
@pytest.mark.parametrize("mode", ["layerwise_concat", "multi_head"])
def test_heads_match_targets(tiny_teachers, keys, mode):
    # teachers of different depths (3, 4, 2) and dims (32, 32, 48); the i-th layers pair up
    layer_lists = {"hubert_a": [1, 3], "hubert_b": [2, 4], "wavlm_wide": [1, 2]}
    teachers = TeacherEnsemble([TeacherConfig(f"{k.split('_')[0]}_local", str(tiny_teachers[k]), layer_lists[k])
                                for k in keys])
    teachers.probe()
    wave = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([16000, 11000])
    targets = aggregation.build_targets(mode, teachers([w[:n] for w, n in zip(wave, lengths)]))
    student = tiny_student(aggregation.head_dims(mode, teachers.dims), 2)
    out = student(wave, lengths)
    assert len(out.predictions) == len(targets) == (len(keys) if mode == "multi_head" else 1)
    for pred, target in zip(out.predictions, targets):
        assert pred.shape[:2] == target.shape[:2] == (2, 2)
        assert pred.shape[-1] == target.shape[-1]
        assert abs(pred.shape[2] - target.shape[2]) <= 1
    if mode == "layerwise_concat":
        assert out.predictions[0].shape[-1] == sum(teachers.dims)
    assert out.frame_lengths.tolist() == [49, 34]


def test_average_with_two_teachers_one_head_set(tiny_teachers):
    teachers = TeacherEnsemble([TeacherConfig("hubert_local", str(tiny_teachers["hubert_a"]), [1, 2, 3]),
                                TeacherConfig("wavlm_local", str(tiny_teachers["wavlm_a"]), [1, 2, 3])])
    teachers.probe(aggregation="layerwise_average")
    (target,) = aggregation.build_targets("layerwise_average", teachers([torch.randn(8000)]))
    assert target.shape == (1, 3, 24, 32)


def test_padded_batch_equals_each_sample_alone():
    # extractor_mode "layer_norm": the default mode's GroupNorm over time sees the padding
    # (as in HuBERT itself), so only the per-frame variant can be padding-invariant.
    torch.manual_seed(0)
    student = tiny_student([32], 2, extractor_mode="layer_norm").eval()
    short, long = torch.randn(9000) * 0.1, torch.randn(16000) * 0.1
    batch = torch.zeros(2, 16000)
    batch[0, :9000], batch[1] = short, long
    with torch.no_grad():
        together = student(batch, torch.tensor([9000, 16000]))
        alone = student(short[None], torch.tensor([9000]))
    frames = int(together.frame_lengths[0])
    assert frames == alone.hidden_states[-1].shape[1]
    for a, b in zip(together.hidden_states, alone.hidden_states):
        assert torch.allclose(a[0, :frames], b[0], atol=1e-4)
    assert torch.allclose(together.predictions[0][0, :, :frames], alone.predictions[0][0], atol=1e-4)


def test_gradients_reach_student_never_teachers(tiny_teachers):
    teachers = TeacherEnsemble([TeacherConfig("hubert_local", str(tiny_teachers["hubert_a"]), [1, 2])])
    teachers.probe()
    student = tiny_student([32], 2)
    wave = torch.randn(2, 12000) * 0.1
    lengths = torch.tensor([12000, 12000])
    targets = teachers([w for w in wave])
    out = student(wave, lengths)
    loss = total_loss([distill_loss(*align(out.predictions[0], targets[0], out.frame_lengths))], [1.0])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.heads.parameters())
    assert student.backbone.encoder.layers[0].fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teachers.parameters())


def test_conv_frame_lengths_matches_cnn():
    student = tiny_student([32], 1)
    for n in (400, 401, 16000, 16319, 16320):
        with torch.no_grad():
            frames = student.backbone.feature_extractor(torch.zeros(1, n)).shape[-1]
        assert conv_frame_lengths(torch.tensor([n]), student.backbone.conv_layers).item() == frames
    assert student.downsample_rate == 320


def test_state_roundtrip_and_init_from_teacher(tiny_teachers):
    import s3prl.hub

    student = tiny_student([32, 48], 2)
    clone = student_from_dict(student_state(student))
    for (name, a), (_, b) in zip(student.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), name
    teacher = s3prl.hub.hubert_local(ckpt=str(tiny_teachers["hubert_a"]))
    report = init_from_teacher(student, teacher)
    assert "feature_extractor.conv_layers.0.0.weight" in report.copied and "encoder.layers.1.fc1.weight" in report.copied
    assert report.uncopied == report.teacher_only == []  # HuBERT of the student's width: every part matches
    assert torch.equal(student.backbone.encoder.layers[1].fc1.weight, teacher.model.encoder.layers[1].fc1.weight)
    assert dataclasses.asdict(clone.config) == dataclasses.asdict(student.config)


def test_init_from_wavlm_teacher_reports_uncopied(tiny_teachers):
    """WavLM's attention adds a gated relative position bias the student has no place for: the rest
    is copied, the bias is not, and the report says so."""
    import s3prl.hub

    student = tiny_student([32], 2)
    before = {k: v.clone() for k, v in student.backbone.state_dict().items()}
    teacher = s3prl.hub.wavlm_local(ckpt=str(tiny_teachers["wavlm_a"]))
    report = init_from_teacher(student, teacher)
    assert "feature_extractor.conv_layers.0.0.weight" in report.copied
    assert "encoder.layers.0.fc1.weight" in report.copied
    assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in report.teacher_only
    assert any("grep_linear" in name for name in report.teacher_only)
    assert not set(report.copied) & set(report.teacher_only)
    after, teacher_state = student.backbone.state_dict(), teacher.model.state_dict()
    for name in report.copied:
        assert torch.equal(after[name], teacher_state[name]), name
    for name in set(after) - set(report.copied):
        assert torch.equal(after[name], before[name]), name        # left at its random init
    assert f"{len(report.teacher_only)} teacher tensors have no place in the student" in report.summary("wavlm_local")


def test_feature_grad_mult_zero_freezes_the_cnn():
    student = tiny_student([32], 2, feature_grad_mult=0.0)
    out = student(torch.randn(2, 8000), torch.tensor([8000, 6000]))
    out.predictions[0].sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in student.backbone.feature_extractor.parameters())
    assert all(p.grad is not None for p in student.heads.parameters())
    assert student.backbone.encoder.layers[0].fc1.weight.grad is not None  # the graph starts after the CNN
