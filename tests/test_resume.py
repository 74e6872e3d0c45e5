"""Crash-safe resume: SIGKILL mid-epoch, rerun, and get the uninterrupted result."""

import csv
import dataclasses
import json
import os
import re
import subprocess

import keras
import numpy as np
import pytest

from selfkd_tf.experiment import checkpointing
from selfkd_tf.experiment import resume
from selfkd_tf.experiment import training as experiment
from selfkd_tf.experiment.builders import build_datasets, build_model, compile_model
from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.errors import SettingsError
from support import (
    CONFIGS,
    REPO,
    command,
    environment,
    kill_at_checkpoint,
    last_line,
    run_cli,
    snapshot,
    write_image,
    write_learnable_npz,
)

STEPS_PER_EPOCH = 4  # 64 training examples in batches of 16


def _train_args(dataset, run_dir, *extra):
    return ["selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
            f"--dataset={dataset}", f"--model_dir={run_dir}", "--epochs=2",
            "--batch_size=16", "--save_every_steps=1", *extra]


def _is_mid_epoch_2(number) -> bool:
    return number is not None and number > STEPS_PER_EPOCH and number % STEPS_PER_EPOCH


def _history(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    dataset = write_learnable_npz(tmp_path / "data.npz")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # Both start together: under --deterministic neither affects the other.
    with open(tmp_path / "reference.log", "w") as reference_log:
        uninterrupted = subprocess.Popen(
            command(*_train_args(dataset, reference, "--deterministic")), cwd=REPO,
            env=environment(), stdout=reference_log, stderr=subprocess.STDOUT)
        try:
            victim = subprocess.Popen(
                command(*_train_args(dataset, killed, "--deterministic")), cwd=REPO,
                env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                number = kill_at_checkpoint(victim, killed / "checkpoints",
                                            _is_mid_epoch_2, timeout=240)
            finally:
                victim.kill()
            epoch, step = divmod(number, STEPS_PER_EPOCH)
            position = checkpointing.read_position(str(killed / "checkpoints"))
            assert (position.epoch, position.step) == (epoch, step)
            assert position.train_time_s > 0
            assert not (killed / "model.keras").exists()

            resumed = run_cli(*_train_args(dataset, killed, "--deterministic"))
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert f"Resuming {killed} at epoch {epoch + 1}, step {step} of 4." in resumed.stdout
            uninterrupted.wait(timeout=300)
        finally:
            uninterrupted.kill()
    assert uninterrupted.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]

    # Same epochs, logged once each, with the same values.
    assert [r["epoch"] for r in _history(killed)] == ["1", "2"]
    for a, b in zip(_history(reference), _history(killed)):
        for key in ("loss", "ce", "byot", "dmfl", "alpha_t", "val_exit2_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key
    assert json.loads((killed / "metrics.json").read_text())["epochs"] == 2

    a = keras.saving.load_model(reference / "model.keras", compile=False)
    b = keras.saving.load_model(killed / "model.keras", compile=False)
    np.testing.assert_array_equal(b.soft_target_valid.numpy(), np.ones(64))
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wb.numpy(), wa.numpy(), rtol=0, atol=1e-7,
                                   err_msg=wa.path)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    dataset = write_learnable_npz(tmp_path / "data.npz")
    run_dir = tmp_path / "run"
    result = run_cli(*_train_args(dataset, run_dir, "--lr=1e30"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = last_line(result.stderr)
    match = re.fullmatch(
        r"selfkd-train: error: the loss became NaN or infinite at epoch 1, step (\d+); "
        r"training stopped and the last good checkpoint \(epoch 1, step (\d+)\) is kept "
        r"in (.+)", message)
    assert match, message
    assert int(match[2]) == int(match[1]) - 1
    assert not (run_dir / "model.keras").exists()
    assert not (run_dir / "metrics.json").exists()
    # The kept checkpoint loads into a fresh model, with finite weights.
    settings = TrainSettings.from_json(
        json.loads((run_dir / "flags.json").read_text()))
    _, _, info = build_datasets(settings)
    model = build_model(settings, info)
    compile_model(model, settings, info.steps_per_epoch)
    model.optimizer.build(model.trainable_variables)
    position = checkpointing.TrainingCheckpoint(model, match[3]).restore_latest()
    assert (position.epoch, position.step) == (0, int(match[2]))
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)


def test_history_keeps_only_the_epochs_before_the_resumed_one(tmp_path):
    path = tmp_path / "history.csv"
    # A kill can leave the row of an epoch whose checkpoint was not written,
    # or half a row.
    # Rows number epochs from 1; resuming the 0-based epoch 2 (the third)
    # keeps the rows of the first two.
    path.write_text("epoch,loss\n1,2.5\n2,2.0\n3,1.5\n4,1.")
    resume.truncate_history(str(path), 2)
    assert path.read_text().splitlines() == ["epoch,loss", "1,2.5", "2,2.0"]
    resume.truncate_history(str(path), 0)
    assert not path.exists()


def _folder_dataset(root, counts):
    """``folder:`` data: ``counts[c]`` 8x8 training PNGs for class ``c``."""
    rng = np.random.default_rng(len(counts))
    for split, per_class in (("train", counts), ("test", {c: 1 for c in counts})):
        for name, count in per_class.items():
            for i in range(count):
                image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                write_image(os.path.join(root, split, name, f"{i}.png"), image)
    return f"folder:{root}"


def _unfinished_run(tmp_path, dataset):
    """A run whose training ended but which has not saved and evaluated yet."""
    settings = TrainSettings(
        dataset=dataset, arch="resnet18", width_multiplier=0.0625, num_stages=2,
        epochs=1, batch_size=4, methods=("pskd", "byot"), model_dir=str(tmp_path / "run"))
    experiment.train(settings)
    for name in ("metrics.json", "model.keras"):
        os.remove(tmp_path / "run" / name)
    return settings


def test_resuming_on_changed_data_says_what_differs_and_writes_nothing(tmp_path):
    root = tmp_path / "data"
    settings = _unfinished_run(tmp_path, _folder_dataset(root, {"a": 4, "b": 4}))
    run_dir = settings.model_dir
    before = snapshot(run_dir)
    # The reported case, as a command: one image added to a class folder.
    _folder_dataset(root, {"a": 5, "b": 4})
    args = ["selfkd_tf.cli.train", f"--dataset={settings.dataset}", f"--model_dir={run_dir}",
            "--arch=resnet18", "--width_multiplier=0.0625", "--num_stages=2",
            "--epochs=1", "--batch_size=4", "--methods=pskd,byot"]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert last_line(result.stderr) == (
        f"selfkd-train: error: --model_dir: {run_dir} holds a run trained on other "
        "data (training examples 8 -> 9; pixel mean/std (the images changed)); rerun "
        "on the same data to resume it, choose another --model_dir, or pass "
        "--overwrite to start it afresh")
    assert snapshot(run_dir) == before

    # Another class count.
    _folder_dataset(root, {"a": 5, "b": 4, "c": 1})
    with pytest.raises(SettingsError, match=r"classes 2 -> 3") as raised:
        experiment.train(settings)
    assert "\n" not in str(raised.value)
    # A run directory written before data.json existed: the checkpoint's
    # shapes tell.
    os.remove(os.path.join(run_dir, "data.json"))
    before = snapshot(run_dir)
    with pytest.raises(SettingsError) as raised:
        experiment.train(settings)
    assert re.search(r"cannot resume .*: training examples 8 -> 10, classes 2 -> 3 "
                     r"\(\d+ values differ in shape", str(raised.value)), raised.value
    assert "\n" not in str(raised.value)
    assert snapshot(run_dir) == before

    # The same data again resumes: the run is saved and evaluated.
    _folder_dataset(root, {"a": 4, "b": 4})
    os.remove(root / "train" / "a" / "4.png")
    os.remove(root / "train" / "c" / "0.png")
    os.rmdir(root / "train" / "c")
    os.remove(root / "test" / "c" / "0.png")
    os.rmdir(root / "test" / "c")
    record = experiment.train(settings)
    assert record["num_examples"] == 2


def test_more_examples_than_the_split_holds_is_the_same_run_only_if_it_used_them_all(tmp_path):
    """``flags.json`` records the number of examples used (the whole split when
    more were asked for), so asking again for more resumes only a run that
    used the whole split."""
    dataset = write_learnable_npz(tmp_path / "data.npz", n_train=16, n_test=8, size=8)
    settings = TrainSettings(
        dataset=dataset, arch="resnet18", width_multiplier=0.0625, num_stages=2,
        epochs=1, batch_size=8, methods=("pskd",), train_examples=12,
        model_dir=str(tmp_path / "run"))
    experiment.train(settings)
    before = snapshot(settings.model_dir)
    with pytest.raises(SettingsError) as raised:
        experiment.train(dataclasses.replace(settings, train_examples=1000))
    assert raised.value.flag == "model_dir"
    assert "(--train_examples: 12 -> 1000)" in raised.value.problem
    assert snapshot(settings.model_dir) == before
