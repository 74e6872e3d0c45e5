"""Temperature scaling: one temperature per classifier, fitted after training.

Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, Sec. 4.2:
the logits ``z`` of a trained classifier are divided by a scalar ``T > 0``
fitted by minimising the negative log-likelihood on held-out data,
``q = softmax(z / T)``. The predicted class is unchanged; ``T > 1`` softens
an overconfident classifier, ``T < 1`` sharpens an underconfident one. It is
the standard post-hoc fix that self-distillation's calibration gains are
measured against.

The functions take probabilities, as every metric of `selfkd_tf.metrics`
does: ``log p`` differs from the logits by a constant per example, which
the softmax removes, so ``softmax(log p / T) = softmax(z / T)``.
Probabilities are clipped at `selfkd_tf.metrics.scores.NLL_EPSILON` before
the log, as the NLL clips them.

Example:

>>> probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.95, 0.05], [0.7, 0.3]])
>>> temperature = fit_temperature(probs, [0, 1, 0, 0])
>>> temperature > 1  # overconfident: one of four wrong at 80% confidence
True
>>> apply_temperature(probs, 1.0).round(2).tolist() == probs.round(2).tolist()
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from selfkd_tf.metrics.scores import NLL_EPSILON, check_inputs

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The range searched for ``T``: far wider than trained networks need (Guo et
al. report 1.1 to 3), and narrow enough that float64 softmaxes stay finite."""


def _log_probabilities(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probs, np.float64), NLL_EPSILON))


def _tempered_log_softmax(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    scaled = log_probs / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` of every row of ``probs``.

    Args:
        probs: float ``[n, C]`` probabilities.
        temperature: ``T > 0``.

    Returns:
        float64 ``[n, C]``, each row summing to 1.

    Raises:
        ValueError: ``temperature`` is not a finite number > 0.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0; got {temperature}")
    return np.exp(_tempered_log_softmax(_log_probabilities(probs), float(temperature)))


def fit_temperature(probs, labels) -> float:
    """The ``T`` in `TEMPERATURE_BOUNDS` minimising the NLL of ``softmax(log p / T)``.

    The NLL is convex in ``1 / T``, so the bounded scalar search (over
    ``log T``, SciPy's Brent method) finds its minimum; its tolerance is far
    below what changes a metric.

    Args:
        probs: float ``[n, C]`` probabilities of held-out examples.
        labels: int ``[n]`` (or ``[n, 1]``).

    Returns:
        ``T`` as a Python float.

    Raises:
        ValueError: the inputs are not probabilities and labels of the same
            examples (`selfkd_tf.metrics.scores` checks them).
    """
    # Imported here: SciPy's start-up would otherwise slow every command
    # that reads metrics (selfkd-report), which never fits a temperature.
    from scipy import optimize

    probs, labels = check_inputs(probs, labels)
    log_probs = _log_probabilities(probs)
    rows = np.arange(len(labels))

    def nll(log_temperature: float) -> float:
        scaled = _tempered_log_softmax(log_probs, np.exp(log_temperature))
        return float(-scaled[rows, labels].mean())

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = optimize.minimize_scalar(nll, bounds=(low, high), method="bounded",
                                      options={"xatol": 1e-6})
    return float(np.exp(result.x))


def fit_temperatures(exit_probs: Sequence[np.ndarray], labels) -> list[float]:
    """One temperature per exit (`fit_temperature`), shallowest first."""
    return [fit_temperature(probs, labels) for probs in exit_probs]


def apply_temperatures(exit_probs: Sequence[np.ndarray],
                       temperatures: Sequence[float]) -> list[np.ndarray]:
    """Every exit's probabilities with its own temperature (`apply_temperature`).

    Raises:
        ValueError: not one temperature per exit, or one that is not > 0.
    """
    if len(temperatures) != len(exit_probs):
        raise ValueError(f"temperatures: got {len(temperatures)} for "
                         f"{len(exit_probs)} exits; give one per exit")
    return [apply_temperature(p, t) for p, t in zip(exit_probs, temperatures)]
