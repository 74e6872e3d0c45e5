"""Classification and calibration metrics used to evaluate multi-exit models.

The definitions follow the evaluation of PS-KD (Kim et al., "Self-Knowledge
Distillation with Progressive Refinement of Targets", ICCV 2021): top-1 and
top-5 error, negative log-likelihood, expected calibration error (ECE) and the
area under the risk-coverage curve (AURC, with its excess E-AURC).

The functions are plain numpy: they take class probabilities `probs` of shape
`[n, C]` and integer labels of shape `[n]` (or `[n, 1]`, as returned by
`keras.datasets`). Conventions shared by every function:

* The predicted class is the first maximum of a row (`np.argmax`): when
  probabilities tie, the lower class index wins. The same rule ranks classes
  for top-k error, so top-1 correctness is the correctness used by ECE and
  AURC.
* Results are in the units of the PS-KD tables: errors and ECE in percent,
  NLL in nats, AURC and E-AURC multiplied by 1000.

`selfkd_tf.evaluation.streaming_metrics` accumulates ECE and NLL batch by batch as Keras
metrics; `selfkd_tf.metrics.record` writes these metrics as a run's
`metrics.json`.
"""

from typing import NamedTuple, Sequence

import numpy as np

METRIC_KEYS = ("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc")
"""Keys of the dict returned by `classification_metrics`, in table order."""

NLL_EPSILON = 1e-12
"""Lower clip of the true-class probability in the NLL.

A float32 softmax can underflow to exactly 0; clipping at 1e-12 caps one
sample's loss at -log(1e-12) ~= 27.6 nats instead of returning `inf`, and
only changes true-class probabilities below 1e-12. (Keras' epsilon, 1e-7,
would already cap a confident mistake at 16.1 nats.)"""


class NonFiniteProbabilitiesError(ValueError):
    """Probabilities hold NaN or infinite values: a model that diverged."""


def check_inputs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validates `(probs, labels)` and returns them as numpy arrays.

    Raises:
        ValueError: `probs` is not a finite ``[n, C]`` array with ``n, C >= 1``
            (`NonFiniteProbabilitiesError` when it holds NaN or infinity),
            or `labels` not ``n`` integers in ``[0, C)`` (``[n]`` or ``[n, 1]``).

    Floating-point probabilities keep their dtype (bin edges are compared in
    it, see `reliability_bins`); anything else is converted to float64.
    """
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(
            "`probs` must have shape [n, C] with n >= 1 and C >= 1, "
            f"got shape {probs.shape}."
        )
    if not np.all(np.isfinite(probs)):
        raise NonFiniteProbabilitiesError("`probs` contains NaN or infinite values.")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            "`labels` must be integers of shape [n] or [n, 1], got dtype "
            f"{labels.dtype} and shape {labels.shape}."
        )
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"`probs` has {probs.shape[0]} rows but `labels` has "
            f"{labels.shape[0]} entries."
        )
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"`labels` must lie in [0, {probs.shape[1]}), got values in "
            f"[{labels.min()}, {labels.max()}]."
        )
    return probs, labels


def _label_rank(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Position of the true class when classes are sorted by probability.

    `rank_i = #{c : p_ic > p_iy} + #{c < y : p_ic = p_iy}` with `y = labels_i`:
    ties are broken toward the lower class index, so `rank_i == 0` exactly
    when `np.argmax(probs[i]) == labels[i]`.
    """
    true_prob = np.take_along_axis(probs, labels[:, None], axis=1)
    lower_index = np.arange(probs.shape[1])[None, :] < labels[:, None]
    higher = np.sum(probs > true_prob, axis=1)
    tied_before = np.sum((probs == true_prob) & lower_index, axis=1)
    return higher + tied_before


def top_k_error(probs, labels, k: int = 1) -> float:
    """Top-k error in percent.

    `err_k = 100 / n * #{i : rank_i >= min(k, C)}`, where `rank_i` counts the
    classes ranked above the true class, ties going to the lower class index
    (so top-1 error is the error of `np.argmax`). This tie rule differs from
    `tf.math.in_top_k`, which counts every class tied at the k-th value as
    inside the top k.

    `k` is clipped to the number of classes `C`: with `C <= k` every label is
    among the top `C` classes and the error is 0 (e.g. top-5 error on a
    3-class problem).

    Args:
        probs: Class probabilities, shape `[n, C]`.
        labels: Integer labels, shape `[n]`.
        k: Number of top-ranked classes that count as a hit, `k >= 1`.

    Returns:
        The error in percent, in `[0, 100]`.

    Example:

    >>> probs = [[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]
    >>> top_k_error(probs, [2, 1], k=1), top_k_error(probs, [2, 1], k=2)
    (100.0, 50.0)
    """
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    probs, labels = check_inputs(probs, labels)
    hits = _label_rank(probs, labels) < min(k, probs.shape[1])
    return float(100.0 * (1.0 - np.mean(hits)))


def negative_log_likelihood(probs, labels) -> float:
    """Mean negative log-likelihood of the true class, in nats.

    `NLL = -1 / n * sum_i log(max(p_iy, eps))` with `eps = NLL_EPSILON`
    (1e-12), so a true-class probability of exactly 0 costs ~27.6 nats
    instead of infinity.

    Args:
        probs: Class probabilities, shape `[n, C]`.
        labels: Integer labels, shape `[n]`.

    Returns:
        The mean NLL in nats.

    Example:

    >>> round(negative_log_likelihood([[0.5, 0.5], [0.25, 0.75]], [0, 1]), 4)
    0.4904
    """
    probs, labels = check_inputs(probs, labels)
    true_prob = np.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    true_prob = np.maximum(true_prob.astype(np.float64), NLL_EPSILON)
    return float(-np.mean(np.log(true_prob)))


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of a reliability diagram.

    Attributes:
        edges: Bin edges `[0, 1/M, ..., 1]`, float64, shape `[M + 1]`.
        confidence: Mean max-probability of the samples in each bin
            (NaN for an empty bin), shape `[M]`.
        accuracy: Fraction of correct predictions in each bin (NaN for an
            empty bin), shape `[M]`.
        count: Number of samples in each bin, int64, shape `[M]`.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def bin_edges(num_bins: int) -> np.ndarray:
    """Float64 edges `b / M`, `b = 0..M`.

    Each edge is the correctly rounded quotient, i.e. the float nearest to
    `b / M`, which is also what the literal `0.3` denotes; `np.linspace`
    would give `0.30000000000000004` and move such a confidence to the bin
    below it.
    """
    if num_bins < 1:
        raise ValueError(f"`num_bins` must be >= 1, got {num_bins}.")
    return np.arange(num_bins + 1) / num_bins


def _bin_sums(probs, labels, num_bins: int):
    """Returns `(edges, count, confidence_sum, correct_sum)` per bin."""
    edges = bin_edges(num_bins)
    probs, labels = check_inputs(probs, labels)
    confidence = probs.max(axis=1)
    # Compare in the dtype of `probs`, so that float32(0.3) is on the edge
    # float32(3 / 10). Counting the inner edges strictly below a confidence
    # gives its bin (lo, hi], puts 0 in the first bin and values above 1
    # (rounding) in the last one.
    inner_edges = edges[1:-1].astype(probs.dtype)
    bins = np.searchsorted(inner_edges, confidence, side="left")
    correct = _label_rank(probs, labels) == 0
    count = np.bincount(bins, minlength=num_bins)
    confidence_sum = np.bincount(
        bins, weights=confidence.astype(np.float64), minlength=num_bins
    )
    correct_sum = np.bincount(
        bins, weights=correct.astype(np.float64), minlength=num_bins
    )
    return edges, count, confidence_sum, correct_sum


def reliability_bins(probs, labels, num_bins: int = 10) -> ReliabilityBins:
    """Reliability-diagram statistics on equal-width confidence bins.

    Bin `b` (1-based) holds the samples whose confidence `conf_i = max_c p_ic`
    satisfies `(b - 1) / M < conf_i <= b / M` (bins closed on the right, as in
    the PS-KD reference). A confidence of exactly 0, only possible for a row
    of zeros since a probability row has `max >= 1 / C`, is put in the first
    bin so that every sample is counted; the reference would drop it. The
    edges are the floats nearest to `b / M` and are compared in the dtype of
    `probs`, so a confidence of `0.3` (float64 or float32) is on the edge
    `3 / 10` and belongs to `(0.2, 0.3]`.

    `confidence_b = mean_{i in b} conf_i`, `accuracy_b = mean_{i in b}
    [argmax_c p_ic = y_i]`, both NaN when the bin is empty.

    Args:
        probs: Class probabilities, shape `[n, C]`.
        labels: Integer labels, shape `[n]`.
        num_bins: Number of bins `M`.

    Returns:
        A `ReliabilityBins` tuple.

    Example:

    >>> bins = reliability_bins([[0.9, 0.1], [0.35, 0.65]], [0, 0], num_bins=2)
    >>> bins.count.tolist(), bins.accuracy.tolist()
    ([0, 2], [nan, 0.5])
    """
    edges, count, confidence_sum, correct_sum = _bin_sums(
        probs, labels, num_bins
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = confidence_sum / count
        accuracy = correct_sum / count
    return ReliabilityBins(edges, confidence, accuracy, count.astype(np.int64))


def expected_calibration_error(probs, labels, num_bins: int = 10) -> float:
    """Expected calibration error in percent.

    `ECE = 100 * sum_b (n_b / n) * |accuracy_b - confidence_b|
         = 100 / n * sum_b |sum_{i in b} (correct_i - conf_i)|`
    over the equal-width bins `((b - 1) / M, b / M]` of the max-probability
    described in `reliability_bins` (empty bins contribute 0).

    Args:
        probs: Class probabilities, shape `[n, C]`.
        labels: Integer labels, shape `[n]`.
        num_bins: Number of bins `M`.

    Returns:
        The ECE in percent, in `[0, 100]`.

    Example:

    >>> # Bin (0.5, 1]: mean confidence (0.9 + 0.65) / 2 = 0.775, accuracy
    >>> # 1 / 2, so ECE = 100 * |0.5 - 0.775| = 27.5.
    >>> round(expected_calibration_error(
    ...     [[0.9, 0.1], [0.35, 0.65]], [0, 0], num_bins=2), 6)
    27.5
    """
    _, count, confidence_sum, correct_sum = _bin_sums(probs, labels, num_bins)
    gap = np.abs(correct_sum - confidence_sum).sum()
    return float(100.0 * gap / count.sum())


def _aurc_and_eaurc(probs, labels) -> tuple[float, float]:
    """Returns `(AURC, E-AURC)`, both x1000; see `aurc`."""
    probs, labels = check_inputs(probs, labels)
    n = probs.shape[0]
    # Stable sort on the negated confidence: descending, with ties kept in
    # sample order, like the reference's `sorted(..., reverse=True)`.
    order = np.argsort(-probs.max(axis=1), kind="stable")
    wrong = _label_rank(probs, labels)[order] != 0
    errors = np.cumsum(wrong)
    coverage_counts = np.arange(1, n + 1)
    area = np.mean(errors / coverage_counts)
    num_wrong = int(errors[-1])
    num_right = n - num_wrong
    oracle_counts = np.arange(num_right + 1, n + 1)
    oracle_area = np.sum(1.0 - num_right / oracle_counts) / n
    return float(1000.0 * area), float(1000.0 * (area - oracle_area))


def aurc(probs, labels) -> float:
    """Area under the risk-coverage curve, x1000.

    Sort the samples by confidence `max_c p_ic`, descending; ties keep their
    sample order (stable sort, as the PS-KD reference's Python `sorted`). With
    `e_k` the number of errors among the first `k` samples, the selective risk
    at coverage `k / n` is `e_k / k` and

    `AURC = 1000 / n * sum_{k=1}^{n} e_k / k`.

    Args:
        probs: Class probabilities, shape `[n, C]`.
        labels: Integer labels, shape `[n]`.

    Returns:
        The AURC x1000, in `[0, 1000]`.

    Example:

    >>> # Sorted: correct (0.9), wrong (0.6): risks 0/1, 1/2 -> 1000 * 0.25.
    >>> aurc([[0.6, 0.4], [0.1, 0.9]], [1, 1])
    250.0
    """
    return _aurc_and_eaurc(probs, labels)[0]


def eaurc(probs, labels) -> float:
    """Excess AURC over the oracle ranking, x1000.

    The oracle ranks the `n - r` correct samples first, where `r` is the
    number of errors, so its risk is 0 up to `k = n - r` and `(k - n + r) / k`
    after:

    `AURC* = 1 / n * sum_{k=n-r+1}^{n} (1 - (n - r) / k)
           = (r - (n - r) * (H_n - H_{n-r})) / n`,  `H_m = sum_{j<=m} 1 / j`,

    and `E-AURC = AURC - 1000 * AURC*`. This exact finite-n oracle makes
    E-AURC exactly 0 for a perfect ranking (and defined when every
    prediction is wrong); the PS-KD reference uses its large-n limit
    `q + (1 - q) * ln(1 - q)`, `q = r / n`.

    Args:
        probs: Class probabilities, shape `[n, C]`.
        labels: Integer labels, shape `[n]`.

    Returns:
        The E-AURC x1000, `>= 0`.

    Example:

    >>> # AURC = 250 (see `aurc`); the oracle puts the correct sample first
    >>> # too, so E-AURC = 0.
    >>> eaurc([[0.6, 0.4], [0.1, 0.9]], [1, 1])
    0.0
    """
    return _aurc_and_eaurc(probs, labels)[1]


def classification_metrics(probs, labels, num_bins: int = 10) -> dict:
    """All PS-KD metrics of one classifier.

    Args:
        probs: Class probabilities, shape `[n, C]`.
        labels: Integer labels, shape `[n]`.
        num_bins: Number of ECE bins.

    Returns:
        `{"top1_err": %, "top5_err": %, "nll": nats, "ece": %, "aurc": x1000,
        "eaurc": x1000}` with Python floats (keys in `METRIC_KEYS` order).
    """
    area, excess = _aurc_and_eaurc(probs, labels)
    return {
        "top1_err": top_k_error(probs, labels, k=1),
        "top5_err": top_k_error(probs, labels, k=5),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels, num_bins),
        "aurc": area,
        "eaurc": excess,
    }


def _ensemble(exit_probs: Sequence) -> np.ndarray:
    """Mean of the exits' probabilities, `p_ens = 1 / E * sum_e p_e`."""
    if len(exit_probs) == 0:
        raise ValueError("`exit_probs` must hold at least one exit.")
    shapes = {np.shape(p) for p in exit_probs}
    if len(shapes) != 1:
        raise ValueError(f"All exits must have the same shape, got {shapes}.")
    return np.mean(np.stack([np.asarray(p) for p in exit_probs]), axis=0)


def multi_exit_metrics(
    exit_probs: Sequence[np.ndarray], labels, num_bins: int = 10
) -> dict:
    """Metrics of every exit of a multi-exit classifier and of their ensemble.

    The ensemble averages the exits' probabilities,
    `p_ens = 1 / E * sum_{e=1}^{E} p_e`.

    Args:
        exit_probs: One `[n, C]` probability array per exit, ordered from the
            shallowest exit to the deepest one.
        labels: Integer labels, shape `[n]`.
        num_bins: Number of ECE bins.

    Returns:
        `{"exits": [{"exit": 1, **metrics}, ..., {"exit": E, **metrics}],
        "ensemble": metrics}` where `metrics` is `classification_metrics`.
    """
    ensemble = _ensemble(exit_probs)
    return {
        "exits": [
            {"exit": index, **classification_metrics(probs, labels, num_bins)}
            for index, probs in enumerate(exit_probs, start=1)
        ],
        "ensemble": classification_metrics(ensemble, labels, num_bins),
    }
