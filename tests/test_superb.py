"""superb: recipe configs, metric parsing, and all four tasks through run_downstream.py with fbank."""

from __future__ import annotations

import json
from pathlib import Path

import editdistance
import pytest
import yaml

from s3prl_ekd.demo.corpus import synthesize_corpus
from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.resources import recipe_file
from s3prl_ekd.plugin.runner import installed_s3prl_dir
from s3prl_ekd.recipes import superb
from s3prl_ekd.recipes.prepare import TASKS, prepare_all


def superb_run(upstream, ckpt, data, tasks="er", profile="cpu-small", out=None, lr_grid=None, **options):
    """run_superb with the upstream as one value and everything else as its options object."""
    if isinstance(lr_grid, list):
        lr_grid = {task: lr_grid for task in superb.parse_tasks(tasks)}
    opts = superb.SuperbOptions(data, out, tasks, profile, lr_grid=lr_grid or {}, progress=False, **options)
    return superb.run_superb(superb.Upstream(upstream, str(ckpt) if ckpt else None), opts)


def test_every_recipe_profile_is_complete():
    for task in TASKS:
        for profile in superb.PROFILES:
            config = superb.load_recipe(task, profile)
            assert {"runner", "optimizer", "downstream_expert"} <= set(config), (task, profile)
            assert config["runner"]["total_steps"] % config["runner"]["eval_step"] == 0
            assert "base" not in config
    small = yaml.safe_load(recipe_file("asr", "cpu-small.yaml").read_text())
    paper = yaml.safe_load(recipe_file("asr", "superb.yaml").read_text())
    assert paper["downstream_expert"]["modelrc"]["RNNs"]["dim"] == [1024, 1024]
    assert small["runner"]["total_steps"] <= 1000 < paper["runner"]["total_steps"]


def test_cpu_converge_is_cpu_small_with_longer_pr_and_asr():
    for task in TASKS:
        small, converge = superb.load_recipe(task, "cpu-small"), superb.load_recipe(task, "cpu-converge")
        assert converge["downstream_expert"] == small["downstream_expert"]
        assert converge["optimizer"] == small["optimizer"]
        if task in ("pr", "asr"):
            assert converge["runner"]["total_steps"] >= 4 * small["runner"]["total_steps"]
            assert converge["runner"]["eval_step"] == converge["runner"]["save_step"] == 150
        else:  # SID and ER already train until dev stops improving
            assert converge == small


def test_recipe_config_takes_prepared_paths_and_steps():
    prepared = {"config": {"downstream_expert": {"datarc": {"file_path": "/data/sid", "meta_data": "/m.txt"}}}}
    config = superb.recipe_config("sid", "cpu-small", prepared, steps=6)
    datarc = config["downstream_expert"]["datarc"]
    assert (datarc["file_path"], datarc["meta_data"], datarc["max_timestep"]) == ("/data/sid", "/m.txt", 128000)
    assert (config["runner"]["total_steps"], config["runner"]["eval_step"]) == (6, 3)
    assert superb.recipe_config("sid", "superb", prepared)["runner"]["total_steps"] == 200000
    with pytest.raises(ConfigError, match="--profile tiny"):
        superb.recipe_config("sid", "tiny", prepared)
    with pytest.raises(ConfigError, match="pr,asr,sid,er"):
        superb.parse_tasks("pr,kws")


def test_checkpoint_choice_falls_back_to_the_last_states(tmp_path):
    spec = superb.TASK_SPECS["sid"]
    for step in (50, 100):
        (tmp_path / f"states-{step}.ckpt").write_text("")
    assert superb.pick_checkpoint(tmp_path, spec).name == "states-100.ckpt"
    (tmp_path / "dev-best.ckpt").write_text("")
    assert superb.pick_checkpoint(tmp_path, spec).name == "dev-best.ckpt"
    assert superb.TASK_SPECS["asr"].best_checkpoint == "dev-clean-best.ckpt"


def test_missing_prepare_output_is_reported_before_training(tmp_path):
    with pytest.raises(UserError, match="run `s3prl-ekd prepare er"):
        superb_run("fbank", None, tmp_path, "er", out=tmp_path / "r")


def ark(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict((line.split(" ", 1) + [""])[:2] for line in lines)


def test_four_tasks_train_and_test_with_fbank(tmp_path):
    manifest = synthesize_corpus(tmp_path / "corpus", utterances=40, speakers=4, seed=0)
    prepare_all(manifest, tmp_path / "data")
    out = tmp_path / "results"
    results = superb_run("fbank", None, tmp_path / "data", "pr,sid,er,asr", "cpu-small",
                                out, steps=4, jobs=2)

    saved = json.loads((out / "results.json").read_text())
    assert saved == results and saved["upstream"] == "fbank"
    assert list(saved["tasks"]) == list(saved["runs"]) == ["pr", "sid", "er", "asr"]  # asked order, not finish order
    assert {t: list(m) for t, m in saved["tasks"].items()} == {
        "pr": ["per"], "sid": ["acc"], "er": ["acc"], "asr": ["wer"]}

    # Each metric equals what s3prl's own prediction files say, in percent.
    def error_rate(hyp: dict, ref: dict, split) -> float:
        errors = sum(editdistance.eval(split(hyp[k]), split(ref[k])) for k in ref)
        return 100 * errors / sum(len(split(r)) for r in ref.values())

    def accuracy(predicted: dict, truth: dict) -> float:
        return 100 * sum(predicted[k] == truth[k] for k in truth) / len(truth)

    per = error_rate(ark(out / "pr/train/test-hyp.ark"), ark(out / "pr/train/test-ref.ark"), lambda t: t.split(" "))
    assert saved["tasks"]["pr"]["per"] == pytest.approx(per, abs=1e-3)
    truth = ark(out / "sid/train/test_truth.txt")
    assert len(truth) == 4
    acc = accuracy(ark(out / "sid/train/test_predict.txt"), truth)
    assert saved["tasks"]["sid"]["acc"] == pytest.approx(acc, abs=1e-3)
    acc = accuracy(ark(out / "er/fold1/train/test_fold1_predict.txt"), ark(out / "er/fold1/train/test_fold1_truth.txt"))
    assert saved["tasks"]["er"]["acc"] == pytest.approx(acc, abs=1e-3)
    wer = error_rate(ark(out / "asr/train/test-clean-noLM-hyp.ark"), ark(out / "asr/train/test-clean-noLM-ref.ark"),
                     str.split)
    assert saved["tasks"]["asr"]["wer"] == pytest.approx(wer, abs=1e-3)

    for task, run in saved["runs"].items():
        assert run["steps"] == [4] and run["max_steps"] == 4 and run["best_step"][0] in (2, 4)  # evaluated at 2, 4
        train, test = run["commands"]
        assert "-m train -u fbank" in train and f"-c {out / task}/" in train
        assert "-m evaluate -e" in test
    assert "-t test-clean" in saved["runs"]["asr"]["commands"][1]
    assert "| pr | per" in (out / "results.md").read_text()
    assert not (installed_s3prl_dir() / "downstream" / "voxceleb1" / ".cache").exists()

    # An identical request is answered from disk, without training again.
    stamp = (out / "pr" / superb.RESULT_NAME).stat().st_mtime_ns
    again = superb_run("fbank", None, tmp_path / "data", "pr", "cpu-small", out, steps=4)
    assert again["tasks"]["pr"] == saved["tasks"]["pr"]
    assert (out / "pr" / superb.RESULT_NAME).stat().st_mtime_ns == stamp

    # Tasks run side by side (jobs=2 above) give the numbers they give one after another.
    serial = superb_run("fbank", None, tmp_path / "data", "er,sid", "cpu-small", tmp_path / "serial",
                               steps=4, jobs=1)
    assert serial["tasks"] == {"er": saved["tasks"]["er"], "sid": saved["tasks"]["sid"]}


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--jobs 0"):
        superb_run("fbank", None, tmp_path, "er", out=tmp_path / "r", jobs=0)


@pytest.mark.slow
@pytest.mark.parametrize("upstream", ["hubert_local", "ekd_distiller"])
def test_checkpoint_upstreams_go_through_k(upstream, tmp_path, request):
    if upstream == "hubert_local":
        ckpt = request.getfixturevalue("tiny_teachers")["hubert_a"]
    else:
        ckpt = request.getfixturevalue("ekd_checkpoints")["layerwise_average"]
    manifest = synthesize_corpus(tmp_path / "corpus", utterances=40, speakers=4, seed=0)
    prepare_all(manifest, tmp_path / "data")
    results = superb_run(upstream, ckpt, tmp_path / "data", "sid,pr", "cpu-small",
                                tmp_path / "r", steps=4)
    assert 0 <= results["tasks"]["sid"]["acc"] <= 100 and results["tasks"]["pr"]["per"] >= 0
    assert f"-u {upstream} -d voxceleb1" in results["runs"]["sid"]["commands"][0]
    assert f"-k {ckpt}" in results["runs"]["sid"]["commands"][0]


def test_lr_grid_picks_on_dev_and_noisy_pr_is_scored(tmp_path):
    manifest = synthesize_corpus(tmp_path / "corpus", utterances=40, speakers=4, seed=0)
    reports = prepare_all(manifest, tmp_path / "data", noisy_snr_db=5.0)
    assert "test_noisy" in " ".join(reports["pr"].notes)
    results = superb_run("fbank", None, tmp_path / "data", "pr", "cpu-small", tmp_path / "r", steps=4,
                         lr_grid=[1e-2, 1e-4], early_stop=3, memoize_gib=1.0)
    run = results["runs"]["pr"]["runs"]["pr"]
    assert set(run["dev"]) == {"0.01", "0.0001"}
    assert run["lr"] == float(min(run["dev"], key=run["dev"].get))  # PER: the lowest dev error wins
    assert results["runs"]["pr"]["lr"] == [run["lr"]]
    assert run["checkpoint"].startswith(str(tmp_path / "r" / "pr" / f"lr{run['lr']:g}"))
    test_utterances = {r["id"] for r in map(json.loads, manifest.read_text().splitlines()) if r["split"] == "test"}
    assert len(run["scores"]) == len(run["noisy"]["scores"]) == len(test_utterances)
    assert results["tasks"]["pr_noisy"]["per"] == run["noisy"]["value"]
    from s3prl_ekd.recipes.scores import percent

    assert run["noisy"]["value"] == pytest.approx(percent(run["noisy"]["scores"]), abs=1e-3)

    # Every run in this process, one after another, sharing memoised states: the same numbers.
    here = superb_run("fbank", None, tmp_path / "data", "pr", "cpu-small", tmp_path / "here", steps=4,
                             lr_grid=[1e-2, 1e-4], early_stop=3, memoize_gib=1.0, in_process=True)
    assert here["tasks"] == results["tasks"]
    assert here["runs"]["pr"]["runs"]["pr"]["scores"] == run["scores"]


def test_lr_grid_per_task(tmp_path):
    """A grid for one task sweeps that task only; the others keep their recipe's rate."""
    assert superb.parse_lr_grid(["1e-3,1e-2", "asr=1e-3"], "pr,asr") == {"pr": [1e-3, 1e-2], "asr": [1e-3]}
    manifest = synthesize_corpus(tmp_path / "corpus", utterances=40, speakers=4, seed=0)
    prepare_all(manifest, tmp_path / "data")
    with pytest.raises(ConfigError, match="--lr-grid: unknown task"):
        superb_run("fbank", None, tmp_path / "data", "er", "cpu-small", tmp_path / "bad", steps=2,
                          lr_grid={"wer": [1e-3]})
    results = superb_run("fbank", None, tmp_path / "data", "er,sid", "cpu-small", tmp_path / "r", steps=2,
                  lr_grid={"sid": [1e-4, 1e-2]}, in_process=True)
    recipe_lr = yaml.safe_load(recipe_file("er", "cpu-small.yaml").read_text())["optimizer"]["lr"]
    assert list(results["runs"]["er"]["runs"]["fold1"]["dev"]) == [f"{recipe_lr:g}"]
    assert list(results["runs"]["sid"]["runs"]["sid"]["dev"]) == ["0.0001", "0.01"]


def test_demo_stage_rerun_on_recipe_change(tmp_path, monkeypatch):
    """The demo's superb stage is run_superb's own per-task key: editing a recipe YAML reruns the task
    (and an unchanged one is answered from disk)."""
    import yaml as yaml_module

    manifest = synthesize_corpus(tmp_path / "corpus", utterances=40, speakers=4, seed=0)
    prepare_all(manifest, tmp_path / "data")
    first = superb_run("fbank", None, tmp_path / "data", "er", "cpu-small", tmp_path / "r", steps=2,
                              in_process=True)
    result = tmp_path / "r" / "er" / superb.RESULT_NAME
    stamp = result.stat().st_mtime_ns
    superb_run("fbank", None, tmp_path / "data", "er", "cpu-small", tmp_path / "r", steps=2,
                       in_process=True)
    assert result.stat().st_mtime_ns == stamp
    edited = tmp_path / "er-edited.yaml"
    recipe = yaml_module.safe_load(recipe_file("er", "cpu-small.yaml").read_text())
    recipe["optimizer"]["lr"] = 5e-3
    edited.write_text(yaml_module.safe_dump(recipe))
    monkeypatch.setattr(superb, "recipe_file", lambda task, name: edited)
    second = superb_run("fbank", None, tmp_path / "data", "er", "cpu-small", tmp_path / "r", steps=2,
                               in_process=True)
    assert result.stat().st_mtime_ns != stamp
    assert first["runs"]["er"]["lr"] == [1e-3] and second["runs"]["er"]["lr"] == [5e-3]


def test_another_upstreams_results_are_never_replaced(tmp_path):
    """An --out holding fbank's results refuses mfcc's; with --force fbank's move to previous-1/."""
    manifest = synthesize_corpus(tmp_path / "corpus", utterances=40, speakers=4, seed=0, progress=False)
    prepare_all(manifest, tmp_path / "data")
    out = tmp_path / "r"
    first = superb_run("fbank", None, tmp_path / "data", "er", "cpu-small", out, steps=2, in_process=True)
    saved = (out / "results.json").read_text()
    with pytest.raises(UserError, match=r"holds the results of another upstream, fbank; choose another --out"):
        superb_run("mfcc", None, tmp_path / "data", "er", "cpu-small", out, steps=2, in_process=True)
    assert (out / "results.json").read_text() == saved
    second = superb_run("mfcc", None, tmp_path / "data", "er", "cpu-small", out, steps=2, in_process=True,
                        force=True)
    assert first["upstream"] == "fbank" and second["upstream"] == "mfcc"
    assert (out / "previous-1" / "results.json").read_text() == saved
    assert (out / "previous-1" / "er" / superb.RESULT_NAME).is_file()
    assert json.loads((out / "results.json").read_text())["upstream"] == "mfcc"
