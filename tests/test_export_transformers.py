"""`s3prl-ekd export --format transformers`: a HubertModel folder that AutoModel loads offline, without
s3prl or s3prl-ekd, and whose hidden states are the ekd_distiller upstream's; the heads file, the model
card, and the inputs refused before anything is written."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli_here
from s3prl_ekd.upstream.ekd_distiller import hubconf
from torch.nn.utils.rnn import pad_sequence

from s3prl_ekd.core.frames import conv_frame_lengths
from s3prl_ekd.core.student import (
    EKDStudent,
    StudentConfig,
    distilhubert_base,
    ekd_student_demo,
    ekd_student_tiny,
    student_from_dict,
    student_state,
)
from s3prl_ekd.io.audio import load_audio
from s3prl_ekd.io.checkpoint import MODEL_CONFIG_KEY, STEP_KEY, STUDENT_KEY, TEACHER_FINGERPRINTS_KEY, read_checkpoint
from s3prl_ekd.io.files import file_sha256
from s3prl_ekd.tools import hf_export
from s3prl_ekd.tools.export import CARD_FILES, ExportOptions, export

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHERS = [PROJECT_ROOT / "pretrain_configs" / "teachers" / f"{kind}.pt" for kind in ("hubert", "robust_hubert", "wavlm")]
TOLERANCE = 1e-5
FOLDER_FILES = sorted(["config.json", "model.safetensors", "preprocessor_config.json", *CARD_FILES])
TINY = {"encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2,
        "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"}  # CNN as wide as the model
RUNNER_CONFIG = {"runner": {"total_steps": 200000}, "optimizer": {"name": "AdamW_with_schedule", "lr": 2.0e-4},
                 "pretrain_expert": {"datarc": {"train_batch_size": 24, "sequence_length": 250000, "num_workers": 8,
                                                "libri_root": "/home/someone/LibriSpeech/", "file_path": "data/len_for_bucket",
                                                "sets": ["train-clean-100", "train-clean-360", "train-other-500"]}}}


def write_student_checkpoint(path: Path, config: StudentConfig, teachers: list[dict], aggregation: str,
                             head_dims: list[int], seed: int, step: int = 1234, **extra) -> Path:
    """A checkpoint in the pretraining runner's layout, holding a random student whose norms and
    biases are not at their initial values (so a swapped or missed weight changes the outputs)."""
    torch.manual_seed(seed)
    student = EKDStudent(config, head_dims, num_targets=len(teachers[0]["layers"]))
    with torch.no_grad():
        for parameter in student.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model_config = {"teachers": teachers, "aggregation": aggregation, "student": dataclasses.asdict(config)}
    torch.save({STUDENT_KEY: student_state(student), MODEL_CONFIG_KEY: model_config, STEP_KEY: step,
                "Config": RUNNER_CONFIG, **extra}, path)
    return path


def demo_teachers() -> list[dict]:
    return [{"name": name, "ckpt": str(path), "layers": [1, 3, 4], "weight": 1.0}
            for name, path in zip(("hubert_local", "hubert_local", "wavlm_local"), DEMO_TEACHERS)]


def tiny_teachers() -> list[dict]:
    return [{"name": "hubert_local", "ckpt": None, "layers": [1, 2], "weight": 1.0},
            {"name": "wavlm_local", "ckpt": None, "layers": [1, 2], "weight": 2.0}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """demo: the demo's student size, group-norm CNN, layerwise_average of the demo's three teachers;
    layer_norm: 32 dims, layer-norm CNN as wide as the model (s3prl has no projection), multi_head;
    distilhubert: DistilHuBERT's size, layerwise_concat."""
    out = tmp_path_factory.mktemp("students")
    return {
        "demo": write_student_checkpoint(out / "demo.ckpt", ekd_student_demo(feature_grad_mult=0.0), demo_teachers(),
                                         "layerwise_average", [192], seed=1),
        "layer_norm": write_student_checkpoint(out / "layer_norm.ckpt", ekd_student_tiny(**TINY, extractor_mode="layer_norm"),
                                               tiny_teachers(), "multi_head", [32, 48], seed=2),
        "distilhubert": write_student_checkpoint(out / "distilhubert.ckpt", distilhubert_base(), tiny_teachers(),
                                                 "layerwise_concat", [80], seed=3),
    }


@pytest.fixture(scope="module")
def folders(checkpoints, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exported")
    for name, ckpt in checkpoints.items():
        export(ckpt, out / name, ExportOptions(format="transformers", speed_seconds=0))
    return {name: out / name for name in checkpoints}


@pytest.fixture(scope="module")
def speech(speech_dir) -> list[torch.Tensor]:
    """Three utterances of real (espeak) speech: 1.0 s, 1.7 s and 2.3 s."""
    joined = torch.cat([load_audio(p) for p in sorted(speech_dir.glob("*.wav"))[:4]])
    return [joined[:16000], joined[16000:43200], joined[43200:80000]]


def load(folder: Path):
    from transformers import AutoFeatureExtractor, AutoModel

    return AutoFeatureExtractor.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def run_cli(argv: list[str]) -> tuple[int, str]:
    return run_cli_here(argv)


def largest_differences(ours: list[torch.Tensor], theirs: list[torch.Tensor], frames: list[int]) -> list[float]:
    """Per state, the largest |difference| over each utterance's own frames."""
    assert len(ours) == len(theirs)
    return [max(float((a[i, :n] - b[i, :n]).abs().max()) for i, n in enumerate(frames)) for a, b in zip(ours, theirs)]


def frame_counts(wavs: list[torch.Tensor], ckpt: Path) -> list[int]:
    config = read_checkpoint(ckpt)["student"]["config"]
    from s3prl_ekd.core.frames import parse_conv_layers

    return conv_frame_lengths(torch.tensor([len(w) for w in wavs]), parse_conv_layers(config["conv_feature_layers"])).tolist()


# --- the folder ----------------------------------------------------------------------------------

def test_folder_loads_with_the_auto_classes(folders):
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    extractor, model = load(folders["demo"])
    assert sorted(p.name for p in folders["demo"].iterdir()) == FOLDER_FILES
    assert len({p.stat().st_mode for p in folders["demo"].iterdir()}) == 1  # safetensors' 0600 made like the rest
    assert type(model) is HubertModel and type(extractor) is Wav2Vec2FeatureExtractor
    assert extractor.do_normalize is False and extractor.return_attention_mask is True
    assert extractor.sampling_rate == 16000
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.conv_dim[-1]) == (2, 192, 128)
    assert config.feat_extract_norm == "group" and config.feat_proj_layer_norm is False
    assert config.conv_bias is False and config.hidden_act == "gelu" and config.do_stable_layer_norm is False
    assert config.mask_time_prob == 0 and config.mask_feature_prob == 0 and not hasattr(model, "masked_spec_embed")
    assert json.loads((folders["layer_norm"] / "config.json").read_text())["feat_extract_norm"] == "layer"


@pytest.mark.parametrize("name", ["demo", "layer_norm", "distilhubert"])
def test_one_utterance_gives_the_upstream_hidden_states(name, checkpoints, folders, speech):
    """Each utterance alone: our state 0 is feature_projection(feature_extractor(x)); layers 1..N are
    HubertModel's hidden_states[1..N]."""
    upstream = hubconf.ekd_distiller(ckpt=str(checkpoints[name])).eval()
    _, model = load(folders[name])
    for wav in (speech[-1:] if name == "distilhubert" else speech):  # the large one: the longest utterance
        with torch.no_grad():
            expected = upstream([wav])["hidden_states"]
        got = hf_export.hubert_hidden_states(model, wav[None])
        assert len(got) == len(expected) == 1 + model.config.num_hidden_layers
        differences = [float((a - b).abs().max()) for a, b in zip(expected, got)]
        assert max(differences) <= TOLERANCE, differences
        print(f"\n{name}, {len(wav) / 16000:.1f} s alone: largest difference per state", differences)
    # hidden_states[0] is not our state 0: it is after the positional convolution and layer norm
    with torch.no_grad():
        first = model(speech[-1][None], output_hidden_states=True).hidden_states[0]
    assert float((first - expected[0]).abs().max()) > 1e-2


def test_padded_batch_of_a_layer_norm_student_gives_the_upstream_batch(checkpoints, folders, speech):
    extractor, model = load(folders["layer_norm"])
    inputs = extractor([w.numpy() for w in speech], sampling_rate=16000, padding=True, return_tensors="pt")
    got = hf_export.hubert_hidden_states(model, inputs["input_values"], inputs["attention_mask"])
    upstream = hubconf.ekd_distiller(ckpt=str(checkpoints["layer_norm"])).eval()
    assert not upstream.length_dependent_cnn  # the upstream runs this batch padded, as one
    with torch.no_grad():
        expected = upstream(speech)["hidden_states"]
    frames = frame_counts(speech, checkpoints["layer_norm"])
    assert len(set(frames)) == 3
    differences = largest_differences(expected, got, frames)
    assert max(differences) <= TOLERANCE
    print("\nlayer_norm, padded batch of three: largest difference per state", differences)


def test_padded_batch_of_a_group_norm_student_gives_its_padded_forward(checkpoints, folders, speech):
    """The default CNN group-normalises over time: a padded batch with attention_mask gives the student's
    own padded forward (as in pretraining), not each utterance alone; one at a time gives the upstream's."""
    extractor, model = load(folders["demo"])
    inputs = extractor([w.numpy() for w in speech], sampling_rate=16000, padding=True, return_tensors="pt")
    got = hf_export.hubert_hidden_states(model, inputs["input_values"], inputs["attention_mask"])
    frames = frame_counts(speech, checkpoints["demo"])
    student = student_from_dict(read_checkpoint(checkpoints["demo"])["student"]).eval()
    with torch.no_grad():
        padded = student(pad_sequence(speech, batch_first=True), torch.tensor([len(w) for w in speech]),
                         predict=False).hidden_states
        upstream = hubconf.ekd_distiller(ckpt=str(checkpoints["demo"])).eval()
        assert upstream.length_dependent_cnn
        expected = upstream(speech)["hidden_states"]  # one utterance at a time inside
    differences = largest_differences(padded, got, frames)
    assert max(differences) <= TOLERANCE
    print("\ndemo, padded batch of three with attention_mask: largest difference per state", differences)
    assert max(largest_differences(expected, got, frames)) > 1e-2  # padding changed the shorter utterances
    one_at_a_time = [hf_export.hubert_hidden_states(model, w[None]) for w in speech]
    stacked = [pad_sequence([states[k][0] for states in one_at_a_time], batch_first=True) for k in range(len(got))]
    assert max(largest_differences(expected, stacked, frames)) <= TOLERANCE


# As where neither s3prl-ekd nor s3prl is installed: their start-up finders are gone and importing
# them fails as a missing module does.
BLOCK_S3PRL = """
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if type(f).__name__ not in ("S3prlEkdStartup", "HubFinder", "MissingFinder")]
for name in [n for n in sys.modules if n.split(".")[0] in ("s3prl_ekd", "s3prl")]:
    del sys.modules[name]
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("s3prl_ekd", "s3prl"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)", name=name)
sys.meta_path.insert(0, _Blocked())
"""


def test_fresh_process_without_s3prl_gives_the_same_states(checkpoints, folders, speech, tmp_path):
    """A new interpreter where s3prl_ekd and s3prl cannot be imported, offline, loads each folder with
    the Auto classes; its states equal the upstream's computed here."""
    names = ["demo", "layer_norm"]
    torch.save(speech, tmp_path / "speech.pt")
    expected = {}
    for name in names:
        upstream = hubconf.ekd_distiller(ckpt=str(checkpoints[name])).eval()
        with torch.no_grad():
            expected[name] = [upstream([w])["hidden_states"] for w in speech]
    code = BLOCK_S3PRL + f"""
import json, torch
from transformers import AutoFeatureExtractor, AutoModel
for blocked in ("s3prl_ekd", "s3prl"):
    try:
        __import__(blocked)
        raise SystemExit(blocked + " was importable")
    except ImportError:
        pass
speech = torch.load({str(tmp_path / 'speech.pt')!r})
out = {{}}
for name, folder in {json.dumps({n: str(folders[n]) for n in names})}.items():
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    states = []
    for wav in speech:
        values = extractor(wav.numpy(), sampling_rate=16000, return_tensors="pt")["input_values"]
        with torch.no_grad():
            cnn = model.feature_projection(model.feature_extractor(values).transpose(1, 2))
            states.append([cnn, *model(values, output_hidden_states=True).hidden_states[1:]])
    out[name] = states
torch.save(out, {str(tmp_path / 'states.pt')!r})
print("loaded", sorted(n for n in sys.modules if n.split(".")[0] in ("s3prl_ekd", "s3prl")))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded []" in proc.stdout
    got = torch.load(tmp_path / "states.pt", weights_only=True)
    for name in names:
        pairs = list(zip(expected[name], got[name], strict=True))  # per utterance: (ours, theirs)
        assert all(len(mine) == len(theirs) == 3 for mine, theirs in pairs)
        per_state = [max(float((mine[k] - theirs[k]).abs().max()) for mine, theirs in pairs) for k in range(3)]
        assert max(per_state) <= TOLERANCE
        print(f"\nfresh process ({proc.stdout.strip()}), {name}: largest difference per state", per_state)


# --- heads and card ------------------------------------------------------------------------------

def test_with_heads_writes_them_beside_the_model(checkpoints, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "with_heads"
    rc, output = run_cli(["export", "--format", "transformers", "--with-heads", "--speed-seconds", "0",
                          str(checkpoints["layer_norm"]), str(out)])
    assert rc == 0, output
    assert "prediction heads" in output and "written to prediction_heads.safetensors" in output
    state = read_checkpoint(checkpoints["layer_norm"])
    with safe_open(str(out / hf_export.HEADS_FILE), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    expected = {k: v for k, v in state["student"]["state_dict"].items() if k.startswith("heads.")}
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert metadata["format"] == hf_export.HEADS_FORMAT and metadata["aggregation"] == "multi_head"
    sets = json.loads(metadata["head_sets"])
    assert [(s["dim"], s["teachers"], s["inter_dim"]) for s in sets] == [(32, ["0:hubert_local"], 32),
                                                                       (48, ["1:wavlm_local"], 32)]
    assert [t["layers"] for t in json.loads(metadata["teachers"])] == [[1, 2], [1, 2]]
    # The file's description is enough to run a head set on the model's last hidden state.
    _, model = load(out)
    wav = torch.randn(16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last = model(wav[None]).last_hidden_state                                        # (1, T, 32)
        student = student_from_dict(state["student"]).eval()
        predictions = student(wav[None], torch.tensor([16000])).predictions
    targets, k = int(metadata["targets"]), 1
    hidden = torch.nn.functional.gelu(last @ tensors[f"heads.{k}.proj.weight"].T + tensors[f"heads.{k}.proj.bias"])
    hidden = hidden.reshape(1, -1, targets, sets[k]["inter_dim"])                      # (1, T, L, inter)
    out_k = torch.einsum("btli,lio->blto", hidden, tensors[f"heads.{k}.split.weight"])
    out_k = out_k + tensors[f"heads.{k}.split.bias"].reshape(1, targets, 1, -1)          # (1, L, T, 48)
    assert float((out_k - predictions[k]).abs().max()) <= TOLERANCE


def test_head_sets_are_read_from_the_checkpoint():
    def state(dims, residual):
        weights = {f"heads.{i}.proj.weight": torch.zeros((2 * (8 if i else 16), 4)) for i in range(len(dims))}
        return {"student": {"head_dims": dims, "num_targets": 2, "residual_heads": residual, "state_dict": weights},
                "teachers": [{"name": "a"}, {"name": "b"}]}

    residual = hf_export.head_sets(state([6, 6, 6], True))
    assert [(s.teachers, s.adds_to, s.inter_dim) for s in residual] == [(["0:a", "1:b"], None, 16), (["0:a"], 0, 8),
                                                                       (["1:b"], 0, 8)]
    assert [s.teachers for s in hf_export.head_sets(state([6], False))] == [["0:a", "1:b"]]
    assert [s.teachers for s in hf_export.head_sets(state([6, 7], False))] == [["0:a"], ["1:b"]]


def test_model_card(checkpoints, folders, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(folders["demo"] / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert {"hubert", "s3prl-ekd", "layerwise-average"} <= set(card.data.tags)
    assert card.data.datasets == ["openslr/librispeech_asr"]  # the runner config's LibriSpeech sets
    for path in DEMO_TEACHERS:
        assert f"`{file_sha256(path)}` *" in card.text  # hashed at export: marked
    student = student_from_dict(read_checkpoint(checkpoints["demo"])["student"])
    for fact in ("Aggregation: **layerwise_average**", "steps: 1,234 of the run's 200,000",
                 f"**{sum(p.numel() for p in student.parameters()):,}**", "`sets: ['train-clean-100'",
                 "`libri_root: .../LibriSpeech`", "group-normalises", "one utterance at a time",
                 "`hidden_states[1]`", "not part of `HubertModel`"):
        assert fact in card.text, fact
    assert "/home/someone" not in card.text
    assert "filter=lfs" in (folders["demo"] / ".gitattributes").read_text()
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in (folders["demo"] / ".gitattributes").read_text()
    assert "identity projection" in ModelCard.load(folders["layer_norm"] / "README.md").text


def test_card_uses_recorded_fingerprints_and_superb_results(tmp_path):
    recorded = ["a" * 64, "hub:wavlm_base_plus"]
    ckpt = write_student_checkpoint(tmp_path / "recorded.ckpt", ekd_student_tiny(**TINY), tiny_teachers(),
                                    "multi_head", [32, 48], seed=4, **{TEACHER_FINGERPRINTS_KEY: recorded})
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"upstream": "ekd_distiller", "upstream_ckpt": str(ckpt.resolve()), "profile": "cpu-small",
                                   "tasks": {"pr": {"per": 41.5}, "sid": {"acc": 12.25}}}))
    out = tmp_path / "out"
    rc, output = run_cli(["export", "--format", "transformers", "--speed-seconds", "0", "--license", "cc-by-4.0",
                          "--superb-results", str(results), str(ckpt), str(out)])
    assert rc == 0, output
    text = (out / "README.md").read_text()
    assert f"`{'a' * 64}` |" in text and "`hub:wavlm_base_plus` |" in text and "hashed at export" not in text
    assert "| pr | per (lower is better) | 41.50 |" in text and "| sid | acc (higher is better) | 12.25 |" in text
    assert "license: cc-by-4.0" in text
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"upstream": "ekd_distiller", "upstream_ckpt": "/elsewhere/states-9.ckpt", "tasks": {}}))
    by_hash = tmp_path / "by_hash.json"
    by_hash.write_text(json.dumps({"upstream_ckpt": str(ckpt), "upstream_ckpt_sha256": "0" * 64, "tasks": {}}))
    for wrong in (other, by_hash):
        rc, output = run_cli(["export", "--format", "transformers", "--superb-results", str(wrong), str(ckpt),
                              str(tmp_path / "refused")])
        assert rc == 2 and "results of" in output and "not" in output, output
        assert not (tmp_path / "refused").exists()


# --- refusals and replacing ----------------------------------------------------------------------

def altered_checkpoint(source: Path, path: Path, **config) -> Path:
    """`source` with student config entries replaced (or added)."""
    state = torch.load(source, weights_only=True)
    state[STUDENT_KEY]["config"].update(config)
    torch.save(state, path)
    return path


REFUSALS = [
    # (case, extra arguments, checkpoint: name or a function of (checkpoints, tmp_path), words in the error line)
    ("teacher given as the student", [], lambda c, t: DEMO_TEACHERS[0], ["not an ekd_distiller checkpoint", "teacher"]),
    ("unknown format", ["--format", "onnx"], "demo", ["invalid choice: 'onnx'"]),
    ("bogus device", ["--device", "bogus"], "demo", ["--device 'bogus'"]),
    ("negative speed length", ["--speed-seconds", "-1"], "demo", ["--speed-seconds -1"]),
    ("speed length not a number", ["--speed-seconds", "nan"], "demo", ["--speed-seconds nan"]),
    ("speed length under the CNN window", ["--speed-seconds", "0.01"], "demo", ["CNN window"]),
    ("heads with the superb format", ["--format", "superb", "--with-heads"], "demo", ["--with-heads"]),
    ("license with a space", ["--license", "Apache 2.0"], "demo", ["--license"]),
    ("pre-LN layers", [], lambda c, t: altered_checkpoint(c["layer_norm"], t / "preln.ckpt", layer_norm_first=True),
     ["layer_norm_first"]),
    ("unknown extractor mode", [], lambda c, t: altered_checkpoint(c["layer_norm"], t / "mode.ckpt", extractor_mode="fancy"),
     ["extractor_mode", "'fancy'"]),
    ("unknown student option", [], lambda c, t: altered_checkpoint(c["layer_norm"], t / "key.ckpt", attention_type="sparse"),
     ["student.config.attention_type"]),
]


@pytest.mark.parametrize("case, args, ckpt, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_in_one_line_before_writing(case, args, ckpt, words, checkpoints, tmp_path):
    path = checkpoints[ckpt] if isinstance(ckpt, str) else ckpt(checkpoints, tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, output = run_cli(["export", *(["--format", "transformers"] if "--format" not in args else []), *args,
                          str(path), str(out)])
    assert rc == 2, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if "error:" in line]
    assert len(error_lines) == 1, output
    assert all(word in error_lines[0] for word in words), error_lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no staging folder


def test_non_empty_outdir_needs_force_and_is_replaced_only_when_complete(checkpoints, folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(checkpoints["demo"], out, ExportOptions(format="superb", speed_seconds=0))
    (out / "notes.txt").write_text("mine\n")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, output = run_cli(["export", "--format", "transformers", str(checkpoints["layer_norm"]), str(out)])
    assert rc == 2 and "not empty" in output and "--force" in output

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted on purpose")

    monkeypatch.setattr(hf_export, "feature_extractor", fail)  # after the weights were written
    with pytest.raises(RuntimeError, match="on purpose"):
        export(checkpoints["layer_norm"], out, ExportOptions(format="transformers", force=True, speed_seconds=0))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()

    export(checkpoints["layer_norm"], out, ExportOptions(format="transformers", force=True, speed_seconds=0))
    assert sorted(p.name for p in out.iterdir()) == sorted([*FOLDER_FILES, "notes.txt"])  # the superb files went
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "model.safetensors").read_bytes() == (folders["layer_norm"] / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fmt", ["transformers", "superb"])
def test_a_full_disk_is_one_line_and_leaves_nothing(fmt, checkpoints, tmp_path):
    """OUT's parent on a 1 MiB tmpfs: the demo student's weights (~5 MB) do not fit."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.fail("needs `unshare -m` (root, Linux) to mount a small tmpfs; run the suite as CI does")
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = [sys.executable, "-m", "s3prl_ekd.cli", "export", "--format", fmt, "--speed-seconds", "0",
            str(checkpoints["demo"]), str(disk / "out")]
    script = f'mount -t tmpfs -o size=1m tmpfs {disk} && "$@"; code=$?; ls -A {disk}; exit $code'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        f"s3prl-ekd export: error: {disk}: no space left on the device while exporting; nothing was written or "
        "replaced; free some space and run again"]
    assert proc.stdout.strip() == ""  # `ls -A` of the full disk: no OUT, no staging folder
