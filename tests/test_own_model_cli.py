"""Your own model from the command line: a keras.applications network trained
(killed and resumed), evaluated with early exits and exported as a cascade;
its stages listed; its bad flags refused in one line."""

import json
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from support import CONFIGS
from support import command
from support import environment
from support import kill_at_checkpoint
from support import last_line
from support import run_cli
from support import write_learnable_npz

ARCH = "keras.applications.MobileNetV3Small"
STEPS_PER_EPOCH = 2  # 32 training examples in batches of 16


def _train_args(dataset, run_dir, *extra):
    return ["selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
            f"--dataset={dataset}", f"--model_dir={run_dir}", f"--arch={ARCH}",
            "--width_multiplier=1", "--num_stages=4",  # the smoke config's are ResNets'
            "--exit_head=pooled", "--image_size=32", "--train_examples=32",
            "--eval_examples=16", "--epochs=2", "--batch_size=16", "--save_every_steps=1",
            *extra]


def test_an_application_trains_resumes_evaluates_and_exports_a_cascade(tmp_path):
    dataset = write_learnable_npz(tmp_path / "data.npz", n_train=32, n_test=16, size=32)
    run_dir = tmp_path / "run"
    victim = subprocess.Popen(command(*_train_args(dataset, run_dir)), env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        number = kill_at_checkpoint(
            victim, run_dir / "checkpoints",
            lambda n: n is not None and n > STEPS_PER_EPOCH, timeout=240)
    finally:
        victim.kill()
    assert not (run_dir / "model.keras").exists()
    resumed = run_cli(*_train_args(dataset, run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch, step = divmod(number, STEPS_PER_EPOCH)
    assert f"Resuming {run_dir} at epoch {epoch + 1}, step {step} of 2." in resumed.stdout
    # What the user wrote, never the layer names this process numbered.
    settings = json.loads((run_dir / "flags.json").read_text())
    assert (settings["arch"], settings["exits"], settings["normalization"]) == \
        (ARCH, "auto", "auto")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["exits"]) == 4 and "ensemble" in metrics

    curve_dir = tmp_path / "curve"
    evaluated = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}", "--early_exit",
                        "--split=test", "--latency_examples=0", "--thresholds=0,0.5,1.01",
                        f"--out={curve_dir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    curve = json.loads((curve_dir / "early_exit.json").read_text())
    flops = [e["flops"] for e in curve["exits"]]
    assert len(flops) == 4 and flops == sorted(flops) and flops[0] > 0
    assert curve["cascade"][-1]["accuracy"] == pytest.approx(curve["exits"][-1]["accuracy"])

    export_dir = tmp_path / "cascade"
    exported = run_cli("selfkd_tf.cli.export", f"--model={run_dir}", f"--out={export_dir}",
                       "--exit=cascade", "--threshold=0.5")
    assert exported.returncode == 0, exported.stderr[-3000:]
    served = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    pixels = np.load(tmp_path / "data.npz")["x_test"][:3].astype("float32")
    answer = {k: v.numpy() for k, v in served(tf.constant(pixels)).items()}
    assert answer["probabilities"].shape == (3, 4)
    np.testing.assert_allclose(answer["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert set(answer["exit_ids"].tolist()) <= {1, 2, 3, 4}


def test_list_stages_prints_the_stages_and_writes_nothing(tmp_path):
    dataset = write_learnable_npz(tmp_path / "data.npz", n_train=32, n_test=16, size=32)
    result = run_cli(*_train_args(dataset, tmp_path / "run", "--list_stages",
                                  "--exits=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (f"Stages of {ARCH} on 32x32x3 images (* = an exit with "
                        "--exits=2):")
    rows = [line for line in lines[2:] if line.strip()]
    assert [row.split()[-1] for row in rows] == ["2", "4", "8", "16", "32"]
    assert [row.startswith("*") for row in rows] == [False, False, False, True, True]
    assert "(the deepest exit)" in rows[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, message", [
    ("--exits=nowhere", "--exits: the backbone has no layer or tensor 'nowhere'"),
    ("--exits=9", "--exits: 9 exits need 8 stages before the deepest exit"),
    ("--arch=keras.applications.NoSuchNet", "--arch: "),
    ("--backbone_weights=/no/such.weights.h5", "--backbone_weights: "),
    ("--normalization=dataset", "--normalization: "),
    ("--width_multiplier=0.25", "--width_multiplier: got 0.25; it shapes the ResNets only; "
                                f"for {ARCH} use the backbone's own"),
])
def test_bad_model_flags_are_one_line_and_write_nothing(tmp_path, flag, message):
    dataset = write_learnable_npz(tmp_path / "data.npz", n_train=32, n_test=16, size=32)
    result = run_cli(*_train_args(dataset, tmp_path / "run", flag))
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result.stderr).startswith(f"selfkd-train: error: {message}")
    assert not (tmp_path / "run").exists()
