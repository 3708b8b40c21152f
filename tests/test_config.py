"""Every config mistake fails at load with the key and the fix, before models are built."""

from pathlib import Path

import pytest
from conftest import write_yaml

from s3prl_ekd.core.config import default_layers, load_config
from s3prl_ekd.errors import ConfigError
from s3prl_ekd.plugin.pretrain_data import load_datarc


def test_defaults_and_default_layers():
    config = load_config({"teachers": [{"name": "hubert_base"}]})
    assert config.aggregation == "layerwise_average"
    assert config.teachers[0].layers == [4, 8, 12]
    assert config.student.encoder_layers == 2 and config.loss.cosine_weight == 1.0
    assert default_layers(3) == [1, 2, 3]


def test_typo_in_key_names_key_and_suggests(tmp_path):
    path = write_yaml(tmp_path / "m.yaml", {"teachers": [{"name": "hubert_base"}], "agregation": "multi_head"})
    with pytest.raises(ConfigError, match=r"m\.yaml\.agregation: unknown key; did you mean 'aggregation'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"student\.encoder_layer: unknown key; did you mean 'encoder_layers'"):
        load_config({"teachers": [{"name": "hubert_base"}], "student": {"encoder_layer": 2}})


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match=r"student\.encoder_layers: expected int, got 'two'"):
        load_config({"teachers": [{"name": "hubert_base"}], "student": {"encoder_layers": "two"}})
    with pytest.raises(ConfigError, match=r"aggregation: 'mean' is not one of"):
        load_config({"teachers": [{"name": "hubert_base"}], "aggregation": "mean"})


def test_no_teachers():
    with pytest.raises(ConfigError, match=r"teachers: no teachers"):
        load_config({"teachers": []})


def test_missing_teacher_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.ckpt: .*nope\.pt does not exist"):
        load_config({"teachers": [{"name": "hubert_local", "ckpt": str(tmp_path / "nope.pt")}]})
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.ckpt: hubert_local needs a checkpoint"):
        load_config({"teachers": [{"name": "hubert_local"}]})


def test_layer_out_of_range_hub_name_and_local_ckpt(tiny_teachers):
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.layers: 13 is out of range for hubert_base with 12 layers; use 0\.\.12"):
        load_config({"teachers": [{"name": "hubert_base", "layers": [4, 13]}]})
    # the tiny hubert has 3 layers: read from its checkpoint without building it
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.layers: 4 is out of range .* 3 layers"):
        load_config({"teachers": [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_b"]), "layers": [4]},
                                  {"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [4]}]})


def test_unequal_layer_counts():
    with pytest.raises(ConfigError, match="same number of layers"):
        load_config({"teachers": [{"name": "hubert_base", "layers": [4, 8]},
                                  {"name": "wavlm_base_plus", "layers": [4, 8, 12]}], "aggregation": "multi_head"})


def test_average_over_different_dims_is_an_error(tiny_teachers):
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]},
                {"name": "wavlm_local", "ckpt": str(tiny_teachers["wavlm_wide"]), "layers": [1, 2]}]
    with pytest.raises(ConfigError, match=r"layerwise_average needs teachers of one hidden dimension.*32.*48.*layerwise_concat"):
        load_config({"teachers": teachers})
    assert load_config({"teachers": teachers, "aggregation": "layerwise_concat"}).aggregation == "layerwise_concat"


def test_relative_ckpt_is_relative_to_config_file(tmp_path, tiny_teachers):
    (tmp_path / "sub").mkdir()
    (tmp_path / "t.pt").write_bytes(tiny_teachers["hubert_a"].read_bytes())
    path = write_yaml(tmp_path / "sub" / "m.yaml", {"teachers": [{"name": "hubert_local", "ckpt": "../t.pt"}]})
    config = load_config(path)
    assert config.teachers[0].ckpt == str(tmp_path / "t.pt")
    assert config.teachers[0].layers == [1, 2, 3]


def test_datarc_errors():
    with pytest.raises(ConfigError, match=r"datarc\.audio_dri: unknown key; did you mean 'audio_dir'"):
        load_datarc({"audio_dri": "x"})
    with pytest.raises(ConfigError, match="either file_path"):
        load_datarc({"train_batch_size": 2})
    with pytest.raises(ConfigError, match="either file_path"):
        load_datarc({"audio_dir": "x", "file_path": "y", "sets": ["a"]})
    assert load_datarc({"audio_dir": "x", "train_batch_size": 2}).sequence_length == 250000


def test_paper_configs_load():
    """Every shipped config validates: model configs with load_config (their teacher checkpoints exist),
    runner configs through the checks `s3prl-ekd pretrain` runs before s3prl starts."""
    import yaml

    from s3prl_ekd.io.resources import pretrain_config, pretrain_config_names

    names = pretrain_config_names()
    runners = [n for n in names if "runner" in n]
    models = [n for n in names if n not in runners]
    assert {"hubert_robusthubert_wavlm_average.yaml", "hubert_robusthubert_wavlm_concat.yaml",
            "hubert_robusthubert_wavlm_multihead.yaml", "distilhubert_hubert_base.yaml", "tiny_cpu.yaml"} <= set(models)
    for name in models:
        config = load_config(pretrain_config(name))
        for teacher in config.teachers:
            assert teacher.ckpt is None or Path(teacher.ckpt).is_file(), (name, teacher.ckpt)
            assert teacher.layers, (name, teacher.name)
    for name in runners:
        config = yaml.safe_load(pretrain_config(name).read_text())
        runner = config["runner"]
        assert runner["total_steps"] > max(runner["save_step"], runner["log_step"]), name
        load_datarc(config["pretrain_expert"]["datarc"])
    paper = load_config(pretrain_config("hubert_robusthubert_wavlm_average.yaml"))
    assert [t.name for t in paper.teachers] == ["hubert_base", "hubert_base_robust_mgr", "wavlm_base_plus"]
    assert all(t.layers == [4, 8, 12] for t in paper.teachers) and paper.student.encoder_layers == 2
