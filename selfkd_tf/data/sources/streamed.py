"""Datasets read from their files while training: file lists and record files.

A source that reads files (`folder:`, TFDS) describes its splits without
decoding them, so memory stays flat in the number of images: a few dozen
bytes per image for the file list, the labels and the index.

- `FileSplit`: one image file per example (`folder:`); any example can be
  read by its index.
- `RecordSplit`: TFRecord files of serialized examples (TFDS), read in
  sequence; an example's position is its place in the files' order.

`selfkd_tf.data.pipeline` decides whether to stream them or to decode them
once into memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from selfkd_tf.data.sources.arrays import DataError

__all__ = ["FileSplit", "RecordSplit", "Split", "StreamedData", "decode_image"]


# Record functions branch in Python only: AutoGraph has nothing to convert.
_plain = tf.autograph.experimental.do_not_convert


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes a JPEG, PNG, BMP, GIF or WebP to uint8 RGB `[H, W, 3]`.

    Grayscale is replicated to three channels and alpha dropped.
    """
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


@dataclasses.dataclass(frozen=True)
class FileSplit:
    """A split held as one image file per example.

    Attributes:
        paths: str `[N]`, the files, in index order.
        labels: int64 `[N]` class ids.
    """

    paths: np.ndarray
    labels: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def subset(self, positions: np.ndarray) -> FileSplit:
        """The examples at `positions` (increasing), which become `0..n-1`."""
        return FileSplit(self.paths[positions], self.labels[positions])


@dataclasses.dataclass(frozen=True)
class RecordSplit:
    """A split held as TFRecord files of serialized examples, read in sequence.

    Attributes:
        files: the record files, in order.
        lengths: examples in each file.
        parse: serialized example -> `(encoded image, int64 label)`.
        kept: None for every example, else the increasing positions
            (places in the files' order) of the examples used, which become
            indices `0..n-1`.
        name: what the files are, for messages.
    """

    files: tuple[str, ...]
    lengths: tuple[int, ...]
    parse: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
    kept: np.ndarray | None = None
    name: str = ""

    @property
    def num_examples(self) -> int:
        return sum(self.lengths) if self.kept is None else len(self.kept)

    @property
    def labels(self) -> np.ndarray:
        """int64 `[N]` class ids, in index order: one pass over the records
        without decoding a single image."""
        labels = self.records(shuffle_files=None).map(
            _plain(lambda index, record: self.parse(record)[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        found = [batch for batch in labels.batch(65536).as_numpy_iterator()]
        return np.concatenate(found).astype(np.int64)

    def subset(self, positions: np.ndarray) -> RecordSplit:
        """The examples at `positions` (increasing) of this split."""
        kept = positions if self.kept is None else self.kept[positions]
        return dataclasses.replace(self, kept=np.asarray(kept, np.int64))

    def records(self, shuffle_files: tf.Tensor | None) -> tf.data.Dataset:
        """`(index int32, serialized string)` of every example used.

        Args:
            shuffle_files: None to read the files in order; else an int64
                `[2]` stateless seed: the files are read in an order drawn
                from it, several at a time, their examples interleaved.
        """
        offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        files = tf.constant(self.files)
        order = tf.range(len(self.files), dtype=tf.int64)
        cycle = 1
        if shuffle_files is not None:
            order = tf.random.experimental.stateless_shuffle(order, seed=shuffle_files)
            cycle = min(len(self.files), 16)

        def read(number):
            return tf.data.TFRecordDataset(files[number]).enumerate(
                start=tf.gather(offsets, number)
            )

        parallel = {"num_parallel_calls": cycle, "deterministic": True} if cycle > 1 else {}
        records = tf.data.Dataset.from_tensor_slices(order).interleave(
            _plain(read), cycle_length=cycle, block_length=1, **parallel)
        if self.kept is None:
            return records.map(_plain(lambda p, r: (tf.cast(p, tf.int32), r)))
        # Position -> index, -1 for the examples left out: 4 bytes an example.
        index_of = np.full(sum(self.lengths), -1, np.int32)
        index_of[self.kept] = np.arange(len(self.kept), dtype=np.int32)
        index_of = tf.constant(index_of)
        return records.map(
            _plain(lambda p, r: (tf.gather(index_of, p), r))
        ).filter(_plain(lambda i, r: i >= 0))


Split = FileSplit | RecordSplit


@dataclasses.dataclass(frozen=True)
class StreamedData:
    """A dataset whose images stay in their files until they are used.

    Attributes:
        source: what was read, for messages.
        train, test: the splits.
        class_names: one name per class, in label order.
        published_stats: as in `selfkd_tf.data.sources.ImageArrays`.
    """

    source: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    published_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check(self) -> StreamedData:
        """Refuses what cannot be trained on, as `image_arrays` does.

        Raises:
            DataError: a split without examples, a single class, or fewer
                training examples than classes.
        """
        for split, data in (("train", self.train), ("test", self.test)):
            if not data.num_examples:
                raise DataError(f"{self.source}: the {split} split has no examples")
        if self.num_classes < 2:
            raise DataError(
                f"{self.source}: has a single class ({self.class_names[0]!r}); "
                "classification needs at least 2"
            )
        if self.train.num_examples < self.num_classes:
            raise DataError(
                f"{self.source}: {self.train.num_examples} training examples for "
                f"{self.num_classes} classes; every class needs at least one"
            )
        return self
