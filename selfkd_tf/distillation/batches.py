"""What `SelfKDModel` reads from a Keras batch, checked so nothing is misread.

A batch is ``(x, labels)`` or ``(x, labels, sample_weight)`` (Keras reads a
3-tuple as sample weights), with ``x`` either ``{"image": [B, H, W, C],
"index": int [B]}`` (the sample index PS-KD needs) or the images alone.
Shapes that the loss arithmetic would broadcast into a wrong value without an
error are refused instead: one-hot labels, per-class weights.

Example:

>>> images, index, labels, weights = unpack(({"image": x, "index": i}, y))
>>> class_weight_for({0: 0.5}, num_classes=3)
{0: 0.5, 1: 1.0, 2: 1.0}
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf


def unpack(data):
    """``(images, index or None, labels [B] or None, sample_weight [B] or None)``.

    Raises:
        ValueError: labels or weights of another shape than ``[B]`` or
            ``[B, 1]`` (see `class_ids`, `per_example_weights`).
    """
    x, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    images, index = (x["image"], x.get("index")) if isinstance(x, dict) else (x, None)
    return images, index, class_ids(labels), per_example_weights(sample_weight)


def _one_per_example(values: tf.Tensor, name: str, what: str) -> tf.Tensor:
    if values.shape.rank == 2 and values.shape[-1] == 1:
        values = values[:, 0]
    if values.shape.rank != 1:
        raise ValueError(
            f"{name}: one {what} per example, shape [B] or "
            f"[B, 1]; got shape {values.shape}."
        )
    return values


def class_ids(labels) -> tf.Tensor | None:
    """Labels as int32 class ids ``[B]``; ``[B, 1]`` is squeezed; ``None`` stays.

    Integer labels of any width and whole-number float labels are taken
    (``[1., 2.]`` as ``Keras`` metrics take them); a float label with a
    fraction fails the step (`tf.errors.InvalidArgumentError`) instead of
    being truncated to another class.

    Raises:
        ValueError: for any other shape, e.g. one-hot ``[B, C]`` labels,
            which the soft-target arithmetic would broadcast into a wrong
            loss (pass their argmax).
    """
    if labels is None:
        return None
    labels = _one_per_example(tf.convert_to_tensor(labels), "labels", "class id")
    if labels.dtype.is_floating:
        with tf.control_dependencies([tf.debugging.assert_equal(
                labels, tf.round(labels),
                message="labels: class ids must be whole numbers")]):
            labels = tf.identity(labels)
    return tf.cast(labels, tf.int32)


def check_class_ids(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """``labels`` (int ``[B]``) once checked to lie in ``[0, num_classes)``.

    Checked on every device: on a GPU an out-of-range id gives no error of
    its own (`tf.one_hot` an all-zero row, a loss of 0; a sparse
    cross-entropy NaN).

    Raises:
        tf.errors.InvalidArgumentError: when run, if an id is out of range.
    """
    message = f"labels: class ids must be in [0, {num_classes})"
    checks = [tf.debugging.assert_non_negative(labels, message=message),
              tf.debugging.assert_less(labels, tf.cast(num_classes, labels.dtype),
                                       message=message)]
    with tf.control_dependencies(checks):
        return tf.identity(labels)


def per_example_weights(sample_weight, name: str = "sample_weight") -> tf.Tensor | None:
    """Sample weights as float32 ``[B]``; ``[B, 1]`` is squeezed; ``None`` stays.

    ``name`` is the argument a refusal names (e.g. ``teacher_valid``, a 0/1
    weight per example).

    Raises:
        ValueError: for any other shape (e.g. per-class weights ``[B, C]``).
    """
    if sample_weight is None:
        return None
    return _one_per_example(tf.cast(sample_weight, tf.float32), name, "weight")


def class_weight_for(class_weight, num_classes: int) -> dict[int, float] | None:
    """``class_weight`` checked, with every class present (missing ones weigh 1).

    Keras turns ``class_weight`` into per-example weights by looking labels up
    in a table as long as the largest key: a label above it fails mid-epoch,
    and keys that are not class ids are ignored without a word.

    Args:
        class_weight: ``{class id: weight}`` or ``None``.
        num_classes: ``C``.

    Returns:
        ``{c: weight for c in range(C)}``, or ``None``.

    Raises:
        ValueError: if ``class_weight`` is not a mapping from int class ids
            in ``[0, C)`` to finite numbers >= 0.
    """
    if class_weight is None:
        return None
    if not isinstance(class_weight, Mapping):
        raise ValueError(
            "class_weight: expected a dict {class id: weight}; got "
            f"{type(class_weight).__name__}."
        )
    for key, weight in class_weight.items():
        if (isinstance(key, bool) or not isinstance(key, numbers.Integral)
                or not 0 <= key < num_classes):
            raise ValueError(
                f"class_weight: keys must be class ids in [0, {num_classes}); "
                f"got {key!r}."
            )
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not np.isfinite(weight) or weight < 0):
            raise ValueError(
                f"class_weight: weights must be finite numbers >= 0; got "
                f"{weight!r} for class {key}."
            )
    return {c: float(class_weight.get(c, 1.0)) for c in range(num_classes)}
