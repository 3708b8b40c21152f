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


FINE_CNN = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)]"            # 160 samples per frame (10 ms)
COARSE_CNN = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 3"        # 640 samples per frame (40 ms)


@pytest.fixture(scope="module")
def other_rate_teachers(tmp_path_factory) -> dict[str, str]:
    """Tiny HuBERT (hubert_local) and WavLM (wavlm_local) checkpoints with 10 ms and 40 ms CNNs."""
    out = tmp_path_factory.mktemp("rates")
    return {f"{kind}_{rate}": str(make_random_teacher(kind, out / f"{kind}_{rate}.pt", seed=5, conv_feature_layers=cnn))
            for kind in ("hubert", "wavlm") for rate, cnn in (("fine", FINE_CNN), ("coarse", COARSE_CNN))}


def test_off_by_one_frames_aligned(tiny_teachers):
    a, b = torch.zeros(1, 1, 50, 4), torch.zeros(1, 1, 49, 4)
    assert [x.shape[2] for x in align_frames([a, b], ["a", "b"])] == [49, 49]
    with pytest.raises(ConfigError, match=r"different frame counts .*a: 52, b: 49"):
        align_frames([torch.zeros(1, 1, 52, 4), b], ["a", "b"])


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_teachers_at_10_and_40_ms_are_resampled_onto_20_ms_frames(tiny_teachers, other_rate_teachers, kind):
    import s3prl.hub

    configs = [TeacherConfig("hubert_local", str(tiny_teachers["hubert_a"]), [1, 3]),
               TeacherConfig(f"{kind}_local", other_rate_teachers[f"{kind}_fine"], [1, 2]),
               TeacherConfig(f"{kind}_local", other_rate_teachers[f"{kind}_coarse"], [2, 1])]
    teachers = TeacherEnsemble(configs)
    teachers.probe()
    # measured, not asked: s3prl's hubert_local reports 320 whatever its CNN
    assert teachers.hops == [320, 160, 640]
    assert teachers.upstreams[1].get_downsample_rates("hidden_states") == 320
    wav = torch.randn(16000) * 0.1
    standard, fine, coarse = teachers([wav])
    # 49, 99 // 2 = 49 and 24 * 2 = 48 frames, aligned to the shortest
    assert standard.shape[2] == fine.shape[2] == coarse.shape[2] == 48
    with torch.no_grad():
        raw_fine = getattr(s3prl.hub, f"{kind}_local")(ckpt=configs[1].ckpt).eval()([wav])["hidden_states"]
        raw_coarse = getattr(s3prl.hub, f"{kind}_local")(ckpt=configs[2].ckpt).eval()([wav])["hidden_states"]
    assert raw_fine[1].shape[1] == 99 and raw_coarse[2].shape[1] == 24
    # finer: student frame i is the mean of teacher frames 2i and 2i + 1
    torch.testing.assert_close(fine[0, 1, 7], (raw_fine[2][0, 14] + raw_fine[2][0, 15]) / 2)
    # coarser: frames 2j and 2j + 1 lie a quarter of a teacher frame either side of teacher frame j
    x = raw_coarse[2][0]
    torch.testing.assert_close(coarse[0, 0, 10], 0.25 * x[4] + 0.75 * x[5])
    torch.testing.assert_close(coarse[0, 0, 11], 0.75 * x[5] + 0.25 * x[6])
    torch.testing.assert_close(coarse[0, 0, 0], x[0])


def test_a_hop_that_is_no_whole_ratio_is_one_line(tmp_path, tiny_teachers):
    odd = make_random_teacher("hubert", tmp_path / "odd.pt", conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 3 + "
                                                                                  "[(32,3,3)] + [(32,2,2)] * 2")  # 480
    teachers = TeacherEnsemble([TeacherConfig("hubert_local", str(tiny_teachers["hubert_a"]), [1]),
                                TeacherConfig("hubert_local", str(odd), [1])])
    with pytest.raises(ConfigError, match=r"^teachers\[1\] \(hubert_local\): its frames are 480 samples apart and "
                                          r"the student's 320; one must be a whole multiple of the other") as error:
        teachers.probe()
    assert "\n" not in str(error.value)
    # a 40 ms student takes the standard teacher's frames two by two
    coarse = TeacherEnsemble([TeacherConfig("hubert_local", str(tiny_teachers["hubert_a"]), [1])], target_hop=640)
    coarse.probe()
    (pooled,) = coarse([torch.randn(16000) * 0.1])
    assert coarse.hops == [320] and pooled.shape[2] == 24


def test_unknown_hub_name_and_wrong_checkpoint(tmp_path, tiny_teachers):
    with pytest.raises(ConfigError, match="not an s3prl.hub entry"):
        TeacherEnsemble([TeacherConfig("hubert_bsae")])
    with pytest.raises(CheckpointError, match=r"teacher wavlm_local .*hubert_a\.pt.*cannot load"):
        TeacherEnsemble([TeacherConfig("wavlm_local", str(tiny_teachers["hubert_a"]))])
