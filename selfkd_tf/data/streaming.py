"""Assembling the tf.data pipelines: batches of keys, each worker's share, images.

A pipeline is built in three stages:

1. *keys*: what identifies each example of a global batch, and its
   augmentation draws (`selfkd_tf.data.plan`): its index, and for record
   files (TFDS) its serialized record. Keys are cheap: no image is decoded.
2. *share*: each worker keeps the rows of its replicas
   (`selfkd_tf.data.plan.piece_bounds`), one piece per replica.
3. *images*: a `Reader` turns each piece's keys into images and labels, in
   parallel (`tf.data.AUTOTUNE`), and `batch_builder` augments and
   normalizes them; batches are prefetched.

So a worker reads and decodes only its own examples. Readers:

- `MemoryReader`: uint8 images held in memory, gathered a batch at a time;
- `FileReader`: one image file per example, read and decoded by index;
- `RecordReader`: serialized records (TFDS), parsed and decoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from selfkd_tf.data import augmentation as augment_lib
from selfkd_tf.data import plan as plan_lib
from selfkd_tf.data.plan import WorkerShare
from selfkd_tf.data.sources.folder import fixed_size
from selfkd_tf.data.sources.streamed import FileSplit, RecordSplit, decode_image

__all__ = [
    "SHUFFLE_WINDOW",
    "FileReader",
    "MemoryReader",
    "RecordReader",
    "batch_builder",
    "eval_dataset",
    "plan_batches",
    "record_batches",
    "train_dataset",
]

SHUFFLE_WINDOW = 1024
"""Record files (TFDS) are read in sequence: after shuffling the order of the
files and interleaving 16 of them, examples are shuffled within windows of
this many (their encoded bytes are what the window holds)."""
# Streams of the record order, beside those of `selfkd_tf.data.plan`.
_FILES_STREAM, _WINDOW_STREAM = 10, 11
# Images a piece decodes at once.
_PARALLEL_IMAGES = 16

Keys = dict[str, tf.Tensor]
Batches = Callable[[tf.Tensor], tf.data.Dataset]
# The pipeline's functions branch in Python only, on settings: AutoGraph has
# nothing to convert (and warns about lambdas and closures it cannot parse).
_plain = tf.autograph.experimental.do_not_convert


# --- Readers ----------------------------------------------------------------------


def _map_rows(function, keys: Keys, signature) -> tuple[tf.Tensor, tf.Tensor]:
    """`function` of every row of `keys`, in parallel; empty keys give empty results."""
    return tf.map_fn(
        _plain(function), keys, fn_output_signature=signature,
        parallel_iterations=_PARALLEL_IMAGES,
    )


class MemoryReader:
    """Images held in memory: uint8 `[N, H, W, C]` and int `[N]` labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        # A variable is captured by reference; a constant would be copied
        # into every function of the pipeline that reads it.
        with tf.device("/cpu:0"):
            self.images = tf.Variable(images, trainable=False, name="images")
        self.labels = tf.constant(labels, tf.int32)
        self.channels = images.shape[-1]

    def one(self, row: Keys) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(self.images, row["index"]), tf.gather(self.labels, row["index"])

    def batch(self, keys: Keys, size) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(self.images, keys["index"]), tf.gather(self.labels, keys["index"])


class _StreamedReader:
    """Reads one example at a time; a batch resizes each to one size."""

    channels = 3

    def batch(self, keys: Keys, size) -> tuple[tf.Tensor, tf.Tensor]:
        def read(row):
            image, label = self.one(row)
            return fixed_size(image, size), label

        return _map_rows(read, keys, (tf.TensorSpec([*size, 3], tf.uint8),
                                      tf.TensorSpec([], tf.int32)))


class FileReader(_StreamedReader):
    """One image file per example, read by index."""

    def __init__(self, split: FileSplit):
        self.paths = tf.constant(split.paths.astype(str))
        self.labels = tf.constant(split.labels, tf.int32)

    def one(self, row: Keys) -> tuple[tf.Tensor, tf.Tensor]:
        encoded = tf.io.read_file(tf.gather(self.paths, row["index"]))
        return decode_image(encoded), tf.gather(self.labels, row["index"])


class RecordReader(_StreamedReader):
    """Serialized records (TFDS), carried in the keys as ``"record"``."""

    def __init__(self, split: RecordSplit):
        self.parse = split.parse

    def one(self, row: Keys) -> tuple[tf.Tensor, tf.Tensor]:
        encoded, label = self.parse(row["record"])
        return decode_image(encoded), tf.cast(label, tf.int32)


def batch_builder(
    reader,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augmentation: str,
    size: tuple[int, int],
    training: bool,
    normalize: bool = True,
) -> Callable[[Keys], tuple[dict[str, tf.Tensor], tf.Tensor]]:
    """Returns `build(keys)`: one batch `({"image", "index"}, label)` of a piece's keys.

    Args:
        reader: a `MemoryReader`, `FileReader` or `RecordReader`.
        mean, std: per-channel statistics in [0, 1] units.
        augmentation: one of `selfkd_tf.data.augmentation.AUGMENTATIONS`.
        size: `(H, W)` of the images produced.
        training: training (augmented) or evaluation images.
        normalize: False for raw float32 pixels in 0..255.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    # (x / 255 - mean) / std as a single multiply-add.
    scale = tf.constant(1.0 / (255.0 * std)) if normalize else 1.0
    shift = tf.constant(-mean / std) if normalize else 0.0
    channels = reader.channels
    float_images = (tf.TensorSpec([*size, channels], tf.float32),
                    tf.TensorSpec([], tf.int32))

    def augmented(row):
        image, label = reader.one(row)
        return augment_lib.imagenet_train(image, row["draw"], size), label

    def centred(row):
        image, label = reader.one(row)
        return augment_lib.resize_and_center_crop(image, size), label

    def build(keys):
        if augmentation == "imagenet":
            images, labels = _map_rows(
                augmented if training else centred, keys, float_images)
        else:
            images, labels = reader.batch(keys, size)
            if training and augmentation == "cifar":
                images = augment_lib.crop_and_flip(images, keys["offset"], keys["flip"])
        features = {
            "image": tf.cast(images, tf.float32) * scale + shift,
            "index": tf.cast(keys["index"], tf.int32),
        }
        return features, labels

    return build


# --- Keys ---------------------------------------------------------------------------


def plan_batches(
    num_examples: int, batch_size: int, *, seed: int, augmentation: str
) -> Batches:
    """Training keys of examples read by index: `epoch -> (step, keys)` batches.

    The order and draws are `selfkd_tf.data.plan.epoch_plan`'s.
    """
    steps = math.ceil(num_examples / batch_size)

    def epoch_batches(epoch):
        plan = plan_lib.epoch_plan(num_examples, seed, epoch, augmentation)

        def batch_plan(step):
            start = step * batch_size
            return step, {k: v[start : start + batch_size] for k, v in plan.items()}

        return tf.data.Dataset.range(steps).map(_plain(batch_plan))

    return epoch_batches


def record_batches(
    split: RecordSplit, batch_size: int, *, seed: int, augmentation: str
) -> Batches:
    """Training keys of record files (TFDS): `epoch -> (step, keys)` batches.

    Each epoch reads the files in an order drawn from `(seed, epoch)`, 16 at
    a time interleaved, and shuffles the examples within windows of
    `SHUFFLE_WINDOW`, each window's permutation drawn from `(seed, epoch,
    window)`: the order is a pure function of the seed and the epoch. The
    draws are a function of `(seed, epoch, index)`, as for every source.
    """
    num_examples = split.num_examples

    def epoch_batches(epoch):
        key = plan_lib.epoch_key(seed, epoch)
        draws = plan_lib.example_draws(num_examples, key, augmentation)

        def stream(number):
            return tf.random.experimental.stateless_fold_in(key, number)

        def shuffled(window, rows):
            index, record = rows
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.shape(index)[0]),
                seed=tf.random.experimental.stateless_fold_in(
                    stream(_WINDOW_STREAM), window),
            )
            return tf.gather(index, order), tf.gather(record, order)

        def keys(index, record):
            return {"index": index, "record": record,
                    **{k: tf.gather(v, index) for k, v in draws.items()}}

        return (
            split.records(shuffle_files=stream(_FILES_STREAM))
            .batch(SHUFFLE_WINDOW)
            .enumerate()
            .map(_plain(shuffled))
            .unbatch()
            .batch(batch_size)
            .map(_plain(keys))
            .enumerate()
        )

    return epoch_batches


# --- Datasets -----------------------------------------------------------------------


def _pieces_of(batches: tf.data.Dataset, batch_size: int, share: WorkerShare):
    """`(step, keys)` global batches -> `(step, replica, keys)`, one element per
    piece of this worker's replicas."""
    if share.num_replicas == 1:
        return batches.map(
            _plain(lambda step, keys: (step, tf.constant(0, tf.int64), keys)))

    def pieces(step, keys):
        rows = tf.shape(keys["index"], out_type=tf.int64)[0]
        starts, stops = plan_lib.piece_bounds(rows, batch_size, share)

        def piece(k):
            return step, k, {name: value[starts[k] : stops[k]] for name, value in keys.items()}

        return tf.data.Dataset.range(share.replicas_per_worker).map(_plain(piece))

    return batches.flat_map(_plain(pieces))


def train_dataset(
    epoch_batches: Batches,
    build,
    *,
    num_examples: int,
    batch_size: int,
    epochs: int | None,
    initial_epoch: int,
    share: WorkerShare,
) -> tf.data.Dataset:
    """Shuffled, augmented training batches of this worker; see `selfkd_tf.data.pipeline`.

    One element per step and replica of the worker (one per step on a single
    worker with one replica).
    """
    steps = math.ceil(num_examples / batch_size)
    per_step = share.replicas_per_worker
    if epochs is None:
        next_epoch = tf.Variable(
            initial_epoch, dtype=tf.int64, trainable=False, name="next_epoch"
        )
        epoch_numbers = tf.data.Dataset.from_tensors(0).map(
            _plain(lambda _: next_epoch.read_value())
        )
    else:
        epoch_numbers = tf.data.Dataset.range(initial_epoch, epochs)
    batches = (
        _pieces_of(epoch_numbers.flat_map(_plain(epoch_batches)), batch_size, share)
        .map(
            _plain(lambda step, replica, keys: (build(keys), step, replica)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
    if epochs is not None:
        return batches.map(_plain(lambda element, step, replica: element)).apply(
            tf.data.experimental.assert_cardinality(
                steps * per_step * (epochs - initial_epoch)
            )
        )

    def count_completed_epoch(element, step, replica):
        # Runs when the consumer reads the batch (after the prefetch), so
        # batches prefetched by an abandoned iterator do not count.
        completed = tf.cast((step == steps - 1) & (replica == per_step - 1), tf.int64)
        with tf.control_dependencies([next_epoch.assign_add(completed)]):
            return tf.nest.map_structure(tf.identity, element)

    options = tf.data.Options()
    # A prefetch injected after the counting map would count ahead of the
    # consumer.
    options.experimental_optimization.inject_prefetch = False
    return (
        batches.map(_plain(count_completed_epoch))
        .apply(tf.data.experimental.assert_cardinality(steps * per_step))
        .with_options(options)
    )


def eval_dataset(
    keys: tf.data.Dataset, build, num_examples: int, batch_size: int, share: WorkerShare
) -> tf.data.Dataset:
    """Unshuffled, unaugmented batches of this worker, in order.

    Args:
        keys: the keys of every example, one element each, in order.
        build: a `batch_builder`.
        num_examples: the examples `keys` holds.
        batch_size: the global batch size.
        share: this worker's replicas.
    """
    batches = math.ceil(num_examples / batch_size)
    return (
        _pieces_of(keys.batch(batch_size).enumerate(), batch_size, share)
        .map(_plain(lambda step, replica, piece: build(piece)),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
        .apply(tf.data.experimental.assert_cardinality(
            batches * share.replicas_per_worker))
    )
