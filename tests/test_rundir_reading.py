"""Hostile or damaged run directories and model files: one line, no code run, no write outside.

Each case tampers with a copy of a real run directory, then asks to resume
or load it: the answer is a `SettingsError` (exit status 2 on the command
line) whose message is one line, the run directory is byte-for-byte as it
was, and files outside it are untouched.
"""

import dataclasses
import json
import os
import shutil
import subprocess

import keras
import pytest

from selfkd_tf.experiment import training as experiment
from selfkd_tf.rundir import reading as run_directory
from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distillation.model import SelfKDModel
from selfkd_tf.experiment.trained import load_trained_model
from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.errors import SettingsError
from support import (
    REPO, command, environment, last_line, snapshot, tiny_backbone, write_learnable_npz)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished run and its settings."""
    root = tmp_path_factory.mktemp("finished")
    settings = TrainSettings(
        dataset=write_learnable_npz(root / "data.npz", n_train=16, n_test=8, size=8),
        arch="resnet18", width_multiplier=0.0625, num_stages=2, epochs=1,
        batch_size=8, methods=("pskd",), model_dir=str(root / "run"))
    experiment.train(settings)
    return settings


@pytest.fixture
def resumable(finished_run, tmp_path):
    """A copy of the run that has trained but not saved and evaluated yet."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.model_dir, run_dir, symlinks=True)
    for name in ("metrics.json", "model.keras"):
        os.remove(run_dir / name)
    return dataclasses.replace(finished_run, model_dir=str(run_dir))


def _refused(settings, pattern, *outside):
    """`train(settings)` refuses with one line matching ``pattern``, writing nothing."""
    before = snapshot(settings.model_dir, *outside)
    with pytest.raises(SettingsError, match=pattern) as raised:
        experiment.train(settings)
    assert raised.value.flag == "model_dir"
    assert "\n" not in str(raised.value)
    assert snapshot(settings.model_dir, *outside) == before
    return str(raised.value)


def _write(path, content):
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("content, pattern", [
    (b"not json", "not valid JSON"),
    (bytes(range(256)), "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"epochs": 1, "rm -rf": 1}', r"unknown settings \['rm -rf'\]"),
    (b'{"epochs": "ten"}', r"wrong type: epochs='ten'"),
    (b'{"methods": 5}', "not iterable"),
    (b'{"epochs": 1e400}', r"wrong type: epochs=inf"),
    (b'{"epochs": -3}', r"epochs: got -3"),
    (b'{"epochs": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"dataset": "' + b"x" * (5 * 2**20) + b'"}', "larger than 4 MB"),
])
def test_malformed_flags_json_is_one_line_before_anything_is_read(tmp_path, content, pattern):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write(run_dir / "flags.json", content)
    settings = TrainSettings(dataset="npz:/nonexistent.npz",
                                        model_dir=str(run_dir))
    _refused(settings, pattern)


def test_malformed_flags_json_beside_a_model_is_refused_by_eval(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.model_dir, run_dir)
    _write(run_dir / "flags.json", b'{"batch_size": [1]}')
    with pytest.raises(SettingsError, match="wrong type: batch_size") as raised:
        load_trained_model(str(run_dir))
    assert raised.value.flag == "model" and "\n" not in str(raised.value)


@pytest.mark.parametrize("content, pattern", [
    (bytes(range(256)) * 4, "not a CSV file"),
    (b"time,loss\n1,2.0\n", "no 'epoch' column"),
    (b"epoch,loss\n1\n2,1.0\n", "line 2 has 1 fields, the header 2"),
    (b"epoch,loss\n1," + b"9" * 200_000 + b"\n", "not a CSV file"),
])
def test_garbage_history_is_one_line_and_nothing_is_written(resumable, content, pattern):
    _write(os.path.join(resumable.model_dir, "history.csv"), content)
    _refused(resumable, pattern)


def test_oversized_history_is_refused(resumable, monkeypatch):
    monkeypatch.setattr(run_directory, "HISTORY_LIMIT_BYTES", 100)
    _write(os.path.join(resumable.model_dir, "history.csv"), "epoch,loss\n" + "1,2.0\n" * 40)
    _refused(resumable, "larger than")


def _checkpoint_dir(settings):
    return os.path.join(settings.model_dir, "checkpoints")


def _latest_prefix(settings):
    import tensorflow as tf

    return tf.train.latest_checkpoint(_checkpoint_dir(settings))


def test_corrupt_checkpoint_index_is_one_line(resumable):
    _write(_latest_prefix(resumable) + ".index", bytes(range(256)) * 8)
    _refused(resumable, r"cannot resume .*unreadable checkpoint")


def test_truncated_checkpoint_data_is_one_line(resumable):
    data = _latest_prefix(resumable) + ".data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(100)
    _refused(resumable, r"cannot resume")


@pytest.mark.parametrize("content", [bytes(range(256)), b"hello", b""])
def test_garbage_checkpoint_state_is_one_line(resumable, content):
    # Not taken for "no checkpoint yet", which would restart the run.
    _write(os.path.join(_checkpoint_dir(resumable), "checkpoint"), content)
    _refused(resumable, r"cannot resume .*unreadable checkpoint state")


def test_checkpoint_state_naming_missing_files_is_one_line(resumable):
    _write(os.path.join(_checkpoint_dir(resumable), "checkpoint"),
           b'model_checkpoint_path: "ckpt-999"\n')
    _refused(resumable, r"cannot resume .*unreadable checkpoint .*ckpt-999")


def test_checkpoint_state_naming_files_outside_is_refused(resumable, tmp_path):
    # The manager deletes old checkpoints named in the state: planted
    # names must never let it delete (or read) files elsewhere.
    victim = tmp_path / "victim"
    victim.mkdir()
    _write(victim / "precious.index", b"keep me")
    _write(victim / "precious.data-00000-of-00001", b"keep me")
    prefix = os.path.basename(_latest_prefix(resumable))
    _write(os.path.join(_checkpoint_dir(resumable), "checkpoint"),
           f'model_checkpoint_path: "{prefix}"\n'
           f'all_model_checkpoint_paths: "{victim / "precious"}"\n'
           f'all_model_checkpoint_paths: "../../victim/precious"\n'
           f'all_model_checkpoint_paths: "{prefix}"\n')
    message = _refused(resumable, r"names .*precious.*outside the directory", victim)
    assert "cannot resume" in message


@pytest.mark.parametrize("name, is_directory", [
    ("history.csv", False),
    ("tensorboard", True),
    ("checkpoints/ckpt-99_temp", True),
    ("data.json", False),
])
def test_links_leading_outside_are_refused(resumable, tmp_path, name, is_directory):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "target"
    if is_directory:
        target.mkdir()
        _write(target / "note", b"untouched")
    else:
        _write(target, b"untouched")
    link = os.path.join(resumable.model_dir, name)
    if os.path.isdir(link):
        shutil.rmtree(link)
    elif os.path.lexists(link):
        os.remove(link)
    os.symlink(target, link)
    _refused(resumable, r"is a symbolic link to .*outside", outside)


def test_hard_linked_history_is_refused(resumable, tmp_path):
    history = os.path.join(resumable.model_dir, "history.csv")
    os.link(history, tmp_path / "elsewhere.csv")
    _refused(resumable, "other hard link", tmp_path / "elsewhere.csv")


def test_overwrite_removes_links_without_following_them(resumable, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _write(outside / "note", b"untouched")
    shutil.rmtree(_checkpoint_dir(resumable))
    os.symlink(outside, _checkpoint_dir(resumable))
    before = snapshot(outside)
    # The earlier model's scores go with it; other files stay.
    for name in ("metrics_test.json", "metrics_train.json", "early_exit_test.png", "notes.txt"):
        _write(os.path.join(resumable.model_dir, name), b"{}")
    experiment.train(dataclasses.replace(resumable, overwrite=True))
    assert snapshot(outside) == before
    assert not os.path.islink(_checkpoint_dir(resumable))
    assert os.path.isfile(os.path.join(resumable.model_dir, "metrics.json"))
    left = set(os.listdir(resumable.model_dir))
    assert "notes.txt" in left and not left & {
        "metrics_test.json", "metrics_train.json", "early_exit_test.png"}


@pytest.mark.parametrize("content", [b"{", b'{"exits": []}', b"[]"])
def test_malformed_metrics_of_a_finished_run_is_one_line(finished_run, tmp_path, content):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.model_dir, run_dir)
    _write(run_dir / "metrics.json", content)
    _refused(dataclasses.replace(finished_run, model_dir=str(run_dir)), "metrics")


# -- .keras files holding code ---------------------------------------------


MARKER_VARIABLE = "SELFKD_TEST_MARKER"


def _model_with_code(path):
    """A SelfKDModel whose first layer is a Lambda that creates the file
    named by the environment variable `MARKER_VARIABLE`, wherever it runs."""
    backbone = tiny_backbone(4, image_size=8)
    inputs = keras.Input((8, 8, 3))
    touched = keras.layers.Lambda(lambda x: (__import__("pathlib").Path(
        __import__("os").environ["SELFKD_TEST_MARKER"]).touch(), x)[1])(inputs)
    model = SelfKDModel(keras.Model(inputs, backbone(touched)),
                        num_train_examples=16, config=SelfKDConfig(methods=()),
                        input_mean=(0.5,) * 3, input_std=(0.25,) * 3)
    model.save(path)


def test_a_keras_file_with_code_is_refused_unless_allowed(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    model = tmp_path / "model.keras"
    monkeypatch.setenv(MARKER_VARIABLE, str(tmp_path / "built"))
    _model_with_code(model)  # building it runs the code here
    monkeypatch.setenv(MARKER_VARIABLE, str(marker))
    dataset = write_learnable_npz(tmp_path / "data.npz", n_train=8, n_test=8, size=8)
    eval_args = ["selfkd_tf.cli.evaluate", f"--model={model}", f"--dataset={dataset}",
                 f"--out={tmp_path / 'eval'}"]
    runs = {
        "eval": command(*eval_args),
        "export": command("selfkd_tf.cli.export", f"--model={model}",
                          f"--out={tmp_path / 'export'}"),
    }
    processes = {
        name: subprocess.Popen(args, cwd=REPO, env=environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
        for name, args in runs.items()
    }
    for name, process in processes.items():
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2, f"{name}: {err[-3000:]}"
        assert err.count("\n") == 1, f"{name}: {err}"
        assert "refused by Keras safe mode" in last_line(err)
        assert "--unsafe_deserialization" in last_line(err)
    assert not marker.exists()
    assert not (tmp_path / "eval").exists() and not (tmp_path / "export").exists()

    # Opting in runs the file's code, as the flag's help says.
    allowed = subprocess.run(command(*eval_args, "--unsafe_deserialization"), cwd=REPO,
                             env=environment(), capture_output=True, text=True,
                             timeout=300, stdin=subprocess.DEVNULL)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert marker.exists()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_examples"] == 8
