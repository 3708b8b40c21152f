"""The `ekd_distiller` upstream: hub registration, hidden states, padding, options, errors,
and a short s3prl downstream training run through it."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from s3prl_ekd.upstream.ekd_distiller import hubconf
from s3prl_ekd.upstream.ekd_distiller.expert import UpstreamExpert, head_states

from s3prl_ekd.core.frames import conv_frame_lengths
from s3prl_ekd.core.student import EKDStudent, StudentConfig, student_state
from s3prl_ekd.errors import AudioError, CheckpointError, ConfigError
from s3prl_ekd.io.audio import load_audio
from s3prl_ekd.io.checkpoint import MODEL_FORMAT

MODES = ["layerwise_average", "layerwise_concat", "multi_head"]
STUDENT_DIM, STUDENT_LAYERS = 32, 2  # conftest.TINY_STUDENT


def speech_pair(speech_dir: Path) -> list[torch.Tensor]:
    """1 s and 3 s of real (espeak) speech."""
    waves = [load_audio(p) for p in sorted(speech_dir.glob("*.wav"))[:3]]
    return [waves[0][:16000], torch.cat(waves)[:48000]]


def run_python(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_hub_entries_found_in_a_fresh_interpreter(ekd_checkpoints):
    pth = Path(sysconfig.get_paths()["purelib"]) / "s3prl_ekd_hub.pth"
    assert pth.is_file(), f"{pth} missing: run `.venv/bin/s3prl-ekd register` (make setup does)"
    ckpt = ekd_checkpoints["layerwise_average"]
    proc = run_python(f"""
import json, torch
import s3prl.hub as h
print(h.ekd_distiller)
from s3prl.nn import S3PRLUpstream
up = S3PRLUpstream("ekd_distiller", path_or_url={str(ckpt)!r}).eval()
with torch.no_grad():
    hs, lens = up(torch.randn(2, 32000), torch.tensor([16000, 32000]))
print(json.dumps({{"options": [n for n in h.options() if n.startswith("ekd")],
                  "sizes": up.hidden_sizes, "rates": up.downsample_rates,
                  "shape": list(hs[0].shape), "lens": lens[0].tolist()}}))
""")
    assert "<function ekd_distiller at" in proc.stdout
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["options"] == ["ekd_distiller", "ekd_distiller_local", "ekd_distiller_url"]
    assert info["sizes"] == [STUDENT_DIM] * (1 + STUDENT_LAYERS)
    assert info["rates"] == [320] * (1 + STUDENT_LAYERS)
    assert info["shape"] == [2, 100, STUDENT_DIM] and info["lens"] == [50, 100]


@pytest.mark.parametrize("mode", MODES)
def test_padded_batch_matches_each_utterance_alone(ekd_checkpoints, speech_dir, mode):
    upstream = hubconf.ekd_distiller(ckpt=str(ekd_checkpoints[mode])).eval()
    wavs = speech_pair(speech_dir)
    rate = upstream.get_downsample_rates("hidden_states")
    assert rate == 320  # 5 * 2**6: the standard CNN's strides
    with torch.no_grad():
        batch = upstream(wavs)["hidden_states"]
        alone = [upstream([w])["hidden_states"] for w in wavs]
    assert upstream.hidden_state_names == ["cnn", "layer1", "layer2"]
    assert len(batch) == 1 + STUDENT_LAYERS
    frames = [int(conv_frame_lengths(torch.tensor(len(w)), upstream.student.backbone.conv_layers)) for w in wavs]
    assert frames == [49, 149]
    for layer, state in enumerate(batch):
        assert state.shape == (2, 149, STUDENT_DIM)
        assert abs(len(wavs[1]) / rate - state.shape[1]) <= 1
        for i, n in enumerate(frames):
            assert alone[i][layer].shape == (1, n, STUDENT_DIM)
            torch.testing.assert_close(state[i, :n], alone[i][layer][0], atol=1e-5, rtol=1e-5)
        assert state[0, frames[0]:].abs().max() == 0  # padding frames are zeroed
        assert state[0, : frames[0]].abs().max() > 0


def test_backbone_plus_heads_are_the_students_outputs(ekd_checkpoints, speech_dir):
    upstream = UpstreamExpert(str(ekd_checkpoints["layerwise_average"]), hidden_states="backbone+heads").eval()
    wav = speech_pair(speech_dir)[1]
    with torch.no_grad():
        states = upstream([wav])["hidden_states"]
        direct = upstream.student(wav[None], torch.tensor([len(wav)]))
    assert upstream.hidden_state_names == ["cnn", "layer1", "layer2", "head/average/L1", "head/average/L2"]
    assert len(states) == 5 and all(s.shape == (1, 149, STUDENT_DIM) for s in states)
    for mine, theirs in zip(states, [*direct.hidden_states, direct.predictions[0][:, 0], direct.predictions[0][:, 1]]):
        torch.testing.assert_close(mine, theirs)


def write_synthetic_model(path: Path, aggregation: str, head_dims: list[int], teacher_dims: list[int],
                          extractor_mode: str = "layer_norm") -> EKDStudent:
    """A model.pt (random student) without pretraining, for cases the fixture runs do not cover."""
    from conftest import tiny_student

    torch.manual_seed(0)
    student = EKDStudent(StudentConfig(**tiny_student(extractor_mode=extractor_mode)), head_dims, 2,
                         residual=aggregation == "multi_head_residual")
    teachers = [{"name": f"t{k}", "layers": [1, 2], "weight": 1.0, "dim": d} for k, d in enumerate(teacher_dims)]
    torch.save({"format": MODEL_FORMAT, "student": student_state(student), "aggregation": aggregation,
                "teachers": teachers, "step": 0, "model_config": {}}, path)
    return student


def test_concat_heads_split_into_teacher_chunks_and_batch_path(tmp_path, speech_dir):
    # Equal-size teachers, so the split heads can be weighted-summed; layer_norm CNN runs batched.
    student = write_synthetic_model(tmp_path / "model.pt", "layerwise_concat", [64], [32, 32])
    upstream = UpstreamExpert(str(tmp_path / "model.pt"), hidden_states="heads").eval()
    assert not upstream.length_dependent_cnn
    assert upstream.hidden_state_names == ["head/0:t0/L1", "head/0:t0/L2", "head/1:t1/L1", "head/1:t1/L2"]
    wavs = speech_pair(speech_dir)
    with torch.no_grad():
        batch = upstream(wavs)["hidden_states"]
        alone = upstream([wavs[0]])["hidden_states"]
        prediction = student.eval()(wavs[1][None], torch.tensor([48000])).predictions[0]  # (1, 2, T, 64)
    assert [s.shape for s in batch] == [(2, 149, 32)] * 4
    for k in range(2):
        for target in range(2):
            torch.testing.assert_close(batch[2 * k + target][1:], prediction[:, target, :, 32 * k:32 * (k + 1)])
    for b, a in zip(batch, alone):
        torch.testing.assert_close(b[0, :49], a[0], atol=1e-5, rtol=1e-5)


def test_residual_heads_are_the_average_then_each_teachers_final_prediction(tmp_path, speech_dir):
    student = write_synthetic_model(tmp_path / "model.pt", "multi_head_residual", [32, 32, 32], [32, 32])
    upstream = UpstreamExpert(str(tmp_path / "model.pt"), hidden_states="heads").eval()
    assert upstream.hidden_state_names == ["head/average/L1", "head/average/L2", "head/0:t0/L1", "head/0:t0/L2",
                                           "head/1:t1/L1", "head/1:t1/L2"]
    wav = speech_pair(speech_dir)[1]
    with torch.no_grad():
        states = upstream([wav])["hidden_states"]
        student.eval()
        last = student(wav[None], torch.tensor([len(wav)])).hidden_states[-1]
        shared, residual = student.heads[0](last), student.heads[2](last)
    torch.testing.assert_close(states[1], shared[:, 1])
    torch.testing.assert_close(states[4], shared[:, 0] + residual[:, 0])  # teacher 1, target 0


def test_head_states_order_on_hand_made_tensors():
    concat = torch.arange(2 * 2 * 3 * 5, dtype=torch.float).reshape(2, 2, 3, 5)  # (B, L, T, 2 + 3)
    states = head_states([concat], "layerwise_concat", [2, 3])
    assert [s.shape for s in states] == [(2, 3, 2), (2, 3, 2), (2, 3, 3), (2, 3, 3)]
    assert torch.equal(states[1], concat[:, 1, :, :2]) and torch.equal(states[2], concat[:, 0, :, 2:])
    multi = [torch.zeros(2, 2, 3, 4), torch.ones(2, 2, 3, 6)]
    assert [s.shape[-1] for s in head_states(multi, "multi_head", [4, 6])] == [4, 4, 6, 6]
    with pytest.raises(ConfigError, match="unknown"):
        head_states([concat], "layerwise_concat", [None, None])


def test_heads_of_different_sizes_are_refused_with_the_sizes(ekd_checkpoints):
    with pytest.raises(ConfigError, match=r"different sizes.*32.*48.*hidden_states: backbone"):
        UpstreamExpert(str(ekd_checkpoints["multi_head"]), hidden_states="heads")
    with pytest.raises(ConfigError, match=r"head/1:wavlm_local/L2: 48"):
        UpstreamExpert(str(ekd_checkpoints["layerwise_concat"]), hidden_states="backbone+heads")


def test_options_from_model_config_yaml(ekd_checkpoints, tmp_path):
    ckpt = str(ekd_checkpoints["layerwise_average"])
    config = tmp_path / "upstream.yaml"
    config.write_text(yaml.safe_dump({"hidden_states": "heads"}))
    assert len(hubconf.ekd_distiller(ckpt=ckpt, model_config=str(config)).hidden_state_names) == 2
    # a keyword wins over the file
    assert len(hubconf.ekd_distiller(ckpt=ckpt, model_config=str(config), hidden_states="backbone")
               .hidden_state_names) == 3
    config.write_text("hidden_state: heads\n")
    with pytest.raises(ConfigError, match="upstream.yaml.hidden_state: unknown key; did you mean 'hidden_states'"):
        hubconf.ekd_distiller(ckpt=ckpt, model_config=str(config))
    with pytest.raises(ConfigError, match="'everything' is not one of backbone, heads"):
        hubconf.ekd_distiller(ckpt=ckpt, hidden_states="everything")
    with pytest.raises(ConfigError, match="unknown option"):
        hubconf.ekd_distiller(ckpt=ckpt, layers=3)


def test_corrupt_and_wrong_kind_checkpoints_are_named(ekd_checkpoints, tiny_teachers, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "states-6.ckpt"
    truncated.write_bytes(ekd_checkpoints["layerwise_average"].read_bytes()[:5000])
    cases = {text: "cannot read as a torch checkpoint", truncated: "corrupt, truncated",
             tiny_teachers["hubert_a"]: "teacher model checkpoint"}
    for path, reason in cases.items():
        with pytest.raises(CheckpointError) as caught:
            hubconf.ekd_distiller(ckpt=str(path))
        assert str(path) in str(caught.value) and reason in str(caught.value)
        assert "s3prl-ekd pretrain" in str(caught.value)
    with pytest.raises(CheckpointError, match="not found"):
        hubconf.ekd_distiller(ckpt=str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        hubconf.ekd_distiller()


EMOTIONS = ["neu", "hap", "ang", "sad"]  # one "emotion" per espeak voice


def emotion_recipe(speech_dir: Path, workdir: Path) -> Path:
    """IEMOCAP-layout metadata over the generated speech, and a minimal s3prl `emotion` config."""
    items = [{"path": p.name, "label": EMOTIONS[int(p.name[3])], "speaker": p.name[:4]}
             for p in sorted(speech_dir.glob("spk*.wav"))]
    session = workdir / "meta_data" / "Session1"
    session.mkdir(parents=True)
    labels = {name: i for i, name in enumerate(EMOTIONS)}
    for split, rows in (("train", [r for r in items if r["path"][6] != "7"]),
                        ("test", [r for r in items if r["path"][6] == "7"])):
        (session / f"{split}_meta_data.json").write_text(json.dumps({"labels": labels, "meta_data": rows}))
    config = {
        "runner": {"total_steps": 4, "gradient_clipping": 1, "gradient_accumulate_steps": 1, "log_step": 2,
                   "eval_step": 4, "save_step": 4, "max_keep": 1, "eval_dataloaders": ["dev"]},
        "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-3},
        "downstream_expert": {
            "datarc": {"root": str(speech_dir), "test_fold": "fold1", "pre_load": True, "train_batch_size": 4,
                       "eval_batch_size": 4, "num_workers": 0, "valid_ratio": 0.2,
                       "meta_data": str(workdir / "meta_data")},
            "modelrc": {"projector_dim": 16, "select": "UtteranceLevel",
                        "UtteranceLevel": {"pooling": "MeanPooling"}}},
    }
    path = workdir / "er_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_short_downstream_training_run(ekd_checkpoints, speech_dir, tmp_path):
    config = emotion_recipe(speech_dir, tmp_path)
    expdir = tmp_path / "er_ekd"
    cmd = [sys.executable, "-m", "s3prl_ekd.cli", "downstream", "-m", "train", "-u", "ekd_distiller",
           "-k", str(ekd_checkpoints["layerwise_average"]), "-d", "emotion", "-c", str(config),
           "-p", str(expdir), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Take a list of 3 features and weighted sum them" in proc.stdout + proc.stderr
    saved = torch.load(expdir / "states-4.ckpt", map_location="cpu", weights_only=False)
    assert saved["Step"] == 4 and saved["Featurizer"]["weights"].shape == (3,)
    assert "dev at step 4" in (expdir / "log.log").read_text()


def test_too_short_or_multichannel_waveforms_are_refused(ekd_checkpoints):
    upstream = hubconf.ekd_distiller(ckpt=str(ekd_checkpoints["layerwise_average"])).eval()
    assert upstream.min_samples == 400  # receptive field of the standard CNN (25 ms)
    with torch.no_grad():
        assert upstream([torch.randn(400)])["hidden_states"][0].shape == (1, 1, STUDENT_DIM)
        with pytest.raises(AudioError, match="waveform 1 has shape \\(399,\\).*at least 400 samples"):
            upstream([torch.randn(16000), torch.randn(399)])
        with pytest.raises(AudioError, match="waveform 0 has shape \\(2, 16000\\)"):
            upstream([torch.randn(2, 16000)])
