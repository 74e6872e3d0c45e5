"""`sample_weight` and `class_weight` reach every loss term of `SelfKDModel`.

The loss functions' weighting is checked against numpy in test_losses.py;
here the model's own paths are: a ``(x, y, w)`` dataset, arrays with
``sample_weight=``, and ``class_weight=``, in training and in evaluation.
"""

import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distillation import losses
from selfkd_tf.optimizers import make_optimizer
from support import learnable_arrays, tiny_model

NUM_CLASSES = 4
SIZE = 8
N = 32
BATCH = 16
CLASS_WEIGHT = {0: 0.0, 1: 0.0, 2: 1.0}  # class 3 left out: weight 1


def _model(n=N, lr=0.05, weight_decay=5e-4, **config):
    model = tiny_model(NUM_CLASSES, n, image_size=SIZE, seed=0, weight_decay=weight_decay,
                       config=SelfKDConfig(**config))
    model.compile(optimizer=make_optimizer(lr, schedule="constant"))
    return model


def _inputs(images):
    return {"image": images, "index": np.arange(len(images), dtype="int32")}


def _dataset(images, labels, weights=None, batch=BATCH):
    elements = (_inputs(images), labels) + (() if weights is None else (weights,))
    return tf.data.Dataset.from_tensor_slices(elements).batch(batch)


def _trained(fit_args, fit_kwargs=None):
    model = _model()
    model.fit(*fit_args, epochs=2, verbose=0, **(fit_kwargs or {}))
    return model


@pytest.fixture(scope="module")
def runs():
    """Two epochs of the full method, weighted in every supported way."""
    images, labels = learnable_arrays(N, NUM_CLASSES, size=SIZE)
    weights = np.array([CLASS_WEIGHT.get(int(c), 1.0) for c in labels], "float32")
    # Labels of weight-0 examples, changed: they must not matter.
    relabelled = np.where(weights == 0, (labels + 1) % NUM_CLASSES, labels).astype("int32")
    return {
        "unweighted": _trained([_dataset(images, labels)]),
        "dataset": _trained([_dataset(images, labels, weights)]),
        "class_weight": _trained([_dataset(images, labels)],
                                 {"class_weight": CLASS_WEIGHT}),
        # [B, 1] labels and weights, as arrays from many loaders come.
        "arrays": _trained([_inputs(images), labels[:, None]], {
            "sample_weight": weights[:, None], "batch_size": BATCH, "shuffle": False}),
        "relabelled": _trained([_dataset(images, relabelled, weights)]),
    }


def _weights(model):
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


# Separate fits agree to float rounding (CPU kernels may sum in any order);
# a weight that is dropped or misapplied moves weights by more than 1e-3.
SAME = 1e-6


def test_class_weight_dataset_and_array_weights_train_the_same(runs):
    reference = _weights(runs["dataset"])
    for name in ("class_weight", "arrays"):
        np.testing.assert_allclose(_weights(runs[name]), reference, atol=SAME, err_msg=name)


def test_weights_change_training(runs):
    # Before weights were honoured the runs were bitwise equal.
    difference = np.abs(_weights(runs["dataset"]) - _weights(runs["unweighted"]))
    assert difference.max() > 1e-3


def test_labels_of_weight_zero_examples_do_not_matter(runs):
    np.testing.assert_allclose(
        _weights(runs["relabelled"]), _weights(runs["dataset"]), atol=SAME)


def test_weight_zero_examples_still_have_their_predictions_stored(runs):
    # A weight scales what an example teaches, not what the network predicts.
    model = runs["dataset"]
    np.testing.assert_array_equal(model.soft_target_valid.numpy(), np.ones(N))
    np.testing.assert_allclose(model.soft_target_table.numpy().sum(-1), 1.0, atol=1e-5)


def test_logged_terms_are_the_weighted_objective():
    # lr 0 and no decay freeze the weights, so the step's forward pass can be
    # recomputed afterwards (same batch, same batch-norm statistics).
    images, labels = learnable_arrays(BATCH, NUM_CLASSES, size=SIZE, seed=2)
    weights = np.random.default_rng(0).uniform(0, 2, BATCH).astype("float32")
    weights[:3] = 0.0
    config = {"byot_lambda": 0.01}
    model = _model(n=BATCH, lr=0.0, weight_decay=0.0, **config)
    logs = model.fit(_dataset(images, labels, weights), epochs=1, verbose=0).history
    outputs = model(images, training=True)
    # Epoch 0 trains on one-hot targets.
    expected = losses.selfkd_loss(
        outputs["logits"], outputs["features"], tf.constant(labels),
        SelfKDConfig(**config), sample_weight=tf.constant(weights))
    for name in ("ce", "byot", "dmfl"):
        assert logs[name][0] == pytest.approx(float(expected[name]), rel=1e-5), name
    assert logs["loss"][0] == pytest.approx(float(expected["total"]), rel=1e-5)
    # The deepest exit's CE written out: sum_j w_j (-log p_j[y_j]) / B.
    logits = outputs["logits"][-1].numpy().astype(np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = np.sum(weights * -log_p[np.arange(BATCH), labels]) / BATCH
    assert logs["ce"][0] == pytest.approx(ce, rel=1e-5)
    # Accuracies are unweighted, as Keras's compile(metrics=...) are.
    accuracy = np.mean(np.argmax(logits, -1) == labels)
    assert logs["exit2_accuracy"][0] == pytest.approx(accuracy)


def test_evaluation_weighs_its_loss_over_every_example():
    n = 20  # batches of 16 and 4
    images, labels = learnable_arrays(n, NUM_CLASSES, size=SIZE, seed=4)
    weights = np.linspace(0.0, 2.0, n).astype("float32")
    model = _model(n=n)
    scores = model.evaluate(_dataset(images, labels, weights), return_dict=True, verbose=0)
    logits = model.predict(images, verbose=0)["logits"][-1].astype(np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -log_p[np.arange(n), labels]
    # The deepest exit's cross-entropy with the labels, over every example;
    # the loss adds the other terms, weighted alike.
    assert scores["ce"] == pytest.approx(np.sum(weights * nll) / n, rel=1e-5)
    assert scores["loss"] == pytest.approx(scores["ce"] + scores["byot"] + scores["dmfl"],
                                           rel=1e-5)
    assert scores["exit2_accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
    arrays = model.evaluate(_inputs(images), labels, sample_weight=weights,
                            batch_size=BATCH, return_dict=True, verbose=0)
    assert arrays["loss"] == pytest.approx(scores["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def untrained():
    return _model()


@pytest.mark.parametrize("class_weight, problem", [
    ({4: 1.0}, "class ids in \\[0, 4\\)"),
    ({-1: 1.0}, "class ids"),
    ({"cat": 1.0}, "class ids"),
    ({1.0: 2.0}, "class ids"),
    ({0: -1.0}, "finite numbers >= 0"),
    ({0: float("nan")}, "finite numbers >= 0"),
    ({0: "heavy"}, "finite numbers >= 0"),
    ([1.0, 2.0], "expected a dict"),
])
def test_bad_class_weight_is_refused(untrained, class_weight, problem):
    images, labels = learnable_arrays(BATCH, NUM_CLASSES, size=SIZE)
    with pytest.raises(ValueError, match=f"class_weight: .*{problem}"):
        untrained.fit(_dataset(images, labels), class_weight=class_weight, verbose=0)
    assert int(untrained.optimizer.iterations.numpy()) == 0


@pytest.mark.parametrize("argument", ["loss", "metrics", "weighted_metrics", "loss_weights"])
def test_compiled_losses_and_metrics_are_refused(untrained, argument):
    with pytest.raises(ValueError, match=f"{argument}: SelfKDModel computes its own"):
        untrained.compile(optimizer="sgd", **{argument: ["accuracy"]})


def test_one_hot_and_out_of_range_labels_are_refused():
    images, labels = learnable_arrays(BATCH, NUM_CLASSES, size=SIZE)
    model = _model(n=BATCH)
    one_hot = np.eye(NUM_CLASSES, dtype="float32")[labels]
    with pytest.raises(ValueError, match="labels: .*one class id per example"):
        model.fit(_dataset(images, one_hot), verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="class ids must be in"):
        model.fit(_dataset(images, labels + 1), verbose=0)  # 1-based labels
