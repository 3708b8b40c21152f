"""core/distill.py and the student against s3prl: the objective equals targets and loss built by hand,
and the student's backbone equals s3prl's DistillerModel forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import model_config, tiny_student

from s3prl_ekd.core.frames import conv_frame_lengths
from s3prl_ekd.core.student import EKDStudent, StudentConfig
from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert


def test_student_matches_distiller_forward():
    """EKDStudent's hidden states are s3prl's DistillerModel forward (get_hidden=True) on the same
    weights; padded utterances (layer_norm CNN) equal s3prl's forward of each utterance alone."""
    torch.manual_seed(0)
    student = EKDStudent(StudentConfig(**tiny_student(extractor_mode="layer_norm")), [32], 2).eval()
    wave = torch.randn(2, 24000)
    with torch.no_grad():
        ours = student(wave, torch.tensor([24000, 24000]))
        _, feat_final, _, _, layer_hiddens = student.backbone(wave, torch.ones_like(wave), get_hidden=True,
                                                              no_pred=True)
        torch.testing.assert_close(ours.hidden_states[0], feat_final, rtol=0, atol=0)
        assert len(ours.hidden_states) == 1 + len(layer_hiddens) == 3
        for mine, theirs in zip(ours.hidden_states[1:], layer_hiddens):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)

        lengths = torch.tensor([24000, 15000])
        padded = wave.clone()
        padded[1, 15000:] = 0
        batch = student(padded, lengths)
        frames = conv_frame_lengths(lengths, student.backbone.conv_layers)
        alone = student.backbone(wave[1:, :15000], torch.ones(1, 15000), get_hidden=True, no_pred=True)
        for mine, theirs in zip(batch.hidden_states, [alone[1], *alone[4]]):
            torch.testing.assert_close(mine[1, :frames[1]], theirs[0], atol=1e-5, rtol=1e-5)


def manual_loss(predictions: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over heads of mean L1 + mean -log sigmoid(cos), over valid frames only, written out plainly.

    predictions, target (B, L, T, D); valid (B, T) bool."""
    total = torch.zeros(())
    for head in range(predictions.shape[1]):
        pred, tgt = predictions[:, head][valid], target[:, head][valid]           # (frames, D)
        total = total + (pred - tgt).abs().mean() - F.logsigmoid(F.cosine_similarity(pred, tgt, dim=-1)).mean()
    return total


@pytest.mark.parametrize("mode", ["layerwise_average", "layerwise_concat", "multi_head"])
def test_expert_step_loss_equals_manual_targets(mode, tiny_teachers, speech_dir):
    import s3prl.hub

    second = "wavlm_a" if mode == "layerwise_average" else "wavlm_wide"
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 3], "weight": 1.0},
                {"name": "wavlm_local", "ckpt": str(tiny_teachers[second]), "layers": [1, 2], "weight": 3.0}]
    datarc = {"audio_dir": str(speech_dir), "train_batch_size": 2, "num_workers": 0}
    torch.manual_seed(0)
    expert = UpstreamPretrainExpert(datarc, model_config(teachers, mode), device="cpu")
    lengths = torch.tensor([20000, 14000])
    wave = torch.randn(2, 20000)
    wave[1, 14000:] = 0
    loss, _ = expert((wave, lengths), global_step=1, log_step=1000)

    # By hand: each teacher's selected layers, aggregated as the paper describes.
    hiddens = []
    with torch.no_grad():
        for config in teachers:
            upstream = getattr(s3prl.hub, config["name"])(ckpt=config["ckpt"]).eval()
            states = upstream([wave[0], wave[1, :14000]])["hidden_states"]
            hiddens.append(torch.stack([states[i] for i in config["layers"]], dim=1))  # (B, L, T, D_k)
    frames = min(h.shape[2] for h in hiddens)
    hiddens = [h[:, :, :frames] for h in hiddens]
    out = expert.student(wave, lengths)
    frames = min(frames, out.predictions[0].shape[2])
    valid = torch.arange(frames)[None, :] < out.frame_lengths[:, None]
    if mode == "layerwise_average":
        target = (1.0 * hiddens[0] + 3.0 * hiddens[1]) / 4.0
        expected = manual_loss(out.predictions[0][:, :, :frames], target[:, :, :frames], valid)
    elif mode == "layerwise_concat":
        target = torch.cat(hiddens, dim=-1)
        assert out.predictions[0].shape[-1] == 32 + 48
        expected = manual_loss(out.predictions[0][:, :, :frames], target[:, :, :frames], valid)
    else:
        expected = sum(weight * manual_loss(pred[:, :, :frames], h[:, :, :frames], valid)
                       for weight, pred, h in zip((1.0, 3.0), out.predictions, hiddens))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert dataclasses.asdict(expert.config.student)["dropout"] == 0.0  # so both forwards are the same function
