"""SelfKDModel: the PS-KD table's semantics, the optimiser, and end-to-end fits."""

import itertools
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.distillation.config import METHODS, SelfKDConfig
from selfkd_tf.distillation.pskd import SoftTargetRefresh
from selfkd_tf.models.primitives import PatchConv2D
from selfkd_tf.optimizers import learning_rate_schedule, make_optimizer
from support import indexed_dataset, learnable_arrays, tiny_model

NUM_CLASSES = 4


def _model(methods=METHODS, n=64, seed=0, weight_decay=5e-4, num_stages=2, **config):
    return tiny_model(NUM_CLASSES, n, image_size=16, num_stages=num_stages, seed=seed,
                      weight_decay=weight_decay, config=SelfKDConfig(methods=methods, **config))


def _compile(model, lr=0.05, momentum=0.9, schedule="constant", epochs=3, steps=4):
    model.compile(optimizer=make_optimizer(lr, momentum, schedule=schedule,
                                           epochs=epochs, steps_per_epoch=steps))
    return model


def test_epoch_zero_trains_on_one_hot_labels():
    images, labels = learnable_arrays(64, NUM_CLASSES)
    ds = indexed_dataset(images, labels, 16)
    pskd = _compile(_model(("pskd",)))
    baseline = _compile(_model(()))
    pskd.fit(ds, epochs=1, verbose=0)
    baseline.fit(ds, epochs=1, verbose=0)
    for a, b in zip(pskd.backbone.get_weights(), baseline.backbone.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_table_holds_exactly_the_predictions_of_the_last_epoch():
    # lr 0 and no decay freeze the weights, so the training-mode forward pass
    # of each batch can be recomputed exactly afterwards.
    # Unshuffled, so batches have the same members (BN uses batch statistics).
    images, labels = learnable_arrays(48, NUM_CLASSES)
    model = _compile(_model(("pskd",), n=48, weight_decay=0.0), lr=0.0)
    ds = indexed_dataset(images, labels, 16)
    model.fit(ds, epochs=2, verbose=0)
    expected = np.zeros((48, NUM_CLASSES), np.float32)
    for x, _ in ds:
        probs = tf.nn.softmax(model(x["image"], training=True)["logits"][-1])
        expected[x["index"].numpy()] = probs.numpy()
    np.testing.assert_allclose(model.soft_target_table.numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(model.soft_target_valid.numpy(), np.ones(48))
    np.testing.assert_array_equal(model.staged_valid.numpy(), np.zeros(48))


def test_predictions_are_read_only_in_the_next_epoch():
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _compile(_model(("pskd",), n=32))
    seen = []

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((self.model.soft_target_table.numpy().copy(),
                         self.model.soft_target_valid.numpy().sum()))

    model.fit(indexed_dataset(images, labels, 16), epochs=2, verbose=0,
              callbacks=[Snapshot()])
    # Within epoch 0 the table stays empty; within epoch 1 it is frozen.
    assert [v for _, v in seen] == [0, 0, 32, 32]
    np.testing.assert_array_equal(seen[2][0], seen[3][0])


def test_partial_epoch_keeps_rows_it_did_not_see():
    images, labels = learnable_arrays(64, NUM_CLASSES)
    model = _compile(_model(("pskd",), n=64))
    ds = indexed_dataset(images, labels, 16).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    valid = model.soft_target_valid.numpy()
    np.testing.assert_array_equal(valid, (np.arange(64) < 32).astype("float32"))
    np.testing.assert_array_equal(model.soft_target_table.numpy()[32:], 0.0)


@pytest.mark.parametrize("teacher", ["deepest", "ensemble"])
def test_alpha_schedule_and_teacher_choice(teacher):
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _compile(_model(("pskd",), n=32, pskd_alpha=0.6, pskd_teacher=teacher), lr=0.0)
    history = model.fit(indexed_dataset(images, labels, 32), epochs=3, verbose=0)
    # a_t = 0.2, 0.4, 0.6; epoch 0 has no stored predictions, so applies 0.
    np.testing.assert_allclose(history.history["alpha_t"], [0.0, 0.4, 0.6], rtol=1e-6)
    outputs = model(images, training=True)
    probs = [tf.nn.softmax(z).numpy() for z in outputs["logits"]]
    expected = probs[-1] if teacher == "deepest" else np.mean(probs, axis=0)
    np.testing.assert_allclose(model.soft_target_table.numpy(), expected, atol=1e-5)


def test_refresh_callback_is_added_and_moved_first():
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _compile(_model(("pskd",), n=32))
    order = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            order.append(self.model.staged_valid.numpy().sum())

    model.fit(indexed_dataset(images, labels, 16), epochs=1, verbose=0,
              callbacks=[Recorder(), SoftTargetRefresh()])
    assert order == [0]  # the refresh ran before the user's callback
    assert model.soft_target_valid.numpy().sum() == 32


def test_pskd_without_index_fails_clearly():
    images, labels = learnable_arrays(16, NUM_CLASSES)
    model = _compile(_model(("pskd",), n=16))
    with pytest.raises(ValueError, match="sample index"):
        model.fit(images, labels, batch_size=8, epochs=1, verbose=0)


def test_state_round_trips_through_keras_file(tmp_path):
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _compile(_model(n=32))
    model.fit(indexed_dataset(images, labels, 16), epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.selfkd_config == model.selfkd_config
    for name in ("soft_target_table", "soft_target_valid", "pskd_alpha_t"):
        np.testing.assert_array_equal(
            getattr(restored, name).numpy(), getattr(model, name).numpy()
        )
    assert float(restored.pskd_alpha_t.numpy()) == pytest.approx(0.8 * 2 / 2)
    np.testing.assert_allclose(
        restored(images)["logits"][-1], model(images)["logits"][-1], atol=1e-6
    )
    # The optimiser state (momentum) comes back too.
    assert int(restored.optimizer.iterations.numpy()) == 4
    # A fresh process that imports only the training module loads it as well:
    # the backbone's own layer classes (the heads' PatchConv2D) come with it.
    assert any(isinstance(layer, PatchConv2D) for layer in model.backbone.layers)
    code = ("import keras, selfkd_tf.distillation.model; "
            f"model = keras.saving.load_model({str(path)!r}); "
            "print(int(model.optimizer.iterations.numpy()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["4"]


def test_weight_decay_is_coupled_l2_in_the_gradient():
    images, labels = learnable_arrays(16, NUM_CLASSES)
    ds = indexed_dataset(images, labels, 16)
    runs = {}
    for wd in (0.0, 0.01):
        model = _compile(_model((), weight_decay=wd), lr=0.5, momentum=0.0)
        before = [v.numpy() for v in model.trainable_variables]
        model.fit(ds, epochs=1, verbose=0)
        runs[wd] = (before, [v.numpy() for v in model.trainable_variables])
    # One plain SGD step: w1(wd) - w1(0) = -lr * wd * w0.
    for w0, with_decay, without in zip(runs[0.01][0], runs[0.01][1], runs[0.0][1]):
        np.testing.assert_allclose(with_decay - without, -0.5 * 0.01 * w0, atol=1e-6)


def test_learning_rate_schedules():
    multistep = learning_rate_schedule(0.1, "multistep", epochs=8, steps_per_epoch=10)
    assert [float(multistep(s)) for s in (0, 39, 40, 59, 60)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001]
    )
    cosine = learning_rate_schedule(0.1, "cosine", epochs=2, steps_per_epoch=5)
    assert float(cosine(5)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate_schedule(0.1, "step")


def test_evaluate_reports_every_exit_and_the_ensemble():
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _compile(_model(n=32, num_stages=3))
    results = model.evaluate(indexed_dataset(images, labels, 16), return_dict=True, verbose=0)
    assert set(results) == {"loss", "ce", "byot", "dmfl", "exit1_accuracy", "exit2_accuracy",
                            "exit3_accuracy", "ensemble_accuracy"}
    # Plain image input works for evaluation and prediction.
    plain = model.evaluate(images, labels, batch_size=16, return_dict=True, verbose=0)
    assert plain["loss"] == pytest.approx(results["loss"], rel=1e-5)


COMBINATIONS = [c for r in range(4) for c in itertools.combinations(METHODS, r)]


@pytest.mark.parametrize("methods", COMBINATIONS, ids=lambda m: "+".join(m) or "baseline")
def test_every_method_combination_learns(methods):
    images, labels = learnable_arrays(192, NUM_CLASSES, seed=1)
    model = _compile(_model(methods, n=192, seed=1), lr=0.05, epochs=3, steps=6)
    history = model.fit(indexed_dataset(images, labels, 32, shuffle_seed=0),
                        epochs=3, verbose=0).history
    assert history["ce"][-1] < history["ce"][0]
    assert history["loss"][-1] < history["loss"][0]
    for name in ("byot", "dmfl"):
        used = name in methods
        assert (history[name][0] > 0) == used, name
    outputs = model.predict(images[:8], verbose=0)
    for tensor in outputs["logits"] + outputs["features"]:
        assert np.all(np.isfinite(tensor))
