"""Data-parallel training gives single-replica results.

TensorFlow fixes its devices when it first uses them, so the distributed runs
happen in child processes started from this file (``python
test_distribute.py mirrored|worker ...``): one process splits its CPU into
two logical devices for `tf.distribute.MirroredStrategy`, and two processes
form a `tf.distribute.MultiWorkerMirroredStrategy` cluster on localhost.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import subprocess
import sys
import traceback

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf import losses
from selfkd_tf.distribute import make_strategy, set_mixed_precision
from selfkd_tf.models import build_multi_exit_resnet
from selfkd_tf.training import SelfKDModel, make_optimizer
from synthetic import indexed_dataset, learnable_arrays

NUM_CLASSES = 4
# 56 = 3 full global batches of 16 and a last one of 8, split 4 + 4.
NUM_EXAMPLES, GLOBAL_BATCH = 56, 16
EPOCHS = 2
# A small rate keeps the tiny network's training smooth, so float rounding
# differences between 1 and 2 replicas stay far below the tolerances.
LEARNING_RATE = 0.01
CHILD_TIMEOUT_S = 300
# A worker exits with this code when Keras's fit fails in multi-worker mode
# with the defect described in docs/multiworker.md.
KERAS_DEFECT_EXIT = 3


class KerasMultiWorkerDefect(Exception):
    """Keras 3's `fit` cannot run under MultiWorkerMirroredStrategy."""


# -- child processes --------------------------------------------------------


class _StepRecorder(keras.callbacks.Callback):
    """Per-step losses, and the PS-KD table after every epoch's refresh.

    Keras logs running means over the epoch; resetting the trackers before
    every step makes the logged loss that step's loss.
    """

    def __init__(self):
        super().__init__()
        self.losses, self.tables, self.valid = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        for metric in self.model.metrics:
            metric.reset_state()

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        # SelfKDModel.fit runs the table refresh before any other callback.
        self.tables.append(self.model.soft_target_table.numpy())
        self.valid.append(self.model.soft_target_valid.numpy())


def _selfkd_resnet(strategy: tf.distribute.Strategy) -> SelfKDModel:
    with strategy.scope():
        keras.utils.set_random_seed(0)
        backbone = build_multi_exit_resnet(
            "resnet18", NUM_CLASSES, input_shape=(16, 16, 3), num_stages=2,
            width_multiplier=0.0625, sync_batchnorm=True,
        )
        model = SelfKDModel(backbone, num_train_examples=NUM_EXAMPLES)
        model.compile(optimizer=make_optimizer(LEARNING_RATE, schedule="constant"))
    return model


def _train_with_pskd(strategy: tf.distribute.Strategy) -> dict[str, np.ndarray]:
    """All three methods, synchronized batch norm, unshuffled data."""
    images, labels = learnable_arrays(NUM_EXAMPLES, NUM_CLASSES)
    model = _selfkd_resnet(strategy)
    recorder = _StepRecorder()
    model.fit(indexed_dataset(images, labels, GLOBAL_BATCH), epochs=EPOCHS,
              verbose=0, callbacks=[recorder])
    return {
        "losses": np.array(recorder.losses),
        "tables": np.stack(recorder.tables),
        "valid": np.stack(recorder.valid),
    }


def _dense_model(strategy: tf.distribute.Strategy) -> SelfKDModel:
    """A one-exit baseline of two Dense layers: cheap to build and trace."""
    with strategy.scope():
        inputs = keras.Input((4,))
        feature = keras.layers.Dense(8, activation="relu")(inputs)
        logits = keras.layers.Dense(NUM_CLASSES, dtype="float32")(feature)
        backbone = keras.Model(inputs, {"logits": [logits], "features": [feature]})
        return SelfKDModel(
            backbone, config=losses.SelfKDConfig(methods=()), weight_decay=0.0
        )


def _refuses_xla(strategy: tf.distribute.Strategy) -> bool:
    model = _dense_model(strategy)
    with strategy.scope():
        model.compile(optimizer="sgd", jit_compile=True)
    try:
        model.fit(np.zeros((8, 4), "float32"), np.zeros(8, "int32"), verbose=0)
    except ValueError as error:
        return "single replica" in str(error)
    return False


def _overflow_on_second_replica(strategy: tf.distribute.Strategy) -> dict[str, np.ndarray]:
    """One float16 step whose second half-batch (replica 1's) overflows."""
    set_mixed_precision("float16")
    try:
        model = _dense_model(strategy)
        with strategy.scope():
            model.compile(optimizer=keras.optimizers.SGD(0.1))
    finally:
        set_mixed_precision("none")
    before = [v.numpy() for v in model.trainable_variables]
    images = np.ones((8, 4), "float32")
    images[4:] = 1e5  # inf in float16
    model.fit(images, np.zeros(8, "int32"), batch_size=8, shuffle=False, verbose=0)
    return {
        "max_weight_change": max(
            float(np.max(np.abs(v.numpy() - b)))
            for v, b in zip(model.trainable_variables, before)
        ),
        "loss_scale": float(model.optimizer.dynamic_scale.numpy()),
        "initial_loss_scale": model.optimizer.initial_scale,
    }


def mirrored_child(out_dir: pathlib.Path) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    mirrored = make_strategy("mirrored")
    results = {"replicas": mirrored.num_replicas_in_sync}
    for name, strategy in (("single", tf.distribute.get_strategy()), ("mirrored", mirrored)):
        for key, value in _train_with_pskd(strategy).items():
            results[f"{name}_{key}"] = value
    for key, value in _overflow_on_second_replica(mirrored).items():
        results[f"overflow_{key}"] = value
    results["refuses_xla"] = _refuses_xla(mirrored)
    np.savez(out_dir / "mirrored.npz", **results)


def worker_child(out_dir: pathlib.Path, index: int) -> None:
    # A worker whose peer died fails after this long instead of hanging.
    strategy = make_strategy("multiworker", collective_timeout=60)
    keras.config.disable_traceback_filtering()
    tf.debugging.disable_traceback_filtering()
    images, labels = learnable_arrays(NUM_EXAMPLES, NUM_CLASSES)
    model = _selfkd_resnet(strategy)
    try:
        history = model.fit(indexed_dataset(images, labels, GLOBAL_BATCH),
                            epochs=EPOCHS, verbose=0)
    except ValueError as error:
        frames = {f.name for f in traceback.extract_tb(error.__traceback__)}
        if frames & {"_maybe_symbolic_build", "reduce_per_replica"}:
            traceback.print_exc()
            sys.exit(KERAS_DEFECT_EXIT)
        raise
    np.savez(
        out_dir / f"worker{index}.npz",
        losses=np.array(history.history["loss"]),
        table=model.soft_target_table.numpy(),
        valid=model.soft_target_valid.numpy(),
        weights=np.concatenate([w.ravel() for w in model.backbone.get_weights()]),
    )


# -- tests --------------------------------------------------------------------


def _child(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait(processes: list[subprocess.Popen]) -> list[str]:
    """Waits for every child; kills them all if one overruns the timeout."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=CHILD_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.communicate()
        pytest.fail(f"a child process ran longer than {CHILD_TIMEOUT_S} s")
    return outputs


@pytest.fixture(scope="session")
def mirrored(tmp_path_factory) -> dict[str, np.ndarray]:
    out_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each pytest-xdist worker sets up session fixtures on its own; the
        # session's shared folder and a lock let the first one run the child
        # and the others read its results.
        out_dir = out_dir.parent
    with open(out_dir / "mirrored.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / "mirrored.npz").exists():
            process = _child("mirrored", str(out_dir))
            (output,) = _wait([process])
            assert process.returncode == 0, output[-5000:]
    with np.load(out_dir / "mirrored.npz") as results:
        return dict(results)


def test_mirrored_uses_two_replicas(mirrored):
    assert mirrored["replicas"] == 2


def test_mirrored_table_holds_the_single_replica_predictions(mirrored):
    # Every training index holds exactly one prediction after each epoch.
    np.testing.assert_array_equal(mirrored["mirrored_valid"], 1.0)
    np.testing.assert_array_equal(mirrored["single_valid"], 1.0)
    np.testing.assert_allclose(
        mirrored["mirrored_tables"][0], mirrored["single_tables"][0], atol=1e-4
    )
    # The second epoch also reads the teacher on both replicas.
    np.testing.assert_allclose(
        mirrored["mirrored_tables"][1], mirrored["single_tables"][1], atol=1e-4
    )
    # The rows are predictions, not zeros or sums of the replicas' copies.
    np.testing.assert_allclose(mirrored["mirrored_tables"].sum(-1), 1.0, atol=1e-5)


def test_sync_batchnorm_losses_match_single_replica_every_step(mirrored):
    single, replicated = mirrored["single_losses"], mirrored["mirrored_losses"]
    assert len(single) == len(replicated) == EPOCHS * -(-NUM_EXAMPLES // GLOBAL_BATCH)
    np.testing.assert_allclose(replicated, single, atol=1e-4)


def test_overflow_on_one_replica_skips_the_step_everywhere(mirrored):
    # Without the cross-replica check the first replica's finite gradients
    # let the step through and the summed gradients turn the weights to NaN.
    assert mirrored["overflow_max_weight_change"] == 0.0
    assert mirrored["overflow_loss_scale"] == mirrored["overflow_initial_loss_scale"] / 2


def test_xla_is_refused_for_several_replicas(mirrored):
    # Keras would compile both replicas' steps as one XLA program, which
    # fails at the first step with a device error.
    assert mirrored["refuses_xla"]


def test_strategy_names_are_checked():
    assert make_strategy("none").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="distribute"):
        make_strategy("tpu")
    with pytest.raises(ValueError, match="collective_timeout"):
        make_strategy("mirrored", collective_timeout=10)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.xfail(
    raises=KerasMultiWorkerDefect, strict=True,
    reason="Keras 3 fit fails under MultiWorkerMirroredStrategy in multi-worker "
           "mode; see docs/multiworker.md",
)
def test_two_local_workers_train_in_step(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = [
        _child("worker", str(tmp_path), str(index), env={"TF_CONFIG": json.dumps({
            "cluster": {"worker": workers}, "task": {"type": "worker", "index": index},
        })})
        for index in range(2)
    ]
    outputs = _wait(processes)
    codes = [p.returncode for p in processes]
    if KERAS_DEFECT_EXIT in codes:
        raise KerasMultiWorkerDefect(outputs[codes.index(KERAS_DEFECT_EXIT)][-3000:])
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    results = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    assert np.all(np.isfinite(results[0]["losses"]))
    for key in ("losses", "table", "valid", "weights"):
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
    # The all-gathered rows of both workers reached both tables.
    np.testing.assert_array_equal(results[0]["valid"], 1.0)


if __name__ == "__main__":
    role, out = sys.argv[1], pathlib.Path(sys.argv[2])
    if role == "mirrored":
        mirrored_child(out)
    else:
        worker_child(out, int(sys.argv[3]))
