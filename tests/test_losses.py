"""The objective's terms against numpy arithmetic, and where gradient flows."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.distillation.config import METHODS, SelfKDConfig
from selfkd_tf.distillation import losses
from selfkd_tf.distillation import pskd

B, C, D, N = 4, 5, 6, 3


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _ce(z, t):
    return -np.sum(t * np.log(_softmax(z)), axis=-1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    logits = [rng.normal(size=(B, C)) for _ in range(N)]
    features = [np.abs(rng.normal(size=(B, D))) for _ in range(N)]
    labels = np.array([0, 3, 4, 1])
    teacher = _softmax(rng.normal(size=(B, C)))
    return logits, features, labels, teacher


def _numpy_objective(logits, features, labels, teacher, alpha_t, config, valid=None,
                     weights=None, global_batch=B):
    """The objective written out independently of the implementation.

    ``weights`` scale every example's contribution; averages divide by
    ``global_batch`` (Keras's "sum_over_batch_size").
    """
    w = np.ones(B) if weights is None else weights

    def average(per_example):
        return np.sum(w * per_example) / global_batch

    one_hot = np.eye(C)[labels]
    if config.uses("pskd"):
        mix = alpha_t * (np.ones(B) if valid is None else valid)[:, None]
        target = (1 - mix) * one_hot + mix * teacher
    else:
        target = one_hot
    ce = average(_ce(logits[-1], target))
    byot = 0.0
    if config.uses("byot"):
        a, t, lam = config.byot_alpha, config.temperature, config.byot_lambda
        exits = config.byot_exits or tuple(range(1, N))
        byot += (1 - a) * average(_ce(logits[-1], target))
        for i in exits:
            byot += (1 - a) * average(_ce(logits[i - 1], target))
            byot += a * t * t * average(
                _kl(_softmax(logits[-1] / t), _softmax(logits[i - 1] / t)))
            byot += lam * np.sum(w[:, None] * (features[i - 1] - features[-1]) ** 2)
    dmfl = 0.0
    if config.uses("dmfl"):
        q_deep = _softmax(features[-1])
        for f in features[:-1]:
            q = _softmax(f)
            dmfl += average(_kl(q, q_deep) + _kl(q_deep, q))
        dmfl /= N - 1
    return {"ce": ce, "byot": byot, "dmfl": dmfl, "total": ce + byot + dmfl}


def _tf(xs):
    return [tf.constant(x, tf.float32) for x in xs]


ALL_COMBINATIONS = [
    combo for r in range(4) for combo in itertools.combinations(METHODS, r)
]


WEIGHTS = np.array([0.0, 1.5, 0.25, 1.0])


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("methods", ALL_COMBINATIONS, ids=lambda m: "+".join(m) or "baseline")
def test_every_method_combination_matches_numpy(batch, methods, weighted):
    logits, features, labels, teacher = batch
    # A large lambda makes the hint term visible at float32 precision.
    config = SelfKDConfig(methods=methods, byot_lambda=0.01)
    # Weighted: as one of two replicas sees its part of a global batch of 2B.
    weighting = {"global_batch_size": 2.0 * B,
                 "sample_weight": tf.constant(WEIGHTS, tf.float32)} if weighted else {}
    terms = losses.selfkd_loss(
        _tf(logits), _tf(features), tf.constant(labels), config,
        teacher_probs=tf.constant(teacher, tf.float32), alpha_t=0.3, **weighting,
    )
    expected = _numpy_objective(
        logits, features, labels, teacher, 0.3, config,
        **({"weights": WEIGHTS, "global_batch": 2 * B} if weighted else {}))
    for name, value in expected.items():
        np.testing.assert_allclose(float(terms[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert (float(terms["byot"]) > 0) == ("byot" in methods)
    assert (float(terms["dmfl"]) > 0) == ("dmfl" in methods)


def test_unit_weights_give_the_unweighted_objective(batch):
    logits, features, labels, teacher = batch
    config = SelfKDConfig(byot_lambda=0.01)
    args = (_tf(logits), _tf(features), tf.constant(labels), config)
    plain = losses.selfkd_loss(*args)
    ones = losses.selfkd_loss(*args, sample_weight=tf.ones([B]))
    for name in ("ce", "byot", "dmfl", "total"):
        assert float(ones[name]) == float(plain[name]), name


def test_out_of_range_labels_are_refused():
    # tf.one_hot would give an all-zero target, a loss of 0, without a word.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"class ids must be in \[0, 3\)"):
        pskd.soft_targets(tf.constant([0, 3]), 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="class ids"):
        pskd.soft_targets(tf.constant([-1, 0]), 3)


def test_hand_computed_two_class_case():
    # Two classes, one sample: z_N = [0, 0] -> P_N = [0.5, 0.5];
    # label 0, teacher [0.2, 0.8], a_t = 0.5 -> y_soft = [0.6, 0.4];
    # CE = -(0.6 log 0.5 + 0.4 log 0.5) = log 2.
    terms = losses.selfkd_loss(
        [tf.zeros([1, 2]), tf.zeros([1, 2])], [tf.ones([1, 3]), tf.ones([1, 3])],
        tf.constant([0]), SelfKDConfig(methods=("pskd",)),
        teacher_probs=tf.constant([[0.2, 0.8]]), alpha_t=0.5,
    )
    assert float(terms["ce"]) == pytest.approx(np.log(2), rel=1e-6)
    targets = pskd.soft_targets(tf.constant([0]), 2, tf.constant([[0.2, 0.8]]), 0.5)
    np.testing.assert_allclose(targets.numpy(), [[0.6, 0.4]], rtol=1e-6)


def test_kl_hand_value():
    # KL([0.5, 0.5] || [0.25, 0.75]) = 0.5 log 2 + 0.5 log(2/3)
    value = losses.kl_divergence(tf.math.log([[0.5, 0.5]]), tf.math.log([[0.25, 0.75]]))
    assert float(value[0]) == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3), rel=1e-5)


def test_invalid_teacher_rows_fall_back_to_one_hot(batch):
    logits, features, labels, teacher = batch
    valid = np.array([1.0, 0.0, 1.0, 0.0])
    config = SelfKDConfig(methods=("pskd",))
    terms = losses.selfkd_loss(
        _tf(logits), _tf(features), tf.constant(labels), config,
        teacher_probs=tf.constant(teacher, tf.float32), alpha_t=0.7,
        teacher_valid=tf.constant(valid),
    )
    expected = _numpy_objective(logits, features, labels, teacher, 0.7, config, valid)
    assert float(terms["ce"]) == pytest.approx(expected["ce"], rel=1e-5)


@pytest.mark.parametrize("exits", [(1, 2), (2,), (1,)])
def test_byot_exit_selection(batch, exits):
    logits, features, labels, teacher = batch
    config = SelfKDConfig(methods=("byot",), byot_exits=exits, byot_lambda=0.01)
    terms = losses.selfkd_loss(_tf(logits), _tf(features), tf.constant(labels), config)
    expected = _numpy_objective(logits, features, labels, teacher, 0.0, config)
    assert float(terms["byot"]) == pytest.approx(expected["byot"], rel=1e-5)


def test_byot_exits_beyond_network_are_rejected(batch):
    logits, features, labels, _ = batch
    with pytest.raises(ValueError, match="byot_exits"):
        losses.selfkd_loss(
            _tf(logits), _tf(features), tf.constant(labels),
            SelfKDConfig(methods=("byot",), byot_exits=(3,)),
        )


def test_hint_is_summed_over_batch_not_averaged():
    features = [tf.ones([8, 2]), tf.zeros([8, 2])]
    logits = [tf.zeros([8, 3])] * 2
    config = SelfKDConfig(methods=("byot",), byot_lambda=1.0)
    terms = losses.byot_terms(logits, features, tf.one_hot([0] * 8, 3), config, 8.0)
    # 8 samples x 2 channels x (1 - 0)^2
    assert float(terms["byot_hint"]) == pytest.approx(16.0)


def test_global_batch_size_divides_averages(batch):
    logits, features, labels, teacher = batch
    config = SelfKDConfig(methods=("byot", "dmfl"), byot_lambda=0.0)
    local = losses.selfkd_loss(_tf(logits), _tf(features), tf.constant(labels), config)
    half = losses.selfkd_loss(
        _tf(logits), _tf(features), tf.constant(labels), config,
        global_batch_size=2.0 * B,
    )
    for name in ("ce", "byot", "dmfl"):
        assert float(half[name]) == pytest.approx(float(local[name]) / 2, rel=1e-6)


def _gradients(terms_fn, logits, features):
    logits, features = _tf(logits), _tf(features)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits + features)
        value = terms_fn(logits, features)
    return (
        [tape.gradient(value, z) for z in logits],
        [tape.gradient(value, f) for f in features],
    )


def _is_zero(g):
    return g is None or float(tf.reduce_max(tf.abs(g))) == 0.0


def test_byot_kl_and_hint_give_no_gradient_to_the_deepest_exit(batch):
    logits, features, labels, _ = batch
    config = SelfKDConfig(methods=("byot",), byot_lambda=1.0)
    targets = pskd.soft_targets(tf.constant(labels), C)
    for term in ("byot_kl", "byot_hint"):
        dz, df = _gradients(
            lambda z, f: losses.byot_terms(z, f, targets, config, float(B))[term],
            logits, features,
        )
        assert _is_zero(dz[-1]) and _is_zero(df[-1]), term
        shallow = dz[:-1] if term == "byot_kl" else df[:-1]
        assert all(not _is_zero(g) for g in shallow), term
    dz, _ = _gradients(
        lambda z, f: losses.byot_terms(z, f, targets, config, float(B))["byot_ce"],
        logits, features,
    )
    assert all(not _is_zero(g) for g in dz)


def test_byot_kl_gradient_matches_numpy(batch):
    logits, features, labels, _ = batch
    config = SelfKDConfig(methods=("byot",), byot_exits=(1,), byot_alpha=0.5, temperature=2.0)
    targets = pskd.soft_targets(tf.constant(labels), C)
    dz, _ = _gradients(
        lambda z, f: losses.byot_terms(z, f, targets, config, float(B))["byot_kl"],
        logits, features,
    )
    # d/dz_i [a T^2 KL(p_N^T || p_i^T)] / B = a T (p_i^T - p_N^T) / B
    expected = 0.5 * 2.0 * (
        _softmax(logits[0] / 2.0) - _softmax(logits[-1] / 2.0)
    ) / B
    np.testing.assert_allclose(dz[0].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_dmfl_mutual_gradient_reaches_both_sides(batch):
    _, features, _, _ = batch
    logits = [np.zeros((B, C))] * N
    _, df = _gradients(lambda z, f: losses.dmfl_loss(f, "mutual"), logits, features)
    assert all(not _is_zero(g) for g in df)
    # The shallow side gets gradient only from KL(sg(q_N) || q_i):
    # d/df_i = (q_i - q_N) / (B (N - 1)).
    expected = (_softmax(features[0]) - _softmax(features[-1])) / (B * (N - 1))
    np.testing.assert_allclose(df[0].numpy(), expected, rtol=1e-4, atol=1e-7)


def test_dmfl_none_passes_no_gradient_but_keeps_value(batch):
    _, features, _, _ = batch
    logits = [np.zeros((B, C))] * N
    _, df = _gradients(lambda z, f: losses.dmfl_loss(f, "none"), logits, features)
    assert all(_is_zero(g) for g in df)
    mutual = losses.dmfl_loss(_tf(features), "mutual")
    none = losses.dmfl_loss(_tf(features), "none")
    assert float(none) == pytest.approx(float(mutual))


def test_pskd_teacher_gets_no_gradient(batch):
    logits, features, labels, teacher = batch
    teacher = tf.constant(teacher, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(teacher)
        terms = losses.selfkd_loss(
            _tf(logits), _tf(features), tf.constant(labels),
            SelfKDConfig(methods=("pskd",)), teacher_probs=tf.stop_gradient(teacher),
            alpha_t=0.5,
        )
    assert tape.gradient(terms["total"], teacher) is None


def test_weights_scale_each_examples_gradient(batch):
    # Every term is a sum of per-example parts, each reading only its own
    # rows, so d(weighted)/d(row j) = w_j d(unweighted)/d(row j) for logits
    # and features alike; a zero-weight example gets exactly none.
    logits, features, labels, teacher = batch
    config = SelfKDConfig(byot_lambda=0.01)

    def objective(weights):
        return lambda z, f: losses.selfkd_loss(
            z, f, tf.constant(labels), config, teacher_probs=tf.constant(teacher, tf.float32),
            alpha_t=0.5, sample_weight=weights)["total"]

    weighted = _gradients(objective(tf.constant(WEIGHTS, tf.float32)), logits, features)
    plain = _gradients(objective(None), logits, features)
    for got, reference in zip(weighted[0] + weighted[1], plain[0] + plain[1]):
        np.testing.assert_allclose(
            got.numpy(), WEIGHTS[:, None] * reference.numpy(), rtol=1e-5, atol=1e-7)
        assert np.all(got.numpy()[WEIGHTS == 0] == 0.0)


def test_teacher_probabilities(batch):
    logits, *_ = batch
    deepest = pskd.teacher_probabilities(_tf(logits), "deepest")
    ensemble = pskd.teacher_probabilities(_tf(logits), "ensemble")
    np.testing.assert_allclose(deepest.numpy(), _softmax(logits[-1]), rtol=1e-5)
    np.testing.assert_allclose(
        ensemble.numpy(), np.mean([_softmax(z) for z in logits], axis=0), rtol=1e-5
    )


def test_alpha_schedule():
    assert pskd.pskd_alpha_at(0, 4, 0.8) == pytest.approx(0.2)
    assert pskd.pskd_alpha_at(3, 4, 0.8) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"methods": ("pskd", "mixup")}, "methods"),
        ({"pskd_teacher": "best"}, "pskd_teacher"),
        ({"dmfl_gradient": "half"}, "dmfl_gradient"),
        ({"pskd_alpha": 1.5}, "pskd_alpha"),
        ({"temperature": 0}, "temperature"),
        ({"byot_exits": (0,)}, "byot_exits"),
    ],
)
def test_config_rejects_bad_values(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SelfKDConfig(**kwargs)


def test_config_round_trip_and_canonical_order():
    config = SelfKDConfig(methods=("dmfl", "pskd"), byot_exits=(3, 2))
    assert config.methods == ("pskd", "dmfl")
    assert SelfKDConfig.from_config(config.get_config()) == config
