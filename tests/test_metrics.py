"""Metrics against small cases worked out by hand, and streaming == numpy."""

import doctest
import json
import math
import os

import keras
import numpy as np
import pytest

from selfkd_tf.metrics import scores as metrics

from selfkd_tf.metrics import record as metrics_record

from selfkd_tf.evaluation import streaming_metrics
from selfkd_tf.metrics.scores import (
    METRIC_KEYS,
    aurc,
    classification_metrics,
    eaurc,
    expected_calibration_error,
    multi_exit_metrics,
    negative_log_likelihood,
    reliability_bins,
    top_k_error,
)
from selfkd_tf.metrics.record import build_metrics_record, write_metrics_json
from selfkd_tf.evaluation.streaming_metrics import ExpectedCalibrationError, NegativeLogLikelihood


def two_class(confidences, correct):
    """Binary probabilities with the given max-probabilities.

    Class 0 gets the confidence, so the prediction is class 0 (confidence
    0.5 ties and also predicts class 0); the label is 0 when `correct`.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    probs = np.stack([conf, 1.0 - conf], axis=1)
    labels = np.where(correct, 0, 1)
    return probs, labels


@pytest.mark.parametrize("module", [metrics, metrics_record, streaming_metrics])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs=vars(module))
    assert result.attempted > 0
    assert result.failed == 0


# -- top-k error ---------------------------------------------------------


def test_top_k_error_by_hand():
    probs = [[0.1, 0.6, 0.3],  # label 1: ranked 1st
             [0.5, 0.2, 0.3],  # label 2: 0.5 above it -> ranked 2nd
             [0.2, 0.2, 0.6]]  # label 2: ranked 1st
    labels = [1, 2, 2]
    assert top_k_error(probs, labels, k=1) == pytest.approx(100 / 3)
    assert top_k_error(probs, labels, k=2) == 0.0


def test_top_k_error_ties_go_to_lower_class_index():
    probs = [[0.4, 0.4, 0.2]]
    # Class 0 ties with class 1 and has the lower index: it is the top-1.
    assert top_k_error(probs, [0], k=1) == 0.0
    assert top_k_error(probs, [1], k=1) == 100.0
    assert top_k_error(probs, [1], k=2) == 0.0
    # Label 2 of [0.5, 0.25, 0.25]: 0.5 above it, class 1 tied with a lower
    # index -> rank 2, outside the top 2 (tf.math.in_top_k would count it).
    assert top_k_error([[0.5, 0.25, 0.25]], [2], k=2) == 100.0
    assert top_k_error([[0.5, 0.25, 0.25]], [1], k=2) == 0.0


def test_top1_error_matches_argmax_with_many_ties():
    rng = np.random.default_rng(0)
    # Probabilities on a coarse grid so that rows tie often.
    probs = rng.integers(0, 4, size=(500, 6)).astype(np.float64) + 1e-3
    labels = rng.integers(0, 6, size=500)
    expected = 100.0 * np.mean(np.argmax(probs, axis=1) != labels)
    assert top_k_error(probs, labels, k=1) == pytest.approx(expected)


def test_top_k_error_all_correct_all_wrong_one_sample():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]
    assert top_k_error(probs, [0, 1]) == 0.0
    assert top_k_error(probs, [2, 2]) == 100.0
    assert top_k_error([[0.3, 0.7]], [1]) == 0.0
    assert top_k_error([[0.3, 0.7]], [0]) == 100.0


def test_top_k_error_class_never_predicted():
    # Class 2 is never the argmax; its one sample is an error: 1 / 3.
    probs = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]]
    assert top_k_error(probs, [0, 1, 2]) == pytest.approx(100 / 3)
    # ...but it is 2nd in the last row, so top-2 has no error.
    assert top_k_error(probs, [0, 1, 2], k=2) == 0.0


def test_top5_with_fewer_than_five_classes_is_zero():
    # C = 3: k is clipped to 3 and every label is in the top 3.
    probs = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    assert top_k_error(probs, [2, 0], k=1) == 100.0
    assert top_k_error(probs, [2, 0], k=5) == 0.0
    assert classification_metrics(probs, [2, 0])["top5_err"] == 0.0


def test_top_k_error_rejects_k_below_one():
    with pytest.raises(ValueError, match="k"):
        top_k_error([[0.5, 0.5]], [0], k=0)


# -- NLL -----------------------------------------------------------------


def test_nll_by_hand():
    # -(log 0.5 + log 0.75) / 2 = (0.693147 + 0.287682) / 2
    assert negative_log_likelihood([[0.5, 0.5], [0.25, 0.75]], [0, 1]) == (
        pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    )
    assert negative_log_likelihood([[1.0, 0.0]], [0]) == 0.0


def test_nll_clips_zero_probability():
    # p_true = 0 -> -log(1e-12) = 12 log 10 = 27.631...; mean with a sample
    # of p_true = 1 (loss 0) halves it.
    assert negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(
        12 * math.log(10))
    assert negative_log_likelihood([[1.0, 0.0], [1.0, 0.0]], [1, 0]) == (
        pytest.approx(6 * math.log(10)))


def test_labels_of_shape_n_by_1_are_accepted():
    probs = [[0.5, 0.5], [0.25, 0.75]]
    assert negative_log_likelihood(probs, [[0], [1]]) == (
        negative_log_likelihood(probs, [0, 1]))


@pytest.mark.parametrize(
    "probs, labels, message",
    [
        ([0.5, 0.5], [0], "shape"),
        (np.zeros((0, 3)), np.zeros(0, int), "shape"),
        ([[0.5, np.nan]], [0], "NaN"),
        ([[0.5, 0.5]], [0.0], "integers"),
        ([[0.5, 0.5]], [0, 1], "rows"),
        ([[0.5, 0.5]], [2], r"\[0, 2\)"),
        ([[0.5, 0.5]], [-1], r"\[0, 2\)"),
    ],
)
def test_invalid_inputs_raise(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(probs, labels)


# -- ECE and reliability bins -----------------------------------------------


def test_ece_by_hand():
    # confidence, correct -> bin:
    #   0.95 yes -> (0.9, 1.0]: |1 - 0.95| = 0.05, weight 1/4
    #   0.85 no  -> (0.8, 0.9]: acc 1/2, conf 0.85 -> 0.35, weight 2/4
    #   0.85 yes -> (0.8, 0.9]
    #   0.55 yes -> (0.5, 0.6]: |1 - 0.55| = 0.45, weight 1/4
    # ECE = 0.0125 + 0.175 + 0.1125 = 0.3 -> 30 %
    probs, labels = two_class([0.95, 0.85, 0.85, 0.55], [1, 0, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(30.0)
    bins = reliability_bins(probs, labels)
    np.testing.assert_array_equal(bins.count, [0, 0, 0, 0, 0, 1, 0, 0, 2, 1])
    np.testing.assert_allclose(bins.accuracy[[5, 8, 9]], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(bins.confidence[[5, 8, 9]], [0.55, 0.85, 0.95])
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.confidence[0])
    np.testing.assert_allclose(bins.edges, np.arange(11) / 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confidences_on_bin_edges_fall_in_the_lower_bin(dtype):
    # Bins are (lo, hi]: 0.3 -> (0.2, 0.3] (index 2), 0.6 -> index 5,
    # 0.7 -> index 6, 1.0 -> index 9, 0.5 (a tie) -> (0.4, 0.5] (index 4).
    probs = np.array([[0.3, 0.3, 0.3, 0.1], [0.6, 0.4, 0, 0], [0.3, 0.7, 0, 0],
                      [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]], dtype=dtype)
    bins = reliability_bins(probs, [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(bins.count, [0, 0, 1, 0, 1, 1, 1, 0, 0, 1])


def test_zero_confidence_counts_in_the_first_bin():
    # A row of zeros has confidence 0; it goes to bin 1 (not dropped) and is
    # predicted as class 0, i.e. correct: ECE = |1 - 0| = 100 %.
    probs = np.zeros((1, 3))
    assert reliability_bins(probs, [0]).count.tolist() == [1] + [0] * 9
    assert expected_calibration_error(probs, [0]) == 100.0


def test_ece_all_correct_all_wrong_one_sample():
    probs, labels = two_class([1.0, 1.0], [1, 1])
    assert expected_calibration_error(probs, labels) == 0.0
    # All wrong at confidence 0.8: |0 - 0.8| = 80 %.
    probs, labels = two_class([0.8, 0.8], [0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(80.0)
    # One sample, correct, confidence 0.7: |1 - 0.7| = 30 %.
    probs, labels = two_class([0.7], [1])
    assert expected_calibration_error(probs, labels) == pytest.approx(30.0)


def test_ece_with_one_bin_is_the_global_gap():
    # Mean confidence (0.9 + 0.6 + 0.7) / 3 = 2.2 / 3, accuracy 2 / 3:
    # 100 * |2 / 3 - 2.2 / 3| = 100 * 0.2 / 3 = 6.667 %.
    probs, labels = two_class([0.9, 0.6, 0.7], [1, 0, 1])
    assert expected_calibration_error(probs, labels, num_bins=1) == (
        pytest.approx(100 * 0.2 / 3))


# -- AURC / E-AURC ------------------------------------------------------------


def test_aurc_and_eaurc_by_hand():
    # Sorted by confidence: 0.9 ok, 0.8 wrong, 0.7 ok, 0.6 wrong.
    # Errors e_k = 0, 1, 1, 2; risks 0, 1/2, 1/3, 1/2; AURC = (4/3) / 4.
    # Oracle (ok, ok, wrong, wrong): risks 0, 0, 1/3, 1/2 -> (5/6) / 4.
    probs, labels = two_class([0.7, 0.6, 0.9, 0.8], [1, 0, 1, 0])
    assert aurc(probs, labels) == pytest.approx(1000 / 3)
    assert eaurc(probs, labels) == pytest.approx(1000 * (1 / 3 - 5 / 24))


def test_aurc_ties_keep_sample_order():
    # Equal confidences: stable sort keeps the input order.
    # wrong then right: risks 1/1, 1/2 -> 0.75; right then wrong: 0, 1/2.
    # Oracle with one error in two: 0, 1/2 -> 0.25.
    probs, labels = two_class([0.7, 0.7], [0, 1])
    assert aurc(probs, labels) == pytest.approx(750.0)
    assert eaurc(probs, labels) == pytest.approx(500.0)
    probs, labels = two_class([0.7, 0.7], [1, 0])
    assert aurc(probs, labels) == pytest.approx(250.0)
    assert eaurc(probs, labels) == pytest.approx(0.0)


def test_aurc_many_ties_keep_sample_order():
    # 60 samples alternating between confidences 0.8 and 0.6. Among the 30 at
    # 0.8, in sample order: 10 wrong then 20 right; among the 30 at 0.6: 20
    # right then 10 wrong. Stable order: 10 wrong, 40 right, 10 wrong, so
    # e_k = k for k <= 10, 10 up to k = 50, then 10 + (k - 50), and
    # AURC = sum_k e_k / k / 60. (numpy's default sort reorders these ties.)
    conf = np.tile([0.8, 0.6], 30)
    rank_in_group = np.arange(60) // 2
    correct = np.where(conf == 0.8, rank_in_group >= 10, rank_in_group < 20)
    probs, labels = two_class(conf, correct)
    k = np.arange(1, 61)
    errors = np.minimum(k, 10) + np.maximum(k - 50, 0)
    assert aurc(probs, labels) == pytest.approx(1000 * np.sum(errors / k) / 60)


def test_aurc_all_correct_all_wrong_one_sample():
    probs, labels = two_class([0.9, 0.6, 0.8], [1, 1, 1])
    assert (aurc(probs, labels), eaurc(probs, labels)) == (0.0, 0.0)
    probs, labels = two_class([0.9, 0.6, 0.8], [0, 0, 0])
    assert (aurc(probs, labels), eaurc(probs, labels)) == (1000.0, 0.0)
    probs, labels = two_class([0.6], [0])
    assert (aurc(probs, labels), eaurc(probs, labels)) == (1000.0, 0.0)


def test_eaurc_is_zero_for_a_perfect_ranking():
    # Correct samples get the higher confidences: the oracle's ranking.
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.7
    conf = np.where(correct, 0.8, 0.55) + 0.1 * rng.random(200)
    probs, labels = two_class(conf, correct)
    assert eaurc(probs, labels) == pytest.approx(0.0, abs=1e-9)
    assert aurc(probs, labels) > 0.0


# -- aggregates -----------------------------------------------------------


def test_classification_metrics_keys_and_types():
    result = classification_metrics([[0.7, 0.3], [0.4, 0.6]], [0, 0])
    assert tuple(result) == METRIC_KEYS
    assert all(type(v) is float for v in result.values())
    assert result["top1_err"] == 50.0


def test_multi_exit_metrics_ensemble_is_mean_probability():
    # Exit 1 right, exit 2 wrong; their mean [0.55, 0.45] is right.
    exit1, exit2 = np.array([[0.9, 0.1]]), np.array([[0.2, 0.8]])
    result = multi_exit_metrics([exit1, exit2], [0])
    assert [e["exit"] for e in result["exits"]] == [1, 2]
    assert [e["top1_err"] for e in result["exits"]] == [0.0, 100.0]
    assert result["ensemble"]["top1_err"] == 0.0
    assert result["ensemble"]["nll"] == pytest.approx(-math.log(0.55))
    assert set(result["ensemble"]) == set(METRIC_KEYS)


def test_multi_exit_metrics_rejects_mismatched_exits():
    with pytest.raises(ValueError, match="shape"):
        multi_exit_metrics([np.ones((2, 3)) / 3, np.ones((2, 4)) / 4], [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        multi_exit_metrics([], [0])


# -- metrics.json ---------------------------------------------------------


def test_build_metrics_record_schema():
    exit1 = np.array([[0.9, 0.1], [0.3, 0.7]])
    exit2 = np.array([[0.95, 0.05], [0.65, 0.35]])
    record = build_metrics_record(
        [exit1, exit2], [0, 0], dataset="cifar100", split="test",
        arch="resnet18", methods="pskd, byot", params=1234,
        train_time_s=100.0, epochs=4)
    assert list(record) == [
        "dataset", "split", "num_examples", "arch", "methods", "num_exits", "exits",
        "ensemble", "train_time_s", "train_time_per_epoch_s", "epochs",
        "params", "reliability"]
    assert record["methods"] == ["pskd", "byot"]
    assert record["num_examples"] == 2
    assert record["num_exits"] == 2
    assert record["train_time_per_epoch_s"] == 25.0
    assert record["exits"][1] == {"exit": 2, **classification_metrics(exit2, [0, 0])}
    assert "exit" not in record["ensemble"]
    # Reliability of the deepest exit: confidences 0.95 (right) and 0.65
    # (right) in bins 10 and 7; the other bins are empty -> null.
    reliability = record["reliability"]
    assert reliability["num_bins"] == 10
    assert reliability["edges"] == pytest.approx([i / 10 for i in range(11)])
    assert reliability["count"] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert reliability["accuracy"][6] == 1.0 and reliability["accuracy"][0] is None
    assert reliability["confidence"][9] == pytest.approx(0.95)
    json.dumps(record, allow_nan=False)  # valid JSON


def test_build_metrics_record_baseline_without_timing():
    probs = np.array([[0.9, 0.1]])
    for methods in ([], "", ","):
        record = build_metrics_record([probs], [0], dataset="d", split="test",
                                      arch="a", methods=methods, params=1)
        assert record["methods"] == []
    assert record["train_time_s"] is None and record["epochs"] is None
    assert record["train_time_per_epoch_s"] is None
    record = build_metrics_record([probs], [0], dataset="d", split="test",
                                  arch="a", methods=[], params=1,
                                  train_time_s=10.0)
    assert record["train_time_per_epoch_s"] is None


def test_write_metrics_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "run" / "metrics.json"
    write_metrics_json({"a": 1}, path)
    write_metrics_json({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["metrics.json"]
    assert path.stat().st_mode & 0o044 == 0o044  # group/other readable
    # An unserialisable record fails before the old file is touched.
    with pytest.raises(ValueError):
        write_metrics_json({"a": float("nan")}, path)
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["metrics.json"]


# -- streaming Keras metrics --------------------------------------------------


@pytest.fixture(scope="module")
def data():
    """203 samples, 7 classes; every third row is a tie on a bin edge."""
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(203, 7))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Rows 0, 3, 6, ...: 0.5 on two random classes (ties, confidence on the
    # edge 0.5) or 1.0 on one (confidence on the edge 1).
    rows = np.arange(0, 203, 3)
    probs[rows] = 0.0
    for column in rng.integers(0, 7, size=(2, rows.size)):
        np.add.at(probs, (rows, column), 0.5)
    labels = rng.integers(0, 7, size=203)
    return probs.astype(np.float32), labels


def stream(metric, probs, labels, batch_sizes, weights=None):
    start = 0
    for size in batch_sizes:
        batch = slice(start, start + size)
        metric.update_state(labels[batch], probs[batch],
                            None if weights is None else weights[batch])
        start += size
    assert start == len(labels)
    return float(metric.result())


@pytest.mark.parametrize("num_bins", [10, 15])
def test_streaming_ece_matches_numpy(data, num_bins):
    probs, labels = data
    expected = expected_calibration_error(probs, labels, num_bins)
    metric = ExpectedCalibrationError(num_bins=num_bins)
    assert stream(metric, probs, labels, [64, 1, 100, 38]) == pytest.approx(
        expected, abs=1e-4)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_streaming_nll_matches_numpy(data):
    probs, labels = data
    expected = negative_log_likelihood(probs, labels)
    metric = NegativeLogLikelihood()
    assert stream(metric, probs, labels, [100, 103]) == pytest.approx(
        expected, rel=1e-5)
    # A zero true-class probability is clipped as in numpy: 12 log 10.
    metric.reset_state()
    metric.update_state([1], [[1.0, 0.0]])
    assert float(metric.result()) == pytest.approx(12 * math.log(10), rel=1e-5)


def test_streaming_sample_weight_acts_as_repetition(data):
    probs, labels = data
    weights = np.arange(len(labels)) % 3  # 0, 1 or 2 copies of each sample
    repeated = np.repeat(np.arange(len(labels)), weights)
    for metric, reference in [
        (ExpectedCalibrationError(), expected_calibration_error),
        (NegativeLogLikelihood(), negative_log_likelihood),
    ]:
        result = stream(metric, probs, labels, [120, 83], weights)
        assert result == pytest.approx(
            reference(probs[repeated], labels[repeated]), rel=1e-5, abs=1e-4)


def test_streaming_metrics_in_compiled_evaluate(data):
    # Smooth rows only: softmax(log p) recovers p up to float32 rounding,
    # which could move a confidence sitting on a bin edge.
    smooth = np.arange(203) % 3 != 0
    probs, labels = data[0][smooth], data[1][smooth]
    # The model outputs the given probabilities: softmax(log p) = p.
    model = keras.Sequential([keras.Input((7,)), keras.layers.Softmax()])
    model.compile(loss="sparse_categorical_crossentropy",
                  metrics=[ExpectedCalibrationError(), NegativeLogLikelihood()])
    logs = model.evaluate(np.log(probs), labels,
                          batch_size=50, verbose=0, return_dict=True)
    assert logs["ece"] == pytest.approx(
        expected_calibration_error(probs, labels), abs=1e-3)
    assert logs["nll"] == pytest.approx(
        negative_log_likelihood(probs, labels), rel=1e-4)


def test_streaming_metrics_serialize():
    for metric in (ExpectedCalibrationError(num_bins=15, name="ece15"),
                   NegativeLogLikelihood(name="val_nll")):
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(metric))
        assert type(restored) is type(metric)
        assert restored.get_config() == metric.get_config()
    assert ExpectedCalibrationError(num_bins=15).get_config()["num_bins"] == 15
