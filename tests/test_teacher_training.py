"""Label-free teacher training: targets, input corruptions, learning, hub loading, determinism."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from s3prl_ekd.demo import teacher_training as tt
from s3prl_ekd.errors import AudioError, ConfigError
from s3prl_ekd.io.audio import load_audio
from s3prl_ekd.io.files import file_sha256

# A few-second model: 2 layers x 64 dims, 32-channel CNN with the real 320-sample hop.
TINY = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=2,
            conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", conv_pos=16, conv_pos_groups=4)
TRAIN = dict(size=TINY, batch_size=4, crop_seconds=1.0, lr=3e-3, n_clusters=20, progress=False)
STEPS = 80


def _mean(curve, first, last):
    values = [value for _, value in curve[first:last]]
    return sum(values) / len(values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors train faster on one thread, and much faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wav_files(speech_dir):
    return sorted(speech_dir.glob("*.wav"))


@pytest.fixture(scope="module")
def trained(wav_files, tmp_path_factory):
    """Each kind trained for STEPS steps on the 32 fixture utterances: kind -> TeacherTrainingResult."""
    out = tmp_path_factory.mktemp("trained_teachers")
    return {kind: tt.train_teacher(kind, wav_files, out / f"{kind}.pt", steps=STEPS, seed=0, **TRAIN)
            for kind in tt.KINDS}


# --- targets -----------------------------------------------------------------------------------

def test_mfcc_frames_line_up_with_the_cnn_frames():
    from s3prl_ekd.plugin.teacher_formats import build_hubert

    model, *_ = build_hubert("tiny", **TINY)
    for samples in (400, 719, 720, 8000, 16001, 32000):
        cnn_frames = model.feature_extractor(torch.zeros(1, samples)).shape[2]
        assert tt.num_frames(samples) == cnn_frames == tt.mfcc_features(torch.randn(samples)).shape[0]
    assert tt.mfcc_features(torch.randn(8000)).shape[1] == 39


def test_kmeans_finds_separated_blobs_deterministically():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(200, 2, generator=generator) for c in centres])
    found = tt.kmeans(points, 3, seed=1)
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.1
    assert torch.equal(found, tt.kmeans(points, 3, seed=1))
    labels = tt.assign_clusters(points, found)
    assert all(len(set(labels[i * 200:(i + 1) * 200].tolist())) == 1 for i in range(3))
    with pytest.raises(ConfigError, match="n_clusters"):
        tt.kmeans(points[:2], 3)


def test_cluster_targets_are_cached_per_file_list(wav_files, tmp_path):
    files = wav_files[:6]
    audio = [load_audio(f) for f in files]
    first = tt.cluster_targets(files, audio, n_clusters=8, cache_dir=tmp_path)
    assert [lab.shape[0] for lab in first.labels] == [tt.num_frames(a.shape[0]) for a in audio]
    assert len(set(torch.cat(first.labels).tolist())) > 4  # the speech uses many of the clusters
    (cache,) = tmp_path.glob("kmeans-*.pt")
    # Reused: a cache that answers with other labels would be visible here.
    state = torch.load(cache, weights_only=True)
    state["labels"][0] = torch.zeros_like(state["labels"][0])
    torch.save(state, cache)
    again = tt.cluster_targets(files, audio, n_clusters=8, cache_dir=tmp_path)
    assert again.labels[0].eq(0).all() and torch.equal(again.labels[1], first.labels[1])
    # Another file list (or cluster count) gets its own cache entry.
    tt.cluster_targets(files[:5], audio[:5], n_clusters=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("kmeans-*.pt"))) == 2


# --- input corruptions -------------------------------------------------------------------------

def _power_db(x: torch.Tensor) -> float:
    return 10 * torch.log10(x.pow(2).mean()).item()


def test_distort_keeps_length_and_changes_the_signal(wav_files):
    wav = load_audio(wav_files[0])
    for seed in range(5):
        out = tt.distort(wav, torch.Generator().manual_seed(seed))
        assert out.shape == wav.shape
        assert (out - wav).norm() > 0.1 * wav.norm()
        assert torch.equal(out, tt.distort(wav, torch.Generator().manual_seed(seed)))
    # Noise alone lands at the SNR asked for.
    noisy = tt.distort(wav, torch.Generator().manual_seed(0), reverb_prob=0, bandlimit_prob=0, snr_db=(10, 10))
    assert _power_db(wav) - _power_db(noisy - wav) == pytest.approx(10, abs=0.01)
    # Band-limiting removes the energy above the cut-off (noise kept 60 dB down).
    limited = tt.distort(wav, torch.Generator().manual_seed(0), reverb_prob=0, bandlimit_prob=1,
                         high_cut_hz=(2000, 2000), snr_db=(60, 60))
    freqs = torch.fft.rfftfreq(wav.shape[0], d=1 / 16000)
    high = freqs > 2500
    assert _power_db(torch.fft.rfft(limited)[high].abs()) < _power_db(torch.fft.rfft(wav)[high].abs()) - 30
    # Reverberation smears energy into the silence after the speech.
    padded = torch.cat([wav, torch.zeros(8000)])
    reverberant = tt.distort(padded, torch.Generator().manual_seed(0), reverb_prob=1, bandlimit_prob=0,
                             rt60=(0.8, 0.8), snr_db=(60, 60))
    assert _power_db(reverberant[-8000:-4000]) > _power_db(padded[-8000:-4000] + 1e-4) + 20


def test_mix_utterances_draws_the_second_speakers_level(wav_files):
    primary, secondary = load_audio(wav_files[0]), load_audio(wav_files[9])
    for seed in range(20):
        mixed = tt.mix_utterances(primary, secondary, torch.Generator().manual_seed(seed))
        assert mixed.shape == primary.shape
        interference = mixed - primary
        changed = interference.nonzero().squeeze(1)
        assert changed.numel() > 0
        assert changed[-1] - changed[0] + 1 <= 0.5 * primary.shape[0]  # one segment, at most half
        assert _power_db(interference) < _power_db(primary)  # the default range: quieter than the primary
    levels = []
    for seed in range(20):  # WavLM's range: within -5..5 dB of the primary, louder and quieter both occur
        mixed = tt.mix_utterances(primary, secondary, torch.Generator().manual_seed(seed), gain_db=(-5.0, 5.0))
        interference = mixed - primary
        changed = interference.nonzero().squeeze(1)
        # Measured over the nonzero span, which can only raise it a little where the segment is silent.
        levels.append(_power_db(interference[changed[0]:changed[-1] + 1]) - _power_db(primary))
    assert -5.5 <= min(levels) < 0 < max(levels) <= 7.0
    assert torch.equal(tt.mix_utterances(primary, secondary, torch.Generator().manual_seed(3)),
                       tt.mix_utterances(primary, secondary, torch.Generator().manual_seed(3)))


# --- training ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", tt.KINDS)
def test_masked_prediction_is_learnt(trained, kind):
    result = trained[kind]
    assert [step for step, _ in result.loss_curve] == list(range(1, STEPS + 1))
    # The masked-prediction cross-entropy itself (not the CNN penalty, which falls by itself) falls,
    # below the log(20) of guessing, and more masked frames get their cluster right.
    first, last = _mean(result.cross_entropy_curve, 0, 10), _mean(result.cross_entropy_curve, -10, None)
    assert last < first - 0.15 and last < math.log(TRAIN["n_clusters"]) - 0.05
    assert _mean(result.accuracy_curve, -10, None) > _mean(result.accuracy_curve, 0, 10) + 0.02
    assert _mean(result.loss_curve, -10, None) < _mean(result.loss_curve, 0, 10)
    saved = json.loads(result.loss_curve_path.read_text())
    assert saved["kind"] == kind and saved["size"] == {**tt.DEFAULT_SIZE, **TINY}
    assert saved.get("mix_gain_db") == (list(tt.WAVLM_MIX_GAIN_DB) if kind == "wavlm" else None)
    assert saved["loss"] == [list(point) for point in result.loss_curve]


@pytest.mark.parametrize("kind", tt.KINDS)
def test_checkpoint_loads_through_the_s3prl_hub(trained, kind, wav_files):
    import s3prl.hub

    result = trained[kind]
    hub_name = "wavlm_local" if kind == "wavlm" else "hubert_local"
    upstream = getattr(s3prl.hub, hub_name)(ckpt=str(result.ckpt_path)).eval()
    wav = load_audio(wav_files[0])
    with torch.no_grad():
        hidden = upstream([wav])["hidden_states"]
    assert len(hidden) == TINY["encoder_layers"] + 1
    assert hidden[-1].shape == (1, tt.num_frames(wav.shape[0]), TINY["encoder_embed_dim"])
    assert all(torch.isfinite(h).all() for h in hidden)
    # The trained weights are what the hub serves (not a fresh initialisation).
    saved = torch.load(result.ckpt_path, weights_only=True)
    weights = saved["model"] if kind == "wavlm" else saved["model_weight"]
    name = "encoder.layers.0.fc1.weight"
    assert torch.equal(upstream.model.state_dict()[name], weights[name])
    assert result.num_parameters == sum(p.numel() for p in upstream.model.parameters())


def test_teachers_differ_in_what_they_learnt(trained, wav_files):
    """Same seed and data, different objectives: the hidden states are not the same."""
    import s3prl.hub

    wav = load_audio(wav_files[0])
    with torch.no_grad():
        last = {kind: s3prl.hub.hubert_local(ckpt=str(trained[kind].ckpt_path)).eval()([wav])["hidden_states"][-1]
                for kind in ("hubert", "robust_hubert")}
    assert not torch.allclose(last["hubert"], last["robust_hubert"], atol=1e-3)


@pytest.mark.parametrize("kind", ["robust_hubert", "wavlm"])
def test_same_seed_gives_the_same_checkpoint(kind, wav_files, tmp_path):
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    args = dict(steps=3, **TRAIN)
    first = tt.train_teacher(kind, wav_files, tmp_path / "a.pt", seed=5, **args)
    second = tt.train_teacher(kind, wav_files, tmp_path / "b.pt", seed=5, **args)
    other = tt.train_teacher(kind, wav_files, tmp_path / "c.pt", seed=6, **args)
    key = "model" if kind == "wavlm" else "model_weight"
    a, b, c = (torch.load(r.ckpt_path, weights_only=True)[key] for r in (first, second, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.loss_curve == second.loss_curve
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # The caller's random streams are left as they were.
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), numpy_state))


def test_robust_teacher_continues_from_a_trained_hubert(trained, wav_files, tmp_path):
    """init_from starts from the checkpoint's weights: the first step's loss is the trained model's, not a
    random one's; another architecture or a wavlm teacher is refused, naming the file."""
    hubert = trained["hubert"].ckpt_path
    args = dict(TRAIN, lr=1e-4)
    continued = tt.train_teacher("robust_hubert", wav_files, tmp_path / "r.pt", steps=2, seed=0, init_from=hubert,
                                 distort_prob=0.0, **args)
    scratch = tt.train_teacher("robust_hubert", wav_files, tmp_path / "s.pt", steps=2, seed=0, distort_prob=0.0,
                               **args)
    assert continued.loss_curve[0][1] < 0.8 * scratch.loss_curve[0][1]
    assert continued.config["init_from"]["sha256"] == file_sha256(hubert)
    with pytest.raises(ConfigError, match=f"init_from {hubert}: its encoder_layers differ"):
        tt.train_teacher("robust_hubert", wav_files, tmp_path / "x.pt", steps=1, init_from=hubert,
                         **dict(args, size={**TINY, "encoder_layers": 3}))
    with pytest.raises(ConfigError, match="not a readable wavlm_local checkpoint"):
        tt.train_teacher("wavlm", wav_files, tmp_path / "x.pt", steps=1, init_from=hubert, **args)
    wavlm = trained["wavlm"].ckpt_path
    again = tt.train_teacher("wavlm", wav_files, tmp_path / "w.pt", steps=1, seed=0, init_from=wavlm, **args)
    start, after = (torch.load(path, weights_only=True)["model"] for path in (wavlm, again.ckpt_path))
    # One step at lr 1e-4 from the trained weights (AdamW moves each by about lr), not from random ones.
    assert max((after[k].float() - start[k].float()).abs().max().item() for k in start) < 1e-2
    with pytest.raises(ConfigError, match="distort_prob"):
        tt.train_teacher("robust_hubert", wav_files, tmp_path / "x.pt", steps=1, distort_prob=1.5, **args)
    assert not (tmp_path / "x.pt").exists()


def test_bad_arguments_name_the_problem(wav_files, tmp_path):
    with pytest.raises(ConfigError, match="kind"):
        tt.train_teacher("wav2vec2", wav_files, tmp_path / "t.pt", steps=1)
    with pytest.raises(ConfigError, match="encoder_depth"):
        tt.train_teacher("hubert", wav_files, tmp_path / "t.pt", steps=1, size={"encoder_depth": 2})
    short = tmp_path / "short.wav"
    import soundfile as sf

    sf.write(short, np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="short.wav"):
        tt.train_teacher("hubert", [*wav_files[:3], short], tmp_path / "t.pt", steps=1)
    with pytest.raises(ConfigError, match="mix_gain_db"):
        tt.train_teacher("wavlm", wav_files, tmp_path / "t.pt", steps=1, mix_gain_db=(5.0, -5.0))
    assert not (tmp_path / "t.pt").exists()


def test_cli_trains_a_teacher(speech_dir, tmp_path, capsys):
    from s3prl_ekd.cli import main

    out = tmp_path / "teachers" / "hubert.pt"
    argv = ["teachers", "train", "--kind", "hubert", "--audio-dir", str(speech_dir), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--crop-seconds", "0.5", "--clusters", "10", "--quiet"]
    assert main(argv) == 0
    assert out.is_file() and tt.loss_curve_path(out).is_file()
    assert f"{out}: hubert teacher" in capsys.readouterr().out
    assert tt._gain_range("-5,5") == (-5.0, 5.0)
    with pytest.raises(argparse.ArgumentTypeError, match="LOW,HIGH"):
        tt._gain_range("5")
    argv[argv.index("--audio-dir") + 1] = str(tmp_path / "missing")
    assert main(argv) == 2
    assert "missing: audio_dir is not a directory" in capsys.readouterr().err
