"""Crash-safe resume: SIGKILL mid-epoch, rerun, and get the uninterrupted result."""

import csv
import json
import os
import re
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from cli_support import CONFIGS, REPO, command, environment, last_line, run_cli, write_npz
from selfkd_tf import checkpointing, experiment

STEPS_PER_EPOCH = 4  # 64 training examples in batches of 16


def _train_args(dataset, run_dir, *extra):
    return ["selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
            f"--dataset={dataset}", f"--model_dir={run_dir}", "--epochs=2",
            "--batch_size=16", "--save_every_steps=1", *extra]


def _latest_number(run_dir) -> int | None:
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return None if path is None else int(path.rsplit("-", 1)[1])


def _is_mid_epoch_2(number) -> bool:
    return number is not None and number > STEPS_PER_EPOCH and number % STEPS_PER_EPOCH


def _kill_mid_epoch(process: subprocess.Popen, run_dir) -> int:
    """SIGKILLs ``process`` once its latest checkpoint is inside epoch 2.

    Once a candidate checkpoint shows up, the process is frozen (SIGSTOP)
    and the checkpoint read again, so the position seen is the one it is
    killed at.
    """
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        if _is_mid_epoch_2(_latest_number(run_dir)):
            process.send_signal(signal.SIGSTOP)
            number = _latest_number(run_dir)
            if _is_mid_epoch_2(number):
                process.kill()
                process.wait()
                return number
            process.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    process.kill()
    raise AssertionError("no mid-epoch checkpoint appeared")


def _history(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    dataset = write_npz(tmp_path / "data.npz")
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
                number = _kill_mid_epoch(victim, killed)
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
    assert [r["epoch"] for r in _history(killed)] == ["0", "1"]
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
    dataset = write_npz(tmp_path / "data.npz")
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
    settings = experiment.TrainSettings.from_json(
        json.loads((run_dir / "flags.json").read_text()))
    _, _, info = experiment.build_datasets(settings)
    model = experiment.build_model(settings, info)
    experiment.compile_model(model, settings, info.steps_per_epoch)
    model.optimizer.build(model.trainable_variables)
    position = checkpointing.TrainingCheckpoint(model, match[3]).restore_latest()
    assert (position.epoch, position.step) == (0, int(match[2]))
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)


def test_history_keeps_only_the_epochs_before_the_resumed_one(tmp_path):
    path = tmp_path / "history.csv"
    # A kill can leave the row of an epoch whose checkpoint was not written,
    # or half a row.
    path.write_text("epoch,loss\n0,2.5\n1,2.0\n2,1.5\n3,1.")
    experiment._truncate_history(str(path), 2)
    assert path.read_text().splitlines() == ["epoch,loss", "0,2.5", "1,2.0"]
    experiment._truncate_history(str(path), 0)
    assert not path.exists()
