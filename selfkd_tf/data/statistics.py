"""Per-channel pixel statistics of a training split, for `normalization="dataset"`.

Sums of uint8 pixels and of their squares are exact integers, so the
statistics are the same whether the images were held in memory or read
from their files, whatever the chunks they were summed in.

Example:

>>> channel_stats(np.zeros((2, 4, 4, 3), np.uint8))[0]
(0.0, 0.0, 0.0)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from selfkd_tf.data import streaming
from selfkd_tf.data.plan import WorkerShare
from selfkd_tf.data.sources.arrays import DataError

__all__ = ["channel_stats", "streamed_stats"]


def channel_stats(
    images: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 `[N, H, W, C]`, in [0, 1] units."""
    channels = images.shape[-1]
    pixels = images.reshape(-1, channels)
    sums = _Sums(channels)
    for start in range(0, len(pixels), 1 << 22):
        sums.add(pixels[start : start + (1 << 22)])
    return sums.stats()


def streamed_stats(
    reader, keys: tf.data.Dataset, num_examples: int, augmentation: str,
    size: tuple[int, int], batch_size: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`channel_stats` of images read from their files: one decoding pass.

    Args:
        reader: a `selfkd_tf.data.streaming` reader of the training split.
        keys: the keys of its examples (`selfkd_tf.data.streaming.eval_dataset`).
        num_examples: how many.
        augmentation: the run's; the images are those evaluation would see
            (centre crops for ``"imagenet"``).
        size: `(H, W)` of those images.
        batch_size: images decoded per batch.

    Only the sums are kept: memory does not grow with the split.
    """
    build = streaming.batch_builder(
        reader, mean=(0.0,) * 3, std=(1.0,) * 3, augmentation=augmentation,
        size=size, training=False, normalize=False)
    sums = _Sums(3)
    # Raw pixels in 0..255: uint8 for one size, exactly.
    exact = augmentation != "imagenet"
    batches = streaming.eval_dataset(
        keys, build, num_examples, batch_size, WorkerShare()).as_numpy_iterator()
    try:
        for features, _ in batches:
            pixels = features["image"].reshape(-1, 3)
            sums.add(np.round(pixels).astype(np.uint8) if exact else pixels)
    except tf.errors.OpError:
        raise DataError(
            f"normalization=dataset reads every training image once; "
            f"{_unreadable(reader)}") from None
    return sums.stats()


def _unreadable(reader) -> str:
    """Names the first file of ``reader`` that does not decode (it has failed
    once already, so this pass runs only on the way to an error)."""
    for path in getattr(reader, "paths", tf.constant([], tf.string)).numpy():
        try:
            tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except tf.errors.OpError:
            return f"{path.decode()} does not decode"
    return "a training image does not decode"


class _Sums:
    """Per-channel sums of pixels and their squares; exact for uint8 pixels,
    so the statistics do not depend on how the pixels were chunked."""

    def __init__(self, channels: int):
        self.count = 0
        self.total = np.zeros(channels, np.int64)
        self.total_sq = np.zeros(channels, np.int64)
        self.float_total = np.zeros(channels)
        self.float_total_sq = np.zeros(channels)

    def add(self, pixels: np.ndarray) -> None:
        self.count += len(pixels)
        if pixels.dtype == np.uint8:
            wide = pixels.astype(np.int64)
            self.total += wide.sum(axis=0)
            self.total_sq += np.square(wide).sum(axis=0)
        else:
            wide = pixels.astype(np.float64)
            self.float_total += wide.sum(axis=0)
            self.float_total_sq += np.square(wide).sum(axis=0)

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        total = self.total + self.float_total
        total_sq = self.total_sq + self.float_total_sq
        mean = total / self.count
        std = np.sqrt(np.maximum(total_sq / self.count - np.square(mean), 0.0))
        # A constant channel would otherwise divide by zero; one grey level is
        # the smallest meaningful spread.
        std = np.maximum(std, 1.0)
        return tuple((mean / 255.0).tolist()), tuple((std / 255.0).tolist())
