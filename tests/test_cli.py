"""selfkd-train: settings, flags, flagfiles, run directories and bad input."""

import csv
import dataclasses
import json
import os
import types

import pytest
from absl import flags

from cli_support import CONFIGS, last_line, run_cli, write_npz
from selfkd_tf import experiment
from selfkd_tf.cli import flags as train_flags
from selfkd_tf.experiment import SettingsError, TrainSettings

TINY = dict(arch="resnet18", width_multiplier=0.0625, num_stages=2, image_size=16,
            batch_size=32, epochs=1, lr=0.05, lr_schedule="constant")


def _parse(*argv) -> TrainSettings:
    flag_values = flags.FlagValues()
    train_flags.define_train_flags(flag_values)
    flag_values(["selfkd-train", *argv])
    return train_flags.settings_from_flags(flag_values)


def test_settings_round_trip_through_json():
    settings = TrainSettings(dataset="npz:/x.npz", methods=("byot",), byot_exits=(1, 2),
                             model_dir="/runs/a")
    assert TrainSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    with pytest.raises(SettingsError, match="unknown settings"):
        TrainSettings.from_json({"arch": "resnet18", "depth": 3})


@pytest.mark.parametrize("change, flag, allowed", [
    (dict(arch="resnet19"), "arch", "resnet18"),
    (dict(methods=("pskd", "kd")), "methods", "pskd, byot, dmfl"),
    (dict(num_stages=3, byot_exits=(3,)), "byot_exits", "1..2"),
    (dict(num_stages=5), "num_stages", "2, 3, 4"),
    (dict(epochs=-1), "epochs", ">= 1"),
    (dict(batch_size=0), "batch_size", ">= 1"),
    (dict(exit_head="dense"), "exit_head", "bottleneck"),
    (dict(lr_schedule="step"), "lr_schedule", "multistep"),
    (dict(distribute="tpu"), "distribute", "mirrored"),
    (dict(mixed_precision="fp8"), "mixed_precision", "bfloat16"),
    (dict(dataset=""), "dataset", "folder:PATH"),
    (dict(pskd_alpha=2.0), "pskd_alpha", "[0, 1]"),
])
def test_validate_names_the_flag_and_the_allowed_values(change, flag, allowed):
    with pytest.raises(SettingsError) as error:
        dataclasses.replace(TrainSettings(), **change).validate()
    assert error.value.flag == flag
    assert allowed in error.value.problem
    assert "\n" not in str(error.value)


def test_every_setting_is_a_flag_with_its_default():
    assert _parse() == TrainSettings()
    settings = _parse("--methods=", "--byot_exits=2,1", "--epochs=7", "--noaugment",
                      "--exit_head=attention", "--width_multiplier=0.5")
    assert settings.methods == ()
    assert settings.byot_exits == (2, 1)
    assert (settings.epochs, settings.augment) == (7, False)
    assert (settings.exit_head, settings.width_multiplier) == ("attention", 0.5)
    with pytest.raises(SettingsError, match="byot_exits"):
        _parse("--byot_exits=1,x")


TRAIN_CONFIGS = ("cifar100_resnet18.flags", "cifar100_resnet50.flags",
                 "cifar100_resnext50.flags", "smoke.flags", "cifar10_cpu.flags")


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_flagfiles_parse_to_valid_settings(config):
    settings = _parse(f"--flagfile={CONFIGS / config}", "--dataset=npz:/data.npz")
    settings.validate()
    if config.startswith("cifar100_"):
        assert (settings.epochs, settings.batch_size, settings.lr) == (300, 128, 0.1)
        assert (settings.lr_schedule, settings.nesterov, settings.weight_decay) == (
            "multistep", True, 5e-4)
        assert settings.methods == ("pskd", "byot", "dmfl")
        assert _parse(f"--flagfile={CONFIGS / config}", "--methods=").methods == ()
    # Data-less configs make the user name the data: no surprise downloads.
    if config in ("smoke.flags", "cifar10_cpu.flags"):
        with pytest.raises(SettingsError, match="dataset"):
            _parse(f"--flagfile={CONFIGS / config}").validate()


def test_replicas_must_divide_the_batch():
    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(SettingsError, match="divisible by the 2 replicas") as error:
        experiment.check_replicas(TrainSettings(batch_size=33), two_replicas)
    assert error.value.flag == "batch_size"


def test_bad_data_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    settings = TrainSettings(dataset=f"npz:{tmp_path / 'missing.npz'}",
                             model_dir=str(run_dir), **TINY)
    with pytest.raises(SettingsError) as error:
        experiment.train(settings)
    assert error.value.flag == "dataset" and "does not exist" in error.value.problem
    assert not run_dir.exists()


def test_train_writes_a_run_and_never_overwrites_it_silently(tmp_path):
    dataset = write_npz(tmp_path / "tiny.npz")
    run_dir = tmp_path / "run"
    result = run_cli(
        "selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
        f"--dataset={dataset}", f"--model_dir={run_dir}", "--save_every_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(run_dir)) == sorted(experiment.RUN_FILES)

    # The one-line epoch summaries and the final table.
    summaries = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(summaries) == 2
    assert "val acc exit1" in summaries[-1] and "ensemble" in summaries[-1]
    assert "byot" in summaries[-1] and "alpha_t 0.8" in summaries[-1]
    assert last_line(result.stdout).startswith("ensemble")

    flags_json = json.loads((run_dir / "flags.json").read_text())
    assert flags_json["dataset"] == dataset and flags_json["epochs"] == 2
    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [row["epoch"] for row in history] == ["0", "1"]
    assert all(float(row["epoch_time_s"]) > 0 for row in history)
    assert {"loss", "ce", "byot", "dmfl", "lr", "alpha_t", "exit1_accuracy",
            "val_exit2_accuracy", "val_ensemble_accuracy"} <= set(history[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["num_exits"], metrics["epochs"], metrics["split"]) == (2, 2, "test")
    assert metrics["methods"] == ["pskd", "byot", "dmfl"]
    assert metrics["train_time_s"] > 0 and metrics["params"] > 0
    assert [e["exit"] for e in metrics["exits"]] == [1, 2]
    events = [f for _, _, files in os.walk(run_dir / "tensorboard") for f in files]
    assert any(f.startswith("events.out.tfevents") for f in events)

    # Rerunning the finished run returns its metrics, untouched.
    settings = TrainSettings.from_json(flags_json)
    mtime = os.path.getmtime(run_dir / "metrics.json")
    assert experiment.train(settings) == metrics
    assert os.path.getmtime(run_dir / "metrics.json") == mtime
    # Settings that change the result are refused, naming the differences.
    with pytest.raises(SettingsError) as error:
        experiment.train(dataclasses.replace(settings, arch="resnet34", lr=0.1))
    assert error.value.flag == "model_dir"
    assert "--arch: 'resnet18' -> 'resnet34'" in error.value.problem
    assert "--lr" in error.value.problem and "--overwrite" in error.value.problem
    assert json.loads((run_dir / "flags.json").read_text()) == flags_json
    # Files of a run without its flags.json are not adopted either.
    (run_dir / "flags.json").unlink()
    with pytest.raises(SettingsError, match="no flags.json"):
        experiment.train(settings)


def test_bad_flag_is_one_error_line_and_exit_status_2(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("selfkd_tf.cli.train", "--arch=resnet19", "--dataset=npz:/x.npz",
                     f"--model_dir={run_dir}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "FATAL" not in result.stderr
    assert last_line(result.stderr).startswith(
        "selfkd-train: error: --arch: got 'resnet19'; allowed: resnet18, resnet34")
    assert not run_dir.exists()
