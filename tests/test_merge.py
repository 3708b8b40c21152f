"""`s3prl-ekd merge`: a weighted average of students of one initialisation and architecture; heads
kept only when every student predicts the same targets; anything else refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import model_config

from s3prl_ekd import cli, load_student
from s3prl_ekd.errors import CheckpointError, UserError
from s3prl_ekd.io.checkpoint import INIT_KEY, MODEL_FORMAT, load_raw
from s3prl_ekd.io.files import file_sha256
from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert
from s3prl_ekd.tools.info import describe_checkpoint
from s3prl_ekd.tools.merge import merge_students, parse_weights


def trained_student(tmp_path, name, speech_dir, teachers, seed, init_from=None, **student) -> str:
    """A checkpoint as the pretrain expert saves it, after a stand-in for training (a seeded nudge
    of every student tensor)."""
    config = {**model_config(teachers, "layerwise_average", **{"init_from_teacher": True, **student}),
              **({"init_from": init_from} if init_from else {})}
    torch.manual_seed(seed)
    expert = UpstreamPretrainExpert({"audio_dir": str(speech_dir), "train_batch_size": 2, "num_workers": 0},
                                    config, device="cpu")
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for tensor in expert.student.state_dict().values():
            tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    path = tmp_path / f"{name}.ckpt"
    torch.save(expert.add_state_to_save({"Step": 7}), path)
    return str(path)


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_teachers, speech_dir) -> dict[str, str]:
    """hubert_0 / hubert_1: one teacher, two seeds (the whole backbone is copied from that teacher,
    so one initialisation); wavlm: another teacher, initialised from the same HuBERT; random: a
    student of HuBERT initialised at random."""
    out = tmp_path_factory.mktemp("students")
    hubert = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]}]
    wavlm = [{"name": "wavlm_local", "ckpt": str(tiny_teachers["wavlm_a"]), "layers": [1, 2]}]
    common = {"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"])}
    return {"hubert_0": trained_student(out, "hubert_0", speech_dir, hubert, 0),
            "hubert_1": trained_student(out, "hubert_1", speech_dir, hubert, 1),
            "wavlm": trained_student(out, "wavlm", speech_dir, wavlm, 2, init_from=common),
            "random": trained_student(out, "random", speech_dir, hubert, 3, init_from_teacher=False)}


def test_same_teachers_average_everything_with_the_given_weights(students, tmp_path):
    import s3prl.hub

    out = tmp_path / "merged.ckpt"
    result = merge_students([students["hubert_0"], students["hubert_1"]], out, parse_weights("1,3", 2))
    assert result["heads"] == "averaged" and result["weights"] == [0.25, 0.75]
    a, b, merged = (load_raw(p)["Student"]["state_dict"] for p in (students["hubert_0"], students["hubert_1"], out))
    for name in ("backbone.encoder.layers.1.fc1.weight", "heads.0.split.weight"):
        torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name])
    assert not torch.equal(a["heads.0.split.weight"], b["heads.0.split.weight"])
    student = load_student(out)
    assert student.head_dims == [32] and len(student.heads) == 1
    wav = [torch.randn(16000) * 0.1]
    assert len(s3prl.hub.ekd_distiller(ckpt=str(out), hidden_states="heads")(wav)["hidden_states"]) == 2
    info = describe_checkpoint(out)
    assert [s["sha256"] for s in info["merged_from"]["students"]] == [file_sha256(students["hubert_0"]),
                                                                      file_sha256(students["hubert_1"])]
    assert [s["weight"] for s in info["merged_from"]["students"]] == [0.25, 0.75]
    assert info["init"] == load_raw(students["hubert_0"])[INIT_KEY]


def test_different_teachers_give_a_backbone_whose_heads_are_refused(students, tmp_path):
    import s3prl.hub

    from s3prl_ekd.errors import ConfigError

    out = tmp_path / "backbone.ckpt"
    result = merge_students([students["hubert_0"], students["wavlm"]], out)
    assert result["heads"].startswith("dropped")
    state = load_raw(out)
    assert state["Student"]["head_dims"] == [] and not any(k.startswith("heads.") for k in state["Student"]["state_dict"])
    a, b = (load_raw(students[k])["Student"]["state_dict"] for k in ("hubert_0", "wavlm"))
    torch.testing.assert_close(state["Student"]["state_dict"]["backbone.encoder.layers.0.fc2.weight"],
                               (a["backbone.encoder.layers.0.fc2.weight"] + b["backbone.encoder.layers.0.fc2.weight"]) / 2)
    assert len(load_student(out).heads) == 0
    wav = [torch.randn(16000) * 0.1]
    assert len(s3prl.hub.ekd_distiller(ckpt=str(out))(wav)["hidden_states"]) == 3
    with pytest.raises(ConfigError, match=r"hidden_states=heads, but this student has no prediction heads .*; use "
                                          r"hidden_states: backbone$"):
        s3prl.hub.ekd_distiller(ckpt=str(out), hidden_states="heads")
    # a merged student merges again (it keeps its initialisation's record)
    again = merge_students([str(out), students["hubert_1"]], tmp_path / "again.ckpt")
    assert again["heads"].startswith("dropped")


def test_other_initialisation_architecture_or_record_is_one_line(students, tmp_path):
    out = tmp_path / "never.ckpt"
    with pytest.raises(CheckpointError, match=r"random\.ckpt: differs from .*hubert_0\.ckpt in its initialisation "
                                              r"\(random\(seed=3\), .*give their runs one init_from and one seed"):
        merge_students([students["hubert_0"], students["random"]], out)
    state = load_raw(students["hubert_1"])
    wider = copy.deepcopy(state)
    wider["Student"]["config"]["conv_pos"] = 8
    torch.save(wider, tmp_path / "wider.ckpt")
    with pytest.raises(CheckpointError, match=r"wider\.ckpt: differs from .* in student config conv_pos \(8 vs 16\); "
                                              "merging needs students of one architecture"):
        merge_students([students["hubert_0"], tmp_path / "wider.ckpt"], out)
    heads = copy.deepcopy(state)
    heads["Student"]["config"]["head_inter_dim"] = 16
    torch.save(heads, tmp_path / "heads.ckpt")
    with pytest.raises(CheckpointError, match=r"predicts the same targets .* another head layout \(head_inter_dim "
                                              r"16 vs None\)"):
        merge_students([students["hubert_0"], tmp_path / "heads.ckpt"], out)
    old = {k: v for k, v in state.items() if k != INIT_KEY}
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match=r"old\.ckpt: trained before initialisations were recorded"):
        merge_students([students["hubert_0"], tmp_path / "old.ckpt"], out)
    torch.save({"format": MODEL_FORMAT}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: an exported model\.pt does not record its initialisation"):
        merge_students([students["hubert_0"], tmp_path / "model.pt"], out)
    with pytest.raises(UserError, match=r"--weights: 1 weight\(s\) for 2 checkpoints"):
        parse_weights("1", 2)
    with pytest.raises(UserError, match="every weight must be a positive number"):
        parse_weights("1,0", 2)
    with pytest.raises(UserError, match="merging needs two or more"):
        merge_students([students["hubert_0"]], out)
    assert not out.exists()


def test_cli_writes_once_and_replaces_only_with_force(students, tmp_path, capsys):
    out = tmp_path / "m.ckpt"
    pair = [students["hubert_0"], students["hubert_1"]]
    assert cli.main(["merge", *pair, "--out", str(out), "--weights", "2,1"]) == 0
    assert "merged 2 students (weights 0.667, 0.333" in capsys.readouterr().out
    before = out.read_bytes()
    assert cli.main(["merge", *pair, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s3prl-ekd merge: error: --out") and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert cli.main(["merge", *pair, "--out", str(out), "--force"]) == 0
    assert load_raw(out)["Merged_From"]["students"][0]["weight"] == 0.5
    assert cli.main(["merge", students["hubert_0"], students["random"], "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "in its initialisation" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()
