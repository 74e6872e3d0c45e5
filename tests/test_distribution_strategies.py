"""Data-parallel training gives single-replica results.

TensorFlow fixes its devices when it first uses them, so the distributed runs
happen in child processes started from this file (``python
test_distribution_strategies.py mirrored|worker|single ...``): one process
splits its CPU into two logical devices for `tf.distribute.MirroredStrategy`,
two processes form a `tf.distribute.MultiWorkerMirroredStrategy` cluster on
localhost, and one more trains the same model alone for reference.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import traceback

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distribution.cluster import local_addresses
from selfkd_tf.distribution.strategy import make_strategy, set_mixed_precision
from selfkd_tf.distribution.multiworker import DEFECT_BATCH_REDUCE, keras_multiworker_defects
from selfkd_tf.optimizers import make_optimizer
from selfkd_tf.distillation.model import SelfKDModel
from support import (
    StepRecorder, indexed_dataset, learnable_arrays, run_once, tf_config, tiny_model, wait_all)

NUM_CLASSES = 4
# 56 = 3 full global batches of 16 and a last one of 8, split 4 + 4.
NUM_EXAMPLES, GLOBAL_BATCH = 56, 16
EPOCHS = 2
# A small rate keeps the tiny network's training smooth, so float rounding
# differences between 1 and 2 replicas stay far below the tolerances.
LEARNING_RATE = 0.01
CHILD_TIMEOUT_S = 300
# Two workers: 53 = 3 full global batches of 16 and a last one of 5, which
# tf.distribute splits 5 + 0 between the workers (each worker keeps its
# part of every batch: per-replica pieces of 8, handed out in turn).
WORKER_EXAMPLES, WORKER_IMAGE_SIZE = 53, 8
# Validation batches of 16 and 5: worker 1 has no example in the second.
WORKER_EVAL_EXAMPLES = 21


# -- child processes --------------------------------------------------------


def _selfkd_resnet(strategy: tf.distribute.Strategy, num_examples: int = NUM_EXAMPLES,
                   image_size: int = 16, top_k: int | None = None) -> SelfKDModel:
    with strategy.scope():
        model = tiny_model(NUM_CLASSES, num_examples, image_size=image_size,
                           sync_batchnorm=True, seed=0, table_top_k=top_k)
        model.compile(optimizer=make_optimizer(LEARNING_RATE, schedule="constant"))
    return model


def _train_with_pskd(strategy: tf.distribute.Strategy, num_examples: int = NUM_EXAMPLES,
                     image_size: int = 16, eval_examples: int = 0,
                     top_k: int | None = None) -> dict[str, np.ndarray]:
    """All three methods, synchronized batch norm, unshuffled data.

    With ``eval_examples``, also validates after every epoch on that many
    other examples and returns the validation logs as ``val`` ``[epochs, 4]``.
    """
    images, labels = learnable_arrays(num_examples, NUM_CLASSES, size=image_size)
    validation = None
    if eval_examples:
        validation = indexed_dataset(*learnable_arrays(
            eval_examples, NUM_CLASSES, size=image_size, seed=1), GLOBAL_BATCH)
    model = _selfkd_resnet(strategy, num_examples, image_size, top_k)
    recorder = StepRecorder()
    history = model.fit(indexed_dataset(images, labels, GLOBAL_BATCH), epochs=EPOCHS,
                        verbose=0, callbacks=[recorder], validation_data=validation)
    results = {
        "losses": recorder.column("loss"),
        "tables": np.stack(recorder.tables),
        "valid": np.stack(recorder.valid),
        "weights": np.concatenate([w.ravel() for w in model.backbone.get_weights()]),
        # Copies held: a weight has one per replica, the PS-KD table one per machine.
        "table_copies": len(strategy.experimental_local_results(model.soft_target_table.value)),
        "weight_copies": len(strategy.experimental_local_results(
            model.backbone.trainable_weights[0].value)),
    }
    if eval_examples:
        results["val"] = np.array([history.history[f"val_{name}"] for name in (
            "loss", "exit1_accuracy", "exit2_accuracy", "ensemble_accuracy")]).T
    return results


def _dense_model(strategy: tf.distribute.Strategy) -> SelfKDModel:
    """A one-exit baseline of two Dense layers: cheap to build and trace."""
    with strategy.scope():
        inputs = keras.Input((4,))
        feature = keras.layers.Dense(8, activation="relu")(inputs)
        logits = keras.layers.Dense(NUM_CLASSES, dtype="float32")(feature)
        backbone = keras.Model(inputs, {"logits": [logits], "features": [feature]})
        return SelfKDModel(
            backbone, config=SelfKDConfig(methods=()), weight_decay=0.0
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
        for key, value in _train_with_pskd(strategy, top_k=2).items():
            results[f"{name}_topk_{key}"] = value
    for key, value in _overflow_on_second_replica(mirrored).items():
        results[f"overflow_{key}"] = value
    results["refuses_xla"] = _refuses_xla(mirrored)
    np.savez(out_dir / "mirrored.npz", **results)


def _plain_keras_fit_failure(strategy: tf.distribute.Strategy) -> str:
    """Where a plain `keras.Sequential` fit fails under ``strategy``, or "".

    The workaround lives in SelfKDModel's classes only, so a plain model in
    the same process still meets Keras's own code.
    """
    keras.config.disable_traceback_filtering()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    data = tf.data.Dataset.from_tensor_slices(
        (np.ones((8, 3), "float32"), np.ones((8, 1), "float32"))).batch(4)
    try:
        model.fit(data, verbose=0)
    except ValueError as error:
        keras_frames = [
            frame.name for frame in traceback.extract_tb(error.__traceback__)
            if frame.filename.endswith(os.path.join("backend", "tensorflow", "trainer.py"))
        ]
        return keras_frames[-1] if keras_frames else "elsewhere"
    return ""


def worker_child(out_dir: pathlib.Path, index: int) -> None:
    strategy = make_strategy("multiworker")
    results = _train_with_pskd(strategy, WORKER_EXAMPLES, WORKER_IMAGE_SIZE,
                               WORKER_EVAL_EXAMPLES)
    results["plain_keras_failure"] = _plain_keras_fit_failure(strategy)
    np.savez(out_dir / f"worker{index}.npz", **results)


def single_child(out_dir: pathlib.Path) -> None:
    results = _train_with_pskd(tf.distribute.get_strategy(), WORKER_EXAMPLES,
                               WORKER_IMAGE_SIZE, WORKER_EVAL_EXAMPLES)
    np.savez(out_dir / "single.npz", **results)


# -- tests --------------------------------------------------------------------


def _child(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture(scope="session")
def mirrored(tmp_path_factory) -> dict[str, np.ndarray]:
    def produce(out_dir):
        process = _child("mirrored", str(out_dir))
        (output,) = wait_all([process], CHILD_TIMEOUT_S)
        assert process.returncode == 0, output[-5000:]

    out_dir = run_once(tmp_path_factory, "mirrored", produce)
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
    # One copy of the table on the machine, one of every weight per replica.
    assert (int(mirrored["mirrored_table_copies"]), int(mirrored["mirrored_weight_copies"])) == (1, 2)
    # The top-k table holds the same K largest probabilities as on one device.
    np.testing.assert_allclose(mirrored["mirrored_topk_tables"], mirrored["single_topk_tables"],
                               atol=1e-4)
    assert mirrored["mirrored_topk_tables"].shape[-1] == 2


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


def test_two_local_workers_train_as_one_process(tmp_path):
    # Two workers on 127.0.0.1 and, at the same time, one process alone:
    # all three methods, synchronized batch norm, 2 epochs whose last batch
    # leaves worker 1 without an example, validation after each epoch.
    cluster = local_addresses(2)
    processes = [_child("single", str(tmp_path))] + [
        _child("worker", str(tmp_path), str(index), env=tf_config(cluster, index))
        for index in range(2)
    ]
    outputs = wait_all(processes, CHILD_TIMEOUT_S)
    assert [p.returncode for p in processes] == [0, 0, 0], "\n".join(
        o[-3000:] for o in outputs)
    single = np.load(tmp_path / "single.npz")
    workers = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]

    # Both workers hold the same model, losses and PS-KD tables...
    for key in ("losses", "tables", "valid", "weights", "val"):
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)
    # ...with every row filled after each epoch: the all-gathered rows of
    # both workers reached both tables, the 5 + 0 last batch included.
    np.testing.assert_array_equal(workers[0]["valid"], 1.0)
    # ...and they are the one process's, step by step and row by row.
    assert len(single["losses"]) == EPOCHS * -(-WORKER_EXAMPLES // GLOBAL_BATCH)
    # The validation loss and accuracies count every example once.
    for key in ("losses", "tables", "weights", "val"):
        np.testing.assert_allclose(workers[0][key], single[key], rtol=0, atol=1e-5,
                                   err_msg=key)
    # A plain Keras model in the same processes still meets Keras's own code.
    expected = "_maybe_symbolic_build" if DEFECT_BATCH_REDUCE in keras_multiworker_defects() else ""
    assert [str(w["plain_keras_failure"]) for w in workers] == [expected] * 2


if __name__ == "__main__":
    role, out = sys.argv[1], pathlib.Path(sys.argv[2])
    if role == "mirrored":
        mirrored_child(out)
    elif role == "single":
        single_child(out)
    else:
        worker_child(out, int(sys.argv[3]))
