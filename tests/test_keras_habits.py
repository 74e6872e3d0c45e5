"""Keras habits give the right answer or a one-line error, never a silently wrong one.

Each case is an input a Keras user sends the way Keras documents it, with
the value the library must give for it.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import selfkd_tf as skd
from selfkd_tf.distillation.config import SelfKDConfig

from support import REPO, environment, indexed_dataset, learnable_arrays, tiny_backbone, tiny_model


@pytest.fixture(scope="module")
def digits():
    return skd.make_datasets("digits", batch_size=32, train_examples=96, epochs=3,
                             eval_examples=40, augment=False)


def _model(info, schedule="constant", **config):
    model = skd.SelfKDModel(
        tiny_backbone(info.num_classes, image_size=8, channels=1, seed=0),
        num_train_examples=info.num_train, config=SelfKDConfig(**config),
        input_mean=info.mean, input_std=info.std)
    model.compile(optimizer=skd.make_optimizer(
        0.05, schedule=schedule, epochs=3, steps_per_epoch=info.steps_per_epoch))
    return model


def test_names_match_values_in_evaluate_history_and_keras_callbacks(digits, tmp_path):
    train, test, info = digits
    model = _model(info)
    # Keras infers whether a metric improves up or down for "loss" only (and
    # compiled metrics); the mode of any other is given, as for any Keras
    # model with its own train_step.
    stopper = keras.callbacks.EarlyStopping(monitor="val_exit2_accuracy", mode="max",
                                            patience=5)
    history = model.fit(train, epochs=3, validation_data=test, verbose=0, callbacks=[
        stopper, keras.callbacks.ReduceLROnPlateau("val_loss"),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_ce",
                                        mode="min", save_best_only=True)])
    values = model.evaluate(test, verbose=0)
    as_dict = model.evaluate(test, verbose=0, return_dict=True)
    names = model.metrics_names
    assert names == ["loss", "ce", "byot", "dmfl", "exit1_accuracy", "exit2_accuracy",
                     "ensemble_accuracy"]
    assert len(values) == len(names) and dict(zip(names, values)) == pytest.approx(as_dict)
    # ReduceLROnPlateau adds the optimizer's rate, as for any model.
    assert {*names, *(f"val_{n}" for n in names), "lr", "alpha_t", "learning_rate"} == set(
        history.history)
    # The evaluation loss is the objective with the labels as targets; its
    # cross-entropy is the deepest exit's NLL on the labels.
    probs, labels = skd.predict_exit_probabilities(model, test)
    nll = -np.mean(np.log(probs[-1][np.arange(len(labels)), labels]))
    assert as_dict["ce"] == pytest.approx(nll, rel=1e-4)
    assert as_dict["loss"] == pytest.approx(as_dict["ce"] + as_dict["byot"] + as_dict["dmfl"],
                                            rel=1e-5)
    assert as_dict["exit2_accuracy"] == pytest.approx(
        np.mean(probs[1].argmax(1) == labels))
    assert (tmp_path / "best.keras").exists()


def test_fit_without_steps_per_epoch_trains_one_epoch_per_epoch(digits):
    train, _, info = digits
    model = _model(info, schedule="cosine")
    model.fit(train, epochs=3, verbose=0)
    assert int(model.optimizer.iterations) == 3 * info.steps_per_epoch == 9
    with pytest.raises(ValueError, match=r"^epochs: the dataset holds epochs 1\.\.3 back to"):
        model.fit(train, epochs=4, verbose=0)
    # Transformed, the dataset no longer says its epochs: fit would take all
    # three as every epoch, and the cosine schedule's span refuses it.
    with pytest.raises(ValueError, match=r"^steps_per_epoch: the optimizer's learning-rate "
                                         r"schedule spans 3 steps per epoch .* take 9"):
        model.fit(train.prefetch(1), epochs=3, verbose=0)
    with pytest.raises(ValueError, match=r"^epochs: the optimizer's learning-rate schedule "
                                         r"spans 3 epochs .* got epochs=5"):
        model.fit(train.prefetch(1), epochs=5, steps_per_epoch=3, verbose=0)


def test_the_pure_functions_take_every_shape_the_model_takes():
    rng = np.random.default_rng(0)
    logits = [tf.constant(rng.normal(size=(4, 5)), tf.float32) for _ in range(3)]
    features = [tf.constant(rng.normal(size=(4, 6)), tf.float32) for _ in range(3)]
    config = SelfKDConfig()
    reference = skd.selfkd_loss(logits, features, tf.constant([1, 2, 3, 4]), config)["total"]
    for labels, weights in (([[1], [2], [3], [4]], None), ([[1], [2], [3], [4]], [[1.0]] * 4),
                            ([1.0, 2.0, 3.0, 4.0], np.ones(4)), (np.int64([1, 2, 3, 4]), None)):
        total = skd.selfkd_loss(logits, features, tf.constant(labels), config,
                                sample_weight=weights)["total"]
        assert float(total) == pytest.approx(float(reference), rel=1e-6), (labels, weights)
    # The same batch through the model's own step gives the same objective.
    model = skd.SelfKDModel(tiny_backbone(5, image_size=8, seed=0),
                            config=SelfKDConfig(methods=("byot", "dmfl")), weight_decay=0.0)
    images = tf.constant(rng.normal(size=(4, 8, 8, 3)), tf.float32)
    outputs = model(images, training=False)
    expected = skd.selfkd_loss(outputs["logits"], outputs["features"], tf.constant([1, 2, 3, 4]),
                               model.selfkd_config)["total"]
    model.compile(optimizer="sgd")
    scored = model.evaluate(images, np.array([[1], [2], [3], [4]]), verbose=0, return_dict=True)
    assert scored["loss"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match=r"^labels: one class id per example"):
        skd.selfkd_loss(logits, features, tf.one_hot([1, 2, 3, 4], 5), config)
    with pytest.raises(ValueError, match=r"^sample_weight: one weight per example"):
        skd.selfkd_loss(logits, features, tf.constant([1, 2, 3, 4]), config,
                        sample_weight=tf.ones([4, 5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels: class ids must be whole"):
        skd.selfkd_loss(logits, features, tf.constant([1.5, 2.0, 3.0, 4.0]), config)


def test_degenerate_sizes_are_answered_or_refused():
    features = [tf.ones([2, 3])]
    with pytest.raises(ValueError, match=r"^features: needs at least 2 exits"):
        skd.dmfl_loss(features)
    inputs = keras.Input((4,))
    single = keras.Model(inputs, {"logits": [keras.layers.Dense(3)(inputs)],
                                  "features": [inputs]})
    with pytest.raises(ValueError, match=r"^methods: byot, dmfl compare shallow exits"):
        skd.SelfKDModel(single, num_train_examples=4)
    # A single-exit classifier trains with PS-KD alone.
    alone = skd.SelfKDModel(single, num_train_examples=8, config=SelfKDConfig(methods=("pskd",)))
    alone.compile(optimizer="sgd")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    history = alone.fit({"image": x, "index": np.arange(8)}, np.arange(8) % 3, epochs=2,
                        batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    one_class = tiny_backbone(1, image_size=8, seed=0)
    with pytest.raises(ValueError, match=r"^backbone: a classifier needs at least 2 classes"):
        skd.SelfKDModel(one_class, config=SelfKDConfig(methods=()))
    # No example: zeros, not NaN.
    empty = skd.selfkd_loss([tf.zeros([0, 3])] * 2, [tf.zeros([0, 4])] * 2,
                            tf.zeros([0], tf.int32), SelfKDConfig())
    assert {k: float(v) for k, v in empty.items()} == {k: 0.0 for k in empty}


EMPTY_BATCH_CHILD = r"""
import sys, numpy as np, tensorflow as tf
sys.path.insert(0, sys.argv[1])
from support import serving_model
import selfkd_tf as skd
model = serving_model(seed=0)
empty = np.zeros((0, 16, 16, 3), "float32")
out = model.predict_on_batch(empty)
assert [z.shape for z in out["logits"]] == [(0, 5)] * 3, out
assert model.predict(empty, verbose=0)["logits"][0].shape == (0, 5)
model.compile(optimizer="sgd")
for call in (lambda: model.evaluate(empty, np.zeros(0), verbose=0),
             lambda: model.fit({"image": empty, "index": np.zeros(0, "int32")}, np.zeros(0))):
    try:
        call()
        raise SystemExit("no example was not refused")
    except ValueError as error:
        assert str(error).startswith("x: no example to"), error
for exit, kwargs in (("deepest", {}), ("ensemble", {}), ("cascade", {"threshold": 0.5})):
    path = f"{sys.argv[2]}/{exit}"
    skd.export_saved_model(model, path, exit=exit, **kwargs)
    served = tf.saved_model.load(path)
    for serve in (served.serve, served.serve_any_size):
        answer = serve(tf.constant(empty))
        assert answer["probabilities"].shape == (0, 5), (exit, answer)
        assert answer["class_names"].shape == (0,)
print("ok")
"""


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_an_empty_batch_gives_empty_answers_with_either_kernels(onednn, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EMPTY_BATCH_CHILD, str(REPO / "tests"), str(tmp_path)],
        env={**environment(), "TF_ENABLE_ONEDNN_OPTS": onednn}, capture_output=True,
        text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_sample_indices_and_labels_are_checked_on_every_device():
    images, labels = learnable_arrays(8, 4, size=8)
    model = tiny_model(4, 8, image_size=8, seed=0)
    model.compile(optimizer="sgd")
    for index in (np.arange(1, 9), np.arange(8) - 1):
        data = tf.data.Dataset.from_tensor_slices(
            ({"image": images, "index": index.astype("int32")}, labels)).batch(8)
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"index: sample indices must be in \[0, 8\)"):
            model.fit(data, epochs=1, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels: class ids must be in"):
        model.evaluate(indexed_dataset(images, labels + 4, batch_size=8), verbose=0)


def test_keras_export_names_the_library_export():
    model = tiny_model(4, 8, image_size=8, seed=0)
    with pytest.raises(ValueError) as raised:
        model.export("/tmp/never-written")
    message = str(raised.value)
    assert "\n" not in message and "selfkd_tf.export_saved_model" in message
    assert "selfkd-export" in message


def test_exports_convert_to_tflite_and_show_their_input_range(tmp_path):
    model = tiny_model(4, 8, image_size=8, seed=0, input_mean=(0.5,) * 3,
                       input_std=(0.25,) * 3)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3)).astype("float32")
    for exit in ("deepest", "ensemble"):  # noqa: A001
        path = str(tmp_path / exit)
        skd.export_saved_model(model, path, exit=exit)
        served = tf.saved_model.load(path)
        expected = served.serve(tf.constant(pixels))["probabilities"].numpy()
        converted = tf.lite.TFLiteConverter.from_saved_model(
            path, signature_keys=["serving_default"]).convert()
        runner = tf.lite.Interpreter(model_content=converted).get_signature_runner()
        np.testing.assert_allclose(runner(pixels_0_to_255=pixels)["probabilities"], expected,
                                   atol=1e-5)
    # Pixels scaled to 0..1 are refused by name; 0..255 and a black image pass.
    with pytest.raises(tf.errors.InvalidArgumentError, match="look like pixels scaled to 0..1"):
        served.serve(tf.constant(pixels / 255))
    served.serve(tf.zeros([1, 8, 8, 3]))
    shown = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli",
                            "show", "--dir", path, "--tag_set", "serve",
                            "--signature_def", "serving_default"],
                           capture_output=True, text=True, env=environment(), timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "inputs['pixels_0_to_255'] tensor_info:" in shown.stdout
    assert "shape: (-1, 8, 8, 3)" in shown.stdout
