"""The controls: label smoothing ("ls") and deep supervision ("ds"), by hand."""

import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distillation.losses import selfkd_loss
from selfkd_tf.distillation.pskd import soft_targets
from selfkd_tf.errors import SettingsError
from selfkd_tf.experiment.settings import TrainSettings

from support import indexed_dataset, learnable_arrays, tiny_model

B, C, D = 4, 5, 6
LABELS = np.array([0, 3, 1, 4])


def _inputs(seed=0, exits=3):
    rng = np.random.default_rng(seed)
    logits = [tf.constant(rng.normal(size=(B, C)), tf.float32) for _ in range(exits)]
    features = [tf.constant(rng.normal(size=(B, D)), tf.float32) for _ in range(exits)]
    return logits, features


def _numpy_ce(logits, targets):
    z = np.asarray(logits, np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    return -(targets * log_p).sum(1)


def test_label_smoothing_targets_and_loss_by_hand():
    eps = 0.1
    smoothed = np.full((B, C), eps / C)
    smoothed[np.arange(B), LABELS] += 1 - eps
    np.testing.assert_allclose(
        soft_targets(tf.constant(LABELS), C, label_smoothing=eps), smoothed, atol=1e-7)
    logits, features = _inputs()
    terms = selfkd_loss(logits, features, tf.constant(LABELS),
                        SelfKDConfig(methods=("ls",), label_smoothing=eps))
    assert float(terms["ce"]) == pytest.approx(_numpy_ce(logits[-1], smoothed).mean(), rel=1e-6)
    assert float(terms["total"]) == pytest.approx(float(terms["ce"]))
    # The smoothed label is also what every exit learns from under BYOT.
    both = selfkd_loss(logits, features, tf.constant(LABELS),
                       SelfKDConfig(methods=("ls", "byot"), label_smoothing=eps))
    every_ce = sum(_numpy_ce(z, smoothed) for z in logits)
    assert float(both["byot_ce"]) == pytest.approx(0.9 * every_ce.mean(), rel=1e-6)


def test_deep_supervision_is_byot_without_its_distillation_terms():
    logits, features = _inputs(seed=1)
    labels = tf.constant(LABELS)
    byot = selfkd_loss(logits, features, labels, SelfKDConfig(methods=("byot",)))
    ds = selfkd_loss(logits, features, labels, SelfKDConfig(methods=("ds",)))
    assert float(byot["byot_kl"]) > 0 and float(byot["byot_hint"]) > 0
    assert float(ds["byot_kl"]) == 0 and float(ds["byot_hint"]) == 0
    assert float(ds["total"]) == pytest.approx(
        float(byot["total"] - byot["byot_kl"] - byot["byot_hint"]), rel=1e-6)
    # By hand: (1 - a) times every exit's cross-entropy, the deepest twice
    # (once as L_CE, once in BYOT's sum), as BYOT weighs them.
    one_hot = np.eye(C)[LABELS]
    expected = _numpy_ce(logits[-1], one_hot).mean() + 0.9 * sum(
        _numpy_ce(z, one_hot) for z in logits).mean()
    assert float(ds["total"]) == pytest.approx(expected, rel=1e-6)


def test_deep_supervision_passes_no_gradient_to_the_features():
    logits, features = _inputs(seed=2)
    logits, features = [tf.Variable(z) for z in logits], [tf.Variable(f) for f in features]
    with tf.GradientTape() as tape:
        total = selfkd_loss(logits, features, tf.constant(LABELS),
                            SelfKDConfig(methods=("ds",)))["total"]
    gradients = tape.gradient(total, [*logits, *features])
    assert all(g is None for g in gradients[3:])
    # Exit 1's gradient is (1 - a) (softmax - onehot) / B: its cross-entropy only.
    z = logits[0].numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(gradients[0], 0.9 * (p - np.eye(C)[LABELS]) / B, atol=1e-6)


@pytest.mark.parametrize("methods, problem", [
    (("pskd", "ls"), "pskd and ls change the same part"),
    (("byot", "ds"), "byot and ds change the same part"),
])
def test_controls_that_change_what_a_method_changes_are_refused(methods, problem):
    with pytest.raises(ValueError, match=f"^methods: {problem}"):
        SelfKDConfig(methods=methods)
    with pytest.raises(SettingsError) as raised:
        TrainSettings(dataset="digits", methods=methods).validate()
    assert raised.value.flag == "methods"


@pytest.mark.parametrize("eps", [-0.1, 1.0, float("nan")])
def test_label_smoothing_outside_zero_to_one_is_refused(eps):
    with pytest.raises(ValueError, match="^label_smoothing: must be in"):
        SelfKDConfig(methods=("ls",), label_smoothing=eps)


def test_deep_supervision_trains_the_shallow_exits_and_label_smoothing_does_not():
    images, labels = learnable_arrays(16, 4, size=8)
    data = indexed_dataset(images, labels, batch_size=8)

    def head_change(methods):
        model = tiny_model(4, 16, image_size=8, seed=0,
                           config=SelfKDConfig(methods=methods), weight_decay=0.0)
        model.compile(optimizer="sgd")
        model(images[:1])
        head = [w for w in model.backbone.trainable_weights if "exit1_logits" in w.path]
        before = [w.numpy().copy() for w in head]
        model.fit(data, epochs=1, verbose=0)
        return max(float(np.abs(w.numpy() - b).max()) for w, b in zip(head, before))

    assert head_change(("ds",)) > 0
    assert head_change(("ls",)) == 0
