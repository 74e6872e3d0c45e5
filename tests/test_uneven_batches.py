"""Several replicas on batches they cannot share evenly train as one device.

`tf.distribute` splits a global batch of ``b`` examples over ``R`` replicas
into parts of ``ceil(b / R)`` examples, so the last parts are shorter or
empty: a last batch of 1 on 2 replicas leaves one replica nothing, and 16
examples on 3 replicas are 6 + 6 + 4. Each configuration runs in a child
process (``python test_uneven_batches.py R OUT``) that splits its CPU into
``R`` logical devices before TensorFlow starts, and trains through batches
that cover every remainder ``1..R-1``, the last batch of the epoch included,
with oneDNN's CPU kernels (and, for two replicas, also without them):

- with synchronised batch norm and per-example weights, against one device
  on the same batches: every logged value of every step, every weight
  (moving statistics included) and every PS-KD table row agree;
- with per-replica batch norm, against one device that normalises each
  replica's share on its own (ghost batch normalisation over the same
  shares), which is what per-replica statistics compute: the logged
  values, the trainable weights and the table rows agree; the replicas'
  moving statistics are pooled as `SelfKDModel` documents;
- evaluation and prediction under the strategy, with a short last batch,
  agree with one device holding the same weights;
- the reported input (the library's ResNet, 17 images, global batch 16,
  per-replica batch norm, 2 replicas) keeps every weight finite.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.distribution.strategy import make_strategy
from selfkd_tf.models.primitives import Conv2D, batch_norm
from selfkd_tf.optimizers import make_optimizer
from selfkd_tf.distillation.model import SelfKDModel
from support import StepRecorder, indexed_dataset, learnable_arrays, run_once, tiny_model

NUM_CLASSES = 4
IMAGE_SIZE = 8
EPOCHS = 2
LEARNING_RATE = 0.01
# Batch sizes of one epoch, per replica count. R = 2: 16 -> 8 + 8, 3 -> 2 + 1,
# 1 -> 1 + 0 (the epoch's last batch). R = 3: 16 -> 6 + 6 + 4 (already the
# first batch), 1 -> 1 + 0 + 0, 4 -> 2 + 2 + 0, 2 -> 1 + 1 + 0 (last).
PLANS = {2: (16, 3, 1), 3: (16, 1, 4, 2)}
TOLERANCE = 1e-4
# Prediction batch: the plans' example counts (20, 23) leave a short last batch.
PREDICT_BATCH = 16
CHILD_TIMEOUT_S = 600


def share_sizes(batch: int, replicas: int) -> list[int]:
    """How `tf.distribute` shares ``batch`` examples out to ``replicas``."""
    part = -(-batch // replicas)
    return [min(part, max(0, batch - k * part)) for k in range(replicas)]


# -- child process ------------------------------------------------------------


def _dataset(images, labels, plan, weights=None) -> tf.data.Dataset:
    """Unshuffled batches of the sizes in ``plan``, optionally with weights."""
    index = np.arange(len(labels), dtype="int32")
    arrays = ({"image": images, "index": index}, labels)
    if weights is not None:
        arrays += (weights,)
    parts, start = [], 0
    for size in plan:
        part = tf.nest.map_structure(lambda a: a[start:start + size], arrays)
        parts.append(tf.data.Dataset.from_tensor_slices(part).batch(size))
        start += size
    return functools.reduce(tf.data.Dataset.concatenate, parts)


class _GhostBatchNorm(SelfKDModel):
    """One device normalising each replica's share of a batch on its own.

    Runs eagerly: the shares are cut with the batch size in Python.
    """

    def __init__(self, *args, replicas: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.replicas = replicas

    def call(self, inputs, training=None):
        if not training:
            return super().call(inputs, training=training)
        images = inputs["image"] if isinstance(inputs, dict) else inputs
        shares = share_sizes(int(images.shape[0]), self.replicas)
        parts = [self.backbone(part, training=True)
                 for part in tf.split(images, shares) if part.shape[0]]
        return tf.nest.map_structure(lambda *t: tf.concat(t, axis=0), *parts)


def _two_exit_backbone(sync: bool, sync_head: bool | None = None) -> keras.Model:
    """A two-exit network with batch norm on both paths, cheap to trace R times.

    ``sync_head`` (default: ``sync``) sets the shallow exit's batch norm apart.
    A replica with an empty share runs the network when batch norm is
    synchronised, so those convolutions are `selfkd_tf`'s `Conv2D` (oneDNN's
    return an empty batch in the input's shape); per-replica batch norm skips
    empty shares, so any backbone's `keras.layers.Conv2D` works there.
    """
    layers = keras.layers
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    convolution = Conv2D if sync else layers.Conv2D

    def conv_bn(x, filters, kernel, strides, name, synchronized=sync):
        x = convolution(filters, kernel, strides, padding="same", use_bias=False,
                        name=f"{name}_conv")(x)
        return layers.ReLU()(batch_norm(synchronized, f"{name}_bn")(x))

    stem = conv_bn(images, 4, 3, 1, "stem")
    head = conv_bn(stem, 8, 1, 1, "head", sync if sync_head is None else sync_head)
    paths = [head, conv_bn(stem, 8, 3, 2, "deep")]
    features = [layers.GlobalAveragePooling2D()(x) for x in paths]
    logits = [layers.Dense(NUM_CLASSES)(f) for f in features]
    return keras.Model(images, {"logits": logits, "features": features})


def _model(strategy, sync: bool, num_examples: int, model_class=SelfKDModel, **kwargs):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        backbone = _two_exit_backbone(sync)
        model = model_class(backbone, num_train_examples=num_examples, **kwargs)
        model.compile(optimizer=make_optimizer(LEARNING_RATE, schedule="constant"),
                      run_eagerly=model_class is not SelfKDModel)
    return model


def _is_moving_statistic(variable) -> bool:
    return variable.path.endswith(("moving_mean", "moving_variance"))


def _train(model, dataset, prefix: str, callbacks=()) -> dict[str, np.ndarray]:
    recorder = StepRecorder()
    model.fit(dataset, epochs=EPOCHS, verbose=0, callbacks=[recorder, *callbacks])
    backbone = model.backbone.weights
    return {
        f"{prefix}_keys": np.array(recorder.keys),
        f"{prefix}_logs": np.array(recorder.logs),
        f"{prefix}_tables": np.stack(recorder.tables),
        f"{prefix}_trainable": np.concatenate(
            [v.numpy().ravel() for v in backbone if v.trainable]),
        f"{prefix}_moving": np.concatenate(
            [v.numpy().ravel() for v in backbone if _is_moving_statistic(v)]),
        f"{prefix}_finite": np.array(all(
            np.all(np.isfinite(v.numpy())) for v in model.weights)),
    }


def _replica_copies_agree(model) -> bool:
    """Whether every replica holds the same moving statistics."""
    for v in model.backbone.weights:
        if _is_moving_statistic(v):
            copies = [c.numpy() for c in v.value.values]
            if any(not np.array_equal(copies[0], c) for c in copies[1:]):
                return False
    return True


class _FirstStepStatistics(keras.callbacks.Callback):
    """The stem batch norm's input before the first step, and its statistics after."""

    def __init__(self, first_images):
        super().__init__()
        self.first_images = first_images

    def on_train_begin(self, logs=None):
        layer = self.model.backbone.get_layer("stem_bn")
        stem = keras.Model(self.model.backbone.input, layer.input)
        self.results = {"stem_input": stem(self.first_images).numpy(),
                        "stem_momentum": np.array(layer.momentum)}

    def on_train_batch_end(self, batch, logs=None):
        if "stem_moving_mean" not in self.results:
            layer = self.model.backbone.get_layer("stem_bn")
            self.results["stem_moving_mean"] = layer.moving_mean.numpy()
            self.results["stem_moving_variance"] = layer.moving_variance.numpy()


def _evaluated_and_predicted(model, one_device_twin, dataset, images, prefix):
    """Evaluation and prediction of ``model`` and of a one-device copy.

    ``one_device_twin`` has the same architecture; in inference, batch norm
    with and without synchronisation is the same layer.
    """
    one_device_twin.set_weights(model.get_weights())
    results = {}
    for name, candidate in (("replicated", model), ("one_device", one_device_twin)):
        scores = candidate.evaluate(dataset, return_dict=True, verbose=0)
        results[f"{prefix}_{name}_scores"] = np.array([scores[k] for k in sorted(scores)])
        results[f"{prefix}_{name}_predictions"] = candidate.predict(
            images, batch_size=PREDICT_BATCH, verbose=0)["logits"][-1]
    return results


def _reported_case_is_finite(strategy) -> bool:
    """The reported input: the library's ResNet, 17 images, batch 16, 2 epochs.

    Before the fix, the empty share of the last batch turned 13 weights to
    NaN in the first epoch and the table rows in the second.
    """
    images, labels = learnable_arrays(17, NUM_CLASSES)
    with strategy.scope():
        model = tiny_model(NUM_CLASSES, 17, image_size=16, sync_batchnorm=False, seed=0)
        model.compile(optimizer=make_optimizer(LEARNING_RATE, schedule="constant"))
    history = model.fit(indexed_dataset(images, labels, 16), epochs=2, verbose=0)
    return (all(np.all(np.isfinite(v.numpy())) for v in model.weights)
            and np.all(np.isfinite(history.history["loss"])))


def _mixed_batch_norm_refusal(strategy) -> str:
    """The error of fit for a backbone mixing synchronised and per-replica batch norm."""
    images, labels = learnable_arrays(4, NUM_CLASSES, size=IMAGE_SIZE)
    with strategy.scope():
        model = SelfKDModel(_two_exit_backbone(sync=True, sync_head=False),
                            num_train_examples=4)
        model.compile(optimizer="sgd")
    try:
        model.fit(indexed_dataset(images, labels, 4), verbose=0)
    except ValueError as error:
        return str(error)
    return ""


def child(replicas: int, out: pathlib.Path) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    mirrored = make_strategy("mirrored")
    one_device = tf.distribute.get_strategy()
    plan = PLANS[replicas]
    n = sum(plan)
    images, labels = learnable_arrays(n, NUM_CLASSES, size=IMAGE_SIZE)
    weights = np.random.default_rng(1).uniform(0.0, 2.0, n).astype("float32")
    weights[::5] = 0.0
    results = {"replicas": np.array(mirrored.num_replicas_in_sync)}

    # The split the one-device references assume is tf.distribute's.
    distributed = mirrored.experimental_distribute_dataset(_dataset(images, labels, plan))
    results["observed_shares"] = np.array([
        [int(t.shape[0]) for t in mirrored.experimental_local_results(element[1])]
        for element in distributed])
    results["expected_shares"] = np.array([share_sizes(b, replicas) for b in plan])

    weighted = _dataset(images, labels, plan, weights)
    unweighted = _dataset(images, labels, plan)
    sync_one_device = _model(one_device, True, n)
    results.update(_train(sync_one_device, weighted, "sync_one"))
    results.update(_train(_model(mirrored, True, n), weighted, "sync_replicated"))
    results.update(_train(
        _model(one_device, False, n, _GhostBatchNorm, replicas=replicas),
        unweighted, "ghost_one"))
    per_replica = _model(mirrored, False, n)
    first_step = _FirstStepStatistics(images[:plan[0]])
    results.update(_train(per_replica, unweighted, "ghost_replicated", [first_step]))
    results.update(first_step.results)
    results["ghost_copies_agree"] = np.array(_replica_copies_agree(per_replica))
    results.update(_evaluated_and_predicted(
        per_replica, sync_one_device, weighted,
        {"image": images, "index": np.arange(n, dtype="int32")}, "inference"))
    if replicas == 2:
        results["reported_case_finite"] = np.array(_reported_case_is_finite(mirrored))
        results["mixed_refusal"] = np.array(_mixed_batch_norm_refusal(mirrored))
    np.savez(out / f"uneven{replicas}.npz", **results)


# -- tests ----------------------------------------------------------------------


def _results(tmp_path_factory, replicas: int, onednn: str = "1") -> dict[str, np.ndarray]:
    """The child's results for ``replicas`` replicas, computed once per session."""
    name = f"uneven{replicas}_onednn{onednn}"

    def produce(folder):
        process = subprocess.run(
            [sys.executable, __file__, str(replicas), str(folder)],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": onednn},
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=CHILD_TIMEOUT_S,
        )
        assert process.returncode == 0, (process.stdout + process.stderr)[-5000:]

    folder = run_once(tmp_path_factory, name, produce)
    with np.load(folder / f"uneven{replicas}.npz") as results:
        return dict(results)


# Both CPU kernel sets (oneDNN is the default on some CPUs, off on others):
# oneDNN's convolutions return an empty batch in the input's shape, which
# broke a replica with an empty share. Three replicas run with oneDNN only,
# to keep the suite's time; two cover the default kernels too.
@pytest.fixture(
    scope="module", params=[(2, "0"), (2, "1"), (3, "1")],
    ids=lambda p: f"{p[0]}replicas-onednn{p[1]}",
)
def run(request, tmp_path_factory) -> dict[str, np.ndarray]:
    return _results(tmp_path_factory, *request.param)


def test_the_batches_are_shared_unevenly(run):
    replicas = int(run["replicas"])
    np.testing.assert_array_equal(run["observed_shares"], run["expected_shares"])
    last_parts = {int(b) % replicas for b in PLANS[replicas]}
    assert set(range(1, replicas)) <= last_parts  # every remainder 1..R-1
    assert (run["observed_shares"] == 0).any()  # some replica gets nothing


def _assert_same_training(run, one, replicated, moving: bool):
    for prefix in (one, replicated):
        assert run[f"{prefix}_finite"], f"{prefix}: a weight or table row is not finite"
    np.testing.assert_array_equal(run[f"{one}_keys"], run[f"{replicated}_keys"])
    keys = list(run[f"{one}_keys"])
    steps = EPOCHS * len(PLANS[int(run["replicas"])])
    assert run[f"{one}_logs"].shape == (steps, len(keys))
    for column, key in enumerate(keys):
        np.testing.assert_allclose(
            run[f"{replicated}_logs"][:, column], run[f"{one}_logs"][:, column],
            atol=TOLERANCE, err_msg=key)
    np.testing.assert_allclose(
        run[f"{replicated}_tables"], run[f"{one}_tables"], atol=TOLERANCE)
    # Every row was written in each epoch: predictions, not empty rows.
    np.testing.assert_allclose(run[f"{replicated}_tables"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        run[f"{replicated}_trainable"], run[f"{one}_trainable"], atol=TOLERANCE)
    if moving:
        np.testing.assert_allclose(
            run[f"{replicated}_moving"], run[f"{one}_moving"], atol=TOLERANCE)


def test_reported_case_keeps_every_weight_finite(tmp_path_factory):
    assert _results(tmp_path_factory, 2)["reported_case_finite"]


def test_mixing_synchronised_and_per_replica_batch_norm_is_refused(tmp_path_factory):
    # An empty share could neither skip the forward pass (the synchronised
    # layers' all-reduce needs every replica) nor run it (NaN statistics).
    message = str(_results(tmp_path_factory, 2)["mixed_refusal"])
    assert message.startswith("sync_batchnorm: the backbone mixes synchronized")


def test_sync_batchnorm_with_weights_trains_as_one_device(run):
    _assert_same_training(run, "sync_one", "sync_replicated", moving=True)


def test_per_replica_batchnorm_trains_as_one_device_with_ghost_batches(run):
    _assert_same_training(run, "ghost_one", "ghost_replicated", moving=False)
    assert run["ghost_copies_agree"]


def test_moving_statistics_are_pooled_over_the_replicas(run):
    replicas = int(run["replicas"])
    x = run["stem_input"].astype(np.float64)  # the first batch, [16, H, W, C]
    shares = share_sizes(len(x), replicas)
    parts = np.split(x, np.cumsum(shares)[:-1])
    m = float(run["stem_momentum"])
    # Initial moving statistics: mean 0, variance 1.
    expected_mean = (1 - m) * x.mean(axis=(0, 1, 2))
    expected_variance = m + (1 - m) * sum(
        len(p) / len(x) * p.var(axis=(0, 1, 2)) for p in parts if len(p))
    np.testing.assert_allclose(run["stem_moving_mean"], expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        run["stem_moving_variance"], expected_variance, rtol=1e-4, atol=1e-6)


def test_evaluation_and_prediction_match_one_device(run):
    np.testing.assert_allclose(
        run["inference_replicated_scores"], run["inference_one_device_scores"],
        rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        run["inference_replicated_predictions"], run["inference_one_device_predictions"],
        rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    child(int(sys.argv[1]), pathlib.Path(sys.argv[2]))
