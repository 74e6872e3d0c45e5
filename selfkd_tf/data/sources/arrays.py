"""A dataset held in memory as uint8 images, and the checks every source passes.

Every data source reads its files into the same container, `ImageArrays`,
through `image_arrays`, which converts what it read to uint8 `[N, H, W, C]`
images and int64 labels and refuses data that cannot be trained on: mismatched
lengths, empty splits, labels out of range, a single class, fewer training
examples than classes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "DataError",
    "ImageArrays",
    "first_line",
    "image_arrays",
    "resize_array",
    "resize_uint8",
]


class DataError(ValueError):
    """Invalid dataset argument or input data; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class ImageArrays:
    """A dataset held in memory.

    Attributes:
        x_train: uint8 `[N, H, W, C]` training images.
        y_train: int64 `[N]` training labels in `[0, num_classes)`.
        x_test: uint8 `[M, H, W, C]` test images.
        y_test: int64 `[M]` test labels in `[0, num_classes)`.
        class_names: one name per class, in label order.
        num_classes: `len(class_names)`.
        published_stats: `(mean, std)` per channel in [0, 1] pixel units,
            published with the data set (CIFAR); None when the statistics are
            to be computed from the training split.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    num_classes: int
    published_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def image_arrays(
    source: str,
    x_train,
    y_train,
    x_test,
    y_test,
    class_names: Sequence[str] | None = None,
    published_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> ImageArrays:
    """Validates raw arrays from any source and converts them to `ImageArrays`.

    Args:
        source: what the arrays were read from, for messages.
        x_train, x_test: images `[N, H, W]` or `[N, H, W, C]`, integers in
            [0, 255] or floats in [0, 1].
        y_train, y_test: integer labels `[N]` (or `[N, 1]`).
        class_names: names in label order; None names classes "0", "1", ...
            up to the largest label.
        published_stats: see `ImageArrays`.

    Returns:
        An `ImageArrays`.

    Raises:
        DataError: the arrays have the wrong shape, dtype or value range,
            their lengths differ, a split is empty, a label is out of range,
            there are fewer than 2 classes or fewer training examples than
            classes.

    Example:

    >>> arrays = image_arrays("demo", np.zeros((2, 4, 4)), [0, 1],
    ...                       np.zeros((1, 4, 4)), [1])
    >>> arrays.x_train.shape, arrays.class_names
    ((2, 4, 4, 1), ('0', '1'))
    """
    x_train, x_test = (
        _uint8_images(source, n, x)
        for n, x in (("x_train", x_train), ("x_test", x_test))
    )
    y_train, y_test = (
        _labels(source, n, y)
        for n, y in (("y_train", y_train), ("y_test", y_test))
    )
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(
                f"{source}: x_{split} has {len(x)} examples "
                f"but y_{split} has {len(y)} labels"
            )
        if not len(x):
            raise DataError(f"{source}: the {split} split has no examples")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: train images have shape {x_train.shape[1:]} "
            f"but test images have shape {x_test.shape[1:]}"
        )
    if class_names is None:
        class_names = range(max(y_train.max(), y_test.max()) + 1)
    class_names = tuple(str(name) for name in class_names)
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        bad = np.flatnonzero((y < 0) | (y >= len(class_names)))
        if bad.size:
            raise DataError(
                f"{source}: {name} has label {y[bad[0]]} at position {bad[0]}; "
                f"labels must be in [0, {len(class_names)})"
            )
    if len(class_names) < 2:
        raise DataError(
            f"{source}: has a single class ({class_names[0]!r}); "
            "classification needs at least 2"
        )
    if len(y_train) < len(class_names):
        raise DataError(
            f"{source}: {len(y_train)} training examples for "
            f"{len(class_names)} classes; every class needs at least one"
        )
    return ImageArrays(
        x_train,
        y_train,
        x_test,
        y_test,
        class_names,
        len(class_names),
        published_stats,
    )


def _uint8_images(source: str, name: str, images) -> np.ndarray:
    """Converts images to uint8 `[N, H, W, C]` (see `image_arrays`)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim != 4 or 0 in images.shape[1:]:
        raise DataError(
            f"{source}: {name} must have shape [N, H, W] or [N, H, W, C]; "
            f"got {images.shape}"
        )
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        low, high, scale = 0.0, 1.0, 255.0
    elif np.issubdtype(images.dtype, np.integer):
        low, high, scale = 0, 255, 1
    else:
        raise DataError(
            f"{source}: {name} has dtype {images.dtype}; "
            "expected integers or floats"
        )
    if images.size and not (images.min() >= low and images.max() <= high):
        raise DataError(
            f"{source}: {name} ({images.dtype}) has values in "
            f"[{images.min()}, {images.max()}]; "
            "integer images must be in [0, 255], floating images in [0, 1]"
        )
    return np.round(images * scale).astype(np.uint8)


def _labels(source: str, name: str, labels) -> np.ndarray:
    """Converts labels to int64 `[N]`."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not (
        np.issubdtype(labels.dtype, np.integer) or labels.size == 0
    ):
        raise DataError(
            f"{source}: {name} must be integer class ids of shape [N]; "
            f"got {labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


def resize_uint8(images: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Resizes uint8 `[..., H, W, C]` to `size`, bilinear and antialiased."""
    resized = tf.image.resize(images, size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def resize_array(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes uint8 `[N, H, W, C]` to `[N, size[0], size[1], C]` in chunks."""
    if images.shape[1:3] == size:
        return images
    return np.concatenate(
        [
            resize_uint8(images[i : i + 1024], size).numpy()
            for i in range(0, len(images), 1024)
        ]
    )


def first_line(error) -> str:
    """The first line of an error message: `DataError`s fit on one line."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
