"""The `metrics.json` record of a run: every exit's metrics on one split.

`build_metrics_record` scores each exit and the ensemble with
`selfkd_tf.metrics.scores.multi_exit_metrics` and adds what the report needs to
compare runs (dataset, split, method, parameters, training time, the deepest
exit's reliability bins); `write_metrics_json` writes it atomically.
`selfkd-train`, `selfkd-eval` and `selfkd-report` share this schema.
"""

import json
import os
from typing import Any, Sequence

import numpy as np

from selfkd_tf.files import write_atomically
from selfkd_tf.metrics.scores import multi_exit_metrics, reliability_bins


def _method_list(methods: str | Sequence[str]) -> list[str]:
    """`"pskd, byot"` or `["pskd", "byot"]` -> `["pskd", "byot"]`.

    A comma-separated string is accepted because training flags store the
    methods that way; `""` (and `"".split(",")`) mean the baseline, `[]`.
    """
    if isinstance(methods, str):
        methods = methods.split(",")
    return [name.strip() for name in methods if name.strip()]


def build_metrics_record(
    exit_probs: Sequence[np.ndarray],
    labels,
    *,
    dataset: str,
    split: str,
    arch: str,
    methods: str | Sequence[str],
    params: int,
    train_time_s: float | None = None,
    epochs: int | None = None,
    num_bins: int = 10,
) -> dict[str, Any]:
    """Builds the `metrics.json` record of a run.

    Args:
        exit_probs: One `[n, C]` probability array per exit, shallowest
            first; the last one is the model's answer.
        labels: Integer labels, shape `[n]`.
        dataset: Dataset name, e.g. `"cifar100"`.
        split: Evaluated split, e.g. `"test"`.
        arch: Architecture name, e.g. `"resnet18"`.
        methods: Training methods, e.g. `["pskd", "byot"]` or the flag string
            `"pskd,byot"`; empty for the baseline.
        params: Number of model parameters.
        train_time_s: Total training time in seconds, if known.
        epochs: Number of training epochs, if known.
        num_bins: Number of ECE / reliability bins.

    Returns:
        A JSON-serialisable dict with the keys `dataset, split, num_examples,
        arch, methods, num_exits, exits, ensemble, train_time_s, train_time_per_epoch_s,
        epochs, params, reliability`. `train_time_per_epoch_s` is
        `train_time_s / epochs` when both are known (and `epochs > 0`).
        `reliability` holds the `reliability_bins` of the deepest exit as
        lists, with `null` confidence and accuracy for empty bins.

    Example:

    >>> probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    >>> record = build_metrics_record(
    ...     [probs, probs], [0, 0], dataset="digits", split="test",
    ...     arch="resnet18", methods="pskd,byot", params=1000)
    >>> record["exits"][-1]["top1_err"], record["methods"]
    (50.0, ['pskd', 'byot'])
    """
    per_exit = multi_exit_metrics(exit_probs, labels, num_bins)
    bins = reliability_bins(exit_probs[-1], labels, num_bins)
    # Plain Python numbers: numpy scalars are not JSON-serialisable.
    train_time_s = None if train_time_s is None else float(train_time_s)
    epochs = None if epochs is None else int(epochs)
    per_epoch = train_time_s / epochs if train_time_s is not None and epochs else None

    def nullable(values: np.ndarray) -> list[float | None]:
        # JSON has no NaN; an empty bin has no mean.
        return [None if np.isnan(v) else float(v) for v in values]

    return {
        "dataset": dataset,
        "split": split,
        "num_examples": int(len(labels)),
        "arch": arch,
        "methods": _method_list(methods),
        "num_exits": len(exit_probs),
        "exits": per_exit["exits"],
        "ensemble": per_exit["ensemble"],
        "train_time_s": train_time_s,
        "train_time_per_epoch_s": per_epoch,
        "epochs": epochs,
        "params": int(params),
        "reliability": {
            "num_bins": num_bins,
            "edges": bins.edges.tolist(),
            "confidence": nullable(bins.confidence),
            "accuracy": nullable(bins.accuracy),
            "count": bins.count.tolist(),
        },
    }


def write_metrics_json(record: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes `record` as JSON to `path` atomically.

    The JSON goes to a temporary file in the destination directory which then
    replaces `path` (`os.replace`), so readers never see a partial file.
    Parent directories are created. NaN or infinite values raise a
    `ValueError` rather than producing invalid JSON.
    """
    write_atomically(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
