"""Ctrl-C: one line, exit status 130, whole checkpoints, and the run resumes."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from selfkd_tf.experiment import checkpointing
from selfkd_tf.cli import program
from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.optimizers import make_optimizer
from support import (
    CONFIGS, REPO, command, environment, last_line, tiny_model, write_learnable_npz)

MESSAGE = re.compile(
    r"^selfkd-train: error: interrupted at epoch \d+ step \d+; rerun the same "
    r"command to resume \(from (the start: no checkpoint had been written|the "
    r"checkpoint at (epoch \d+, step \d+|the end of epoch \d+))\)$")


def _tiny_model():
    model = tiny_model(2, 4, image_size=8, config=SelfKDConfig(methods=("pskd",)))
    model.compile(optimizer=make_optimizer(0.1, epochs=1))
    model.optimizer.build(model.trainable_variables)
    return model


def _assert_whole(directory):
    """Every checkpoint file belongs to a listed checkpoint, and each loads."""
    state = tf.train.get_checkpoint_state(directory)
    listed = {os.path.basename(p) for p in state.all_model_checkpoint_paths}
    assert os.path.basename(state.model_checkpoint_path) in listed
    for name in os.listdir(directory):
        if name != "checkpoint":
            assert name.split(".")[0] in listed, f"stray {name} in {os.listdir(directory)}"
    for prefix in listed:
        assert tf.train.list_variables(os.path.join(directory, prefix))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_a_checkpoint_write_takes_effect_after_it(tmp_path, signum):
    checkpoint = checkpointing.TrainingCheckpoint(_tiny_model(), str(tmp_path))
    checkpoint.save(checkpointing.Position(0, 1), 1)
    save = checkpoint._manager.save

    def interrupted_save(**kwargs):
        os.kill(os.getpid(), signum)  # arrives as the write starts
        time.sleep(0.05)
        return save(**kwargs)

    checkpoint._manager.save = interrupted_save
    # The commands' SIGTERM handler (selfkd_tf.cli.program.run).
    previous = signal.signal(signal.SIGTERM, program._stop_on_sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(checkpointing.Position(0, 2), 2)
        # The handlers are the earlier ones again.
        assert signal.getsignal(signal.SIGTERM) is program._stop_on_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)
    _assert_whole(str(tmp_path))
    assert checkpointing.read_position(str(tmp_path)) == checkpointing.Position(0, 2)
    # Python's handler again: Ctrl-C outside a write raises at once.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_during_a_save_leaves_the_save_recorded(tmp_path):
    """The interruption message names the checkpoint the signal waited for."""
    model = _tiny_model()
    checkpoint = checkpointing.TrainingCheckpoint(model, str(tmp_path))
    save = checkpoint._manager.save

    def interrupted_save(**kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives as the write starts
        return save(**kwargs)

    checkpoint._manager.save = interrupted_save
    saver = checkpointing.CheckpointCallback(checkpoint, steps_per_epoch=4, save_every_steps=1)
    saver.set_model(model)
    saver.on_epoch_begin(0)
    with pytest.raises(KeyboardInterrupt):
        saver.on_train_batch_end(0, {"loss": 1.0})
    assert saver.last_saved is not None
    assert (saver.last_saved.epoch, saver.last_saved.step) == (0, 1)
    assert checkpointing.read_position(str(tmp_path)).step == 1


def _interrupt(process, run_dir, when, signum):
    """Sends ``signum`` once ``when(run_dir)`` holds; returns whether it did."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None:
        if when(run_dir):
            process.send_signal(signum)
            return True
        time.sleep(0.001)
    return False


def _checkpoints(run_dir):
    directory = os.path.join(run_dir, "checkpoints")
    return os.listdir(directory) if os.path.isdir(directory) else []


POINTS = {
    # While the first training step is traced: fit has begun (TensorBoard
    # made its folder), no checkpoint yet.
    "setup": lambda run_dir: os.path.exists(os.path.join(run_dir, "tensorboard")),
    # During a checkpoint write: TensorFlow writes into ckpt-N_temp first.
    "writing": lambda run_dir: any("_temp" in n for n in _checkpoints(run_dir)),
    # Between writes in the second epoch.
    "epoch 2": lambda run_dir: any(n.startswith("ckpt-18.") for n in _checkpoints(run_dir)),
}
# SIGTERM, as a job scheduler sends it, stops as Ctrl-C does, with exit status
# 143 (a whole run: tests/test_study.py, whose runs are stopped by SIGTERM).
POINTS["epoch 2, SIGTERM"] = POINTS.pop("epoch 2")
SIGNALS = {name: signal.SIGTERM if "SIGTERM" in name else signal.SIGINT for name in POINTS}


def test_ctrl_c_is_one_line_with_exit_130_and_the_run_resumes(tmp_path):
    dataset = write_learnable_npz(tmp_path / "data.npz", n_train=64)
    args = [f"--flagfile={CONFIGS / 'smoke.flags'}", f"--dataset={dataset}",
            "--epochs=3", "--batch_size=4", "--save_every_steps=1",
            "--train_examples=64", "--image_size=8"]
    runs = {name: str(tmp_path / name.replace(" ", "_").replace(",", "")) for name in POINTS}
    processes = {
        name: subprocess.Popen(
            command("selfkd_tf.cli.train", *args, f"--model_dir={run_dir}"),
            cwd=REPO, env=environment(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        for name, run_dir in runs.items()
    }
    sent = {}
    threads = [
        threading.Thread(target=lambda n=name: sent.__setitem__(
            n, _interrupt(processes[n], runs[n], POINTS[n], SIGNALS[n])))
        for name in POINTS
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = {}
    for name, process in processes.items():
        _, err = errors[name] = process.communicate(timeout=300)
        assert sent[name], f"{name}: the run ended before the point was reached"
        assert process.returncode == 128 + SIGNALS[name], f"{name}: {err[-3000:]}"
        assert "Traceback" not in err, f"{name}: {err[-3000:]}"
        assert MESSAGE.match(last_line(err)), f"{name}: {last_line(err)}"
        leftovers = [n for n in os.listdir(runs[name]) if n.startswith(".")]
        assert leftovers == [], f"{name}: {leftovers}"
        if _checkpoints(runs[name]):
            _assert_whole(os.path.join(runs[name], "checkpoints"))
    assert last_line(errors["setup"][1]).endswith(
        "(from the start: no checkpoint had been written)")

    # Rerunning the interrupted command finishes the run.
    result = subprocess.run(
        command("selfkd_tf.cli.train", *args, f"--model_dir={runs['writing']}"),
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" in result.stdout
    assert os.path.isfile(os.path.join(runs["writing"], "metrics.json"))


def _loading_tensorflow(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtensorflow_framework" in maps.read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see the import")
@pytest.mark.parametrize("script", ["selfkd-train", "selfkd-eval", "selfkd-export", "selfkd-tune"])
def test_ctrl_c_while_tensorflow_is_imported_is_one_line_with_exit_130(script):
    executable = os.path.join(os.path.dirname(sys.executable), script)
    process = subprocess.Popen(
        [executable, "--help"], cwd=REPO, env=environment(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (time.monotonic() < deadline and process.poll() is None
           and not _loading_tensorflow(process.pid)):
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)  # TensorFlow's libraries are loading
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert err.strip() == (
        f"{script}: error: interrupted while starting; nothing was written"), err[-3000:]
    assert out.strip() == ""
