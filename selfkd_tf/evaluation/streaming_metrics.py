"""Streaming Keras metrics: ECE and NLL accumulated batch by batch.

They equal `selfkd_tf.metrics.scores.expected_calibration_error` and
`selfkd_tf.metrics.scores.negative_log_likelihood` on the concatenated batches
(same bins, same first-maximum prediction rule, same clip), so a model
compiled with them reports during `fit` what `selfkd-eval` reports after it.
Top-k accuracy is already streamed by
`keras.metrics.SparseTopKCategoricalAccuracy`.
"""

import keras
from keras import ops

from selfkd_tf.metrics.scores import NLL_EPSILON, bin_edges


def _sparse_labels(y_true):
    """`[batch]` or `[batch, 1]` labels -> int32 `[batch]`."""
    return ops.reshape(ops.cast(y_true, "int32"), (-1,))


def _true_class_probability(labels, y_pred):
    """`p_iy` for int32 labels `[batch]` and probabilities `[batch, C]`."""
    return ops.take_along_axis(y_pred, labels[:, None], axis=-1)[:, 0]


@keras.saving.register_keras_serializable(package="selfkd_tf")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Streaming expected calibration error, in percent.

    Accumulates, for each equal-width confidence bin `((b - 1) / M, b / M]`,
    the (weighted) sample count, the sum of confidences and the number of
    correct predictions, and returns

    `ECE = 100 * sum_b |correct_sum_b - confidence_sum_b| / sum_b count_b`,

    which equals `expected_calibration_error` on the concatenated batches
    (same bins, same first-maximum prediction rule, confidence 0 in the first
    bin). `sample_weight` scales each sample's contribution, so integer
    weights act as repetitions.

    Args:
        num_bins: Number of bins `M`.
        name: Name of the metric instance.
        dtype: Dtype of the accumulators and of the result.

    Example:

    >>> m = ExpectedCalibrationError(num_bins=2)
    >>> m.update_state([0], [[0.9, 0.1]])
    >>> m.update_state([0], [[0.35, 0.65]])
    >>> round(float(m.result()), 4)
    27.5

    Usage with `compile()`, on a model whose output is a softmax:

    ```python
    model.compile(loss="sparse_categorical_crossentropy",
                  metrics=[ExpectedCalibrationError()])
    ```
    """

    def __init__(self, num_bins: int = 10, name: str = "ece", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_bins = num_bins
        # Lower is better (used e.g. by callbacks monitoring this metric).
        self._direction = "down"
        self._inner_edges = bin_edges(num_bins)[1:-1]
        self.count = self.add_variable(
            shape=(num_bins,), initializer="zeros", name="count"
        )
        self.confidence_sum = self.add_variable(
            shape=(num_bins,), initializer="zeros", name="confidence_sum"
        )
        self.correct_sum = self.add_variable(
            shape=(num_bins,), initializer="zeros", name="correct_sum"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch of integer labels and `[batch, C]` probabilities."""
        y_pred = ops.cast(y_pred, self.dtype)
        labels = _sparse_labels(y_true)
        confidence = ops.max(y_pred, axis=-1)
        # First-maximum rule of `_label_rank`: correct iff no class has a
        # higher probability than the true one and no lower-index class
        # ties with it (ops.argmax leaves ties unspecified).
        true_prob = _true_class_probability(labels, y_pred)[:, None]
        lower_index = ops.arange(ops.shape(y_pred)[-1])[None, :] < labels[:, None]
        beaten = ops.logical_or(
            y_pred > true_prob,
            ops.logical_and(y_pred == true_prob, lower_index),
        )
        correct = ops.cast(ops.logical_not(ops.any(beaten, axis=-1)), self.dtype)
        inner_edges = ops.convert_to_tensor(self._inner_edges, self.dtype)
        bins = ops.sum(
            ops.cast(confidence[:, None] > inner_edges[None, :], "int32"), axis=-1
        )
        one_hot = ops.one_hot(bins, self.num_bins, dtype=self.dtype)
        weight = (
            ops.ones_like(confidence)
            if sample_weight is None
            else ops.reshape(ops.cast(sample_weight, self.dtype), (-1,))
        )
        weighted = one_hot * weight[:, None]
        self.count.assign_add(ops.sum(weighted, axis=0))
        self.confidence_sum.assign_add(
            ops.sum(weighted * confidence[:, None], axis=0)
        )
        self.correct_sum.assign_add(ops.sum(weighted * correct[:, None], axis=0))

    def result(self):
        gap = ops.sum(ops.abs(self.correct_sum - self.confidence_sum))
        return 100.0 * ops.divide_no_nan(gap, ops.sum(self.count))

    def get_config(self):
        return {**super().get_config(), "num_bins": self.num_bins}


@keras.saving.register_keras_serializable(package="selfkd_tf")
class NegativeLogLikelihood(keras.metrics.Mean):
    """Streaming mean negative log-likelihood of probabilities, in nats.

    `NLL = -sum_i w_i * log(max(p_iy, eps)) / sum_i w_i` with
    `eps = NLL_EPSILON`; equals `negative_log_likelihood` on the concatenated
    batches. Unlike `keras.metrics.SparseCategoricalCrossentropy`, the
    predictions are not renormalised and the clip is 1e-12, not 1e-7.

    Args:
        name: Name of the metric instance.
        dtype: Dtype of the accumulators and of the result.

    Example:

    >>> m = NegativeLogLikelihood()
    >>> m.update_state([0, 1], [[0.5, 0.5], [0.25, 0.75]])
    >>> round(float(m.result()), 4)
    0.4904
    """

    def __init__(self, name: str = "nll", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self._direction = "down"

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch of integer labels and `[batch, C]` probabilities."""
        true_prob = _true_class_probability(
            _sparse_labels(y_true), ops.cast(y_pred, self.dtype)
        )
        values = -ops.log(ops.maximum(true_prob, NLL_EPSILON))
        return super().update_state(values, sample_weight=sample_weight)
