"""Scoring a multi-exit model on a dataset: every exit's probabilities and metrics.

`predict_exit_probabilities` runs the model over a dataset;
`evaluate_model` turns its exits' probabilities into the ``metrics.json``
record (`selfkd_tf.metrics.record.build_metrics_record`) that training,
``selfkd-eval`` and ``selfkd-report`` share; `format_metrics_table` prints
one.

Example:

```python
record = evaluate_model(model, test_ds, dataset_name="cifar100", split="test",
                        arch="resnet18", methods=("pskd",))
print(format_metrics_table(record))
```
"""

from __future__ import annotations

import typing

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf.metrics import calibration
from selfkd_tf.metrics import record as metrics_record
from selfkd_tf.metrics import scores as metrics_lib
from selfkd_tf.models.costs import count_parameters


def predict_exit_probabilities(
    model: keras.Model, dataset: tf.data.Dataset
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every exit's class probabilities on ``dataset``, and its labels.

    Args:
        model: a model whose call returns the multi-exit outputs
            (``{"logits": [...], ...}``): a `SelfKDModel` or its backbone.
        dataset: batches ``(x, labels)``, ``x`` the images or
            ``{"image": images, ...}``.

    Returns:
        ``([P_1, ..., P_N], labels)``, ``P_i`` float32 ``[n, C]``.
    """

    @tf.function
    def probabilities(images):
        logits = model(images, training=False)["logits"]
        return [tf.nn.softmax(tf.cast(z, tf.float32)) for z in logits]

    batches, labels = [], []
    for x, y in dataset:
        images = x["image"] if isinstance(x, dict) else x
        batches.append([p.numpy() for p in probabilities(images)])
        labels.append(y.numpy())
    return [np.concatenate(exit_probs) for exit_probs in zip(*batches)], np.concatenate(labels)


def evaluate_model(
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    dataset_name: str,
    split: str,
    arch: str,
    methods: typing.Sequence[str],
    train_time_s: float | None = None,
    epochs: int | None = None,
    temperatures: typing.Sequence[float] | None = None,
) -> dict:
    """The ``metrics.json`` record of ``model`` on ``dataset``.

    Args:
        model: a `selfkd_tf.distillation.model.SelfKDModel` (its ``backbone``
            is the multi-exit network whose trainable weights ``params``
            counts).
        dataset: batches ``(x, labels)``, as `predict_exit_probabilities`.
        dataset_name, split, arch, methods, train_time_s, epochs: what the
            record says of the data, the model and its training.
        temperatures: one per exit: score ``softmax(z_k / T_k)``
            (`selfkd_tf.metrics.calibration`); the record then lists them.
    """
    exit_probs, labels = predict_exit_probabilities(model, dataset)
    return metrics_record_of(
        model, exit_probs, labels, dataset_name=dataset_name, split=split, arch=arch,
        methods=methods, train_time_s=train_time_s, epochs=epochs,
        temperatures=temperatures)


def metrics_record_of(
    model: keras.Model,
    exit_probs: typing.Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    temperatures: typing.Sequence[float] | None = None,
    **fields,
) -> dict:
    """`evaluate_model`'s record from probabilities already predicted.

    ``fields`` are `evaluate_model`'s (``dataset_name``, ``split``,
    ``arch``, ``methods``, and optionally ``train_time_s``, ``epochs``).
    """
    if temperatures is not None:
        exit_probs = calibration.apply_temperatures(exit_probs, temperatures)
    record = metrics_record.build_metrics_record(
        exit_probs, labels, dataset=fields.pop("dataset_name"),
        params=count_parameters(model.backbone), **fields)
    if temperatures is not None:
        record["temperatures"] = [float(t) for t in temperatures]
    return record


def format_metrics_table(record: dict) -> str:
    """A plain-text table of a metrics record, one row per exit + ensemble.

    Example:

        exit        top1_err  top5_err     nll     ece    aurc   eaurc
        1              45.12     14.20   1.812    8.31  180.20   60.12
        ...
        ensemble       30.05      8.90   1.102    3.02   90.11   40.33
    """
    keys = metrics_lib.METRIC_KEYS
    rows = [(str(e["exit"]), e) for e in record["exits"]]
    rows.append(("ensemble", record["ensemble"]))
    lines = [f"{'exit':<10}" + "".join(f"{k:>10}" for k in keys)]
    for name, scores in rows:
        lines.append(f"{name:<10}" + "".join(f"{scores[k]:>10.3f}" for k in keys))
    return "\n".join(lines)


def format_temperature_table(record: dict) -> str:
    """A plain-text table of a temperature record: every exit's temperature,
    and its NLL and ECE before and after temperature scaling (the ensemble
    averages the scaled exits).

    Example:

        exit          T   nll before   nll after   ece before   ece after
        1         1.284        1.203       1.157       9.314       2.051
        ...
        ensemble      -        1.012       0.996       5.102       1.977
    """
    before, after = record["before"], record["after"]
    rows = [(str(b["exit"]), f"{t:.3f}", b, a) for t, b, a in
            zip(record["temperatures"], before["exits"], after["exits"])]
    rows.append(("ensemble", "-", before["ensemble"], after["ensemble"]))
    header = ["exit", "T", "nll before", "nll after", "ece before", "ece after"]
    lines = [f"{header[0]:<10}{header[1]:>7}" + "".join(f"{h:>13}" for h in header[2:])]
    for name, temperature, b, a in rows:
        lines.append(f"{name:<10}{temperature:>7}" + "".join(
            f"{v:>13.3f}" for v in (b["nll"], a["nll"], b["ece"], a["ece"])))
    return "\n".join(lines)
