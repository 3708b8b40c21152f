"""Teachers through s3prl's real hub functions: frozen, aligned, checked against the config."""

import pytest
import torch

from s3prl_ekd.core.config import TeacherConfig
from s3prl_ekd.core.teachers import TeacherEnsemble, align_frames
from s3prl_ekd.errors import CheckpointError, ConfigError
from s3prl_ekd.plugin.teacher_formats import make_random_teacher


def ensemble(tiny_teachers, spec):
    configs = [TeacherConfig(name=f"{key.split('_')[0]}_local", ckpt=str(tiny_teachers[key]), layers=layers)
               for key, layers in spec]
    return TeacherEnsemble(configs)


def test_selected_layers_match_s3prl_hidden_states(tiny_teachers):
    import s3prl.hub

    teachers = ensemble(tiny_teachers, [("hubert_a", [0, 3]), ("wavlm_wide", [1, 2])])
    teachers.probe()
    assert teachers.depths == [3, 2] and teachers.dims == [32, 48]
    wavs = [torch.randn(16000) * 0.1, torch.randn(12000) * 0.1]
    out = teachers(wavs)
    assert [o.shape[:2] for o in out] == [(2, 2), (2, 2)] and [o.shape[-1] for o in out] == [32, 48]
    reference = s3prl.hub.hubert_local(ckpt=str(tiny_teachers["hubert_a"])).eval()
    with torch.no_grad():
        states = reference(wavs)["hidden_states"]
    frames = out[0].shape[2]
    assert torch.allclose(out[0][:, 1], states[3][:, :frames], atol=1e-5)
    assert torch.allclose(out[0][:, 0], states[0][:, :frames], atol=1e-5)


def test_teachers_are_frozen_and_stay_in_eval(tiny_teachers):
    teachers = ensemble(tiny_teachers, [("hubert_a", [1]), ("wavlm_a", [1])])
    teachers.train()
    assert not any(m.training for m in teachers.modules())
    assert not any(p.requires_grad for p in teachers.parameters())
    out = teachers([torch.randn(8000)])
    assert not out[0].requires_grad and out[0].is_inference()


def test_default_layers_filled_from_real_depth(tiny_teachers):
    teachers = ensemble(tiny_teachers, [("hubert_b", None)])
    teachers.probe()
    assert teachers.configs[0].layers == [1, 3, 4]


def test_layer_beyond_depth_found_by_probe(tiny_teachers):
    teachers = ensemble(tiny_teachers, [("wavlm_wide", [3])])
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.layers: 3 is out of range for wavlm_local with 2 layers"):
        teachers.probe()


def test_probe_rejects_average_of_different_dims(tiny_teachers):
    teachers = ensemble(tiny_teachers, [("hubert_a", [1]), ("wavlm_wide", [1])])
    with pytest.raises(ConfigError, match="layerwise_average needs teachers of one hidden dimension"):
        teachers.probe(aggregation="layerwise_average")


def test_off_by_one_frames_aligned_but_other_rates_rejected(tmp_path, tiny_teachers):
    a, b = torch.zeros(1, 1, 50, 4), torch.zeros(1, 1, 49, 4)
    assert [x.shape[2] for x in align_frames([a, b], ["a", "b"])] == [49, 49]
    # a HuBERT whose CNN hops 160 samples yields twice the frames of a 320-hop teacher
    fast = make_random_teacher("hubert", tmp_path / "fast.pt",
                               conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)]")
    teachers = TeacherEnsemble([TeacherConfig("hubert_local", str(tiny_teachers["hubert_a"]), [1]),
                                TeacherConfig("hubert_local", str(fast), [1])])
    with pytest.raises(ConfigError, match=r"different frame counts .*hubert_local#0: 49, hubert_local#1: 99.*frame rates differ"):
        teachers([torch.zeros(16000)])


def test_unknown_hub_name_and_wrong_checkpoint(tmp_path, tiny_teachers):
    with pytest.raises(ConfigError, match="not an s3prl.hub entry"):
        TeacherEnsemble([TeacherConfig("hubert_bsae")])
    with pytest.raises(CheckpointError, match=r"teacher wavlm_local .*hubert_a\.pt.*cannot load"):
        TeacherEnsemble([TeacherConfig("wavlm_local", str(tiny_teachers["hubert_a"]))])
