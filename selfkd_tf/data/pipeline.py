"""Image-classification input pipelines that carry a stable sample index.

PS-KD keeps, for every training example, the network's prediction from the
previous epoch, in a table indexed by the example's position in the training
split. Every batch therefore carries the index of each of its examples.

Both datasets returned by `make_datasets` yield elements

    ({"image": float32 [B, H, W, C], "index": int32 [B]}, label int32 [B])

- `image`: normalized pixels, `(x / 255 - mean) / std` per channel, with
  `mean`/`std` from `DatasetInfo`.
- `index`: for the training dataset, the position of the example in the
  training split actually used (after any validation carve-out or
  `train_examples` cap), in `[0, num_train)`. It stays attached to the same
  example in every epoch, however the data are shuffled. For the evaluation
  dataset it is the position in the evaluation split.
- `label`: class id in `[0, num_classes)`.

The index rides inside `x` because Keras reads a 3-tuple as
`(x, y, sample_weight)`.

Determinism: the order of epoch `e` is a permutation derived statelessly from
`(seed, e)`, and the augmentation of an example from `(seed, e, index)`. A run
resumed at epoch `e` sees exactly the data an uninterrupted run sees, and every
data-parallel replica that builds the datasets with the same arguments sees the
same batches. The last batch of an epoch may be smaller than `batch_size`, so
every example is seen once per epoch.

Epochs of the training dataset:

- `epochs=N`: one dataset holding epochs `initial_epoch, ..., N - 1` back to
  back, `steps_per_epoch` batches each. Keras must then keep one iterator
  across epochs, which it does when `steps_per_epoch` is given; the dataset
  carries them (`EpochRange`, its ``epoch_range``), and `SelfKDModel.fit`
  takes ``steps_per_epoch`` from it when it is left out, and refuses other
  ``epochs`` than the dataset's:

  ```python
  train, val, info = make_datasets("cifar100", epochs=200)
  model.fit(train, validation_data=val, epochs=200,
            steps_per_epoch=info.steps_per_epoch)
  ```

- `epochs=None`: every iteration over the dataset yields one epoch, starting
  at `initial_epoch`. The dataset counts completed epochs: once the last batch
  of epoch `e` has been read, the next iteration yields epoch `e + 1`. An
  iteration abandoned early (Keras reads one batch to build a model) does not
  advance it, so `model.fit(train, epochs=200)` sees epochs 0, 1, 2, ...
  Consumers that read ahead (tf.distribute iterators buffer about two batches)
  may count that early look as a whole epoch when an epoch has only a few
  batches; use `epochs=N` there.

Sources, selected by the `dataset` string, live in `selfkd_tf.data.sources`, one
module each (what each reads, and how, is documented there):

- `"digits"`: scikit-learn's handwritten digits, shipped inside the installed
  package: no download, no files of your own;
- `"cifar10"`, `"cifar100"`: TensorFlow Datasets, prepared in `data_dir`;
- `"cifar:PATH"`: the canonical CIFAR python pickles;
- `"folder:PATH"`: `PATH/{train,test}/<class>/<image file>`;
- `"npz:PATH"`: arrays `x_train`, `y_train`, `x_test`, `y_test`.

Every source refuses data that cannot be trained on (a `DataError` naming the
problem): mismatched lengths, an empty split, labels out of range, a single
class, fewer training examples than classes.

Images are decoded once and held in memory as uint8; `image_size` resizes them
once at load time (bilinear, antialiased).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from selfkd_tf.data import sources

from selfkd_tf.data import splits
from selfkd_tf.data.sources import DataError, ImageArrays
from selfkd_tf.data.sources.arrays import resize_array

__all__ = [
    "DataError",
    "DatasetInfo",
    "ImageArrays",
    "load_arrays",
    "make_datasets",
]

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_NORMALIZATIONS = ("dataset", "imagenet")

_CROP_PADDING = 4

# Distinct streams of the stateless TF generator, per epoch.
_ORDER_STREAM, _CROP_STREAM, _FLIP_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class EpochRange:
    """The epochs a training dataset built with ``epochs=N`` holds back to back.

    `make_datasets` sets it as the training dataset's ``epoch_range``;
    `selfkd_tf.distillation.model.SelfKDModel.fit` reads it, so that a
    ``fit`` without ``steps_per_epoch`` takes one epoch per epoch (Keras
    would take the whole dataset, all ``N`` epochs, as each one), and a
    ``fit`` over other epochs than the dataset holds is refused. A dataset
    transformed further (``.map``, ``.take``, ...) no longer carries it.

    Attributes:
        initial_epoch: the first epoch (0-based).
        epochs: one past the last epoch: ``fit``'s ``epochs``.
        steps_per_epoch: batches of every epoch.
    """

    initial_epoch: int
    epochs: int
    steps_per_epoch: int


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Description of the datasets returned by `make_datasets`.

    Attributes:
        name: canonical dataset string, e.g. `"cifar100"` or
            `"folder:/abs/path"`.
        num_classes: number of classes.
        num_train: examples in the training split actually used.
        num_eval: examples in the evaluation split returned.
        eval_split: `"test"`, `"validation"` or `"train"`.
        image_shape: `(H, W, C)` of the images fed to the model.
        mean: per-channel mean in [0, 1] pixel units used for normalization.
        std: per-channel standard deviation in [0, 1] pixel units.
        class_names: one name per class, in label order.
        steps_per_epoch: `ceil(num_train / batch_size)`.
    """

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    eval_split: str
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    steps_per_epoch: int


def load_arrays(
    dataset: str,
    data_dir: str | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
) -> ImageArrays:
    """Loads a whole dataset into memory as validated uint8 arrays.

    Args:
        dataset: one of `"digits"`, `"cifar10"`, `"cifar100"`,
            `"cifar:PATH"`, `"folder:PATH"`, `"npz:PATH"` (see the module
            docstring).
        data_dir: TFDS data directory; only used by `"cifar10"`/`"cifar100"`.
        image_size: optional `H` or `(H, W)` every image is resized to.

    Returns:
        An `ImageArrays`.

    Raises:
        DataError: unknown dataset string, missing path or invalid data.

    Example:

    >>> arrays = load_arrays("digits", image_size=16)
    >>> arrays.x_train.shape, arrays.num_classes
    ((1442, 16, 16, 1), 10)
    """
    size = _image_size(image_size)
    source, path = sources.parse(dataset)
    arrays = source.load(
        sources.SourceSpec(source.name, path=path, data_dir=data_dir, image_size=size)
    )
    if size is None:
        return arrays
    return dataclasses.replace(
        arrays,
        x_train=resize_array(arrays.x_train, size),
        x_test=resize_array(arrays.x_test, size),
    )


def make_datasets(
    dataset: str,
    *,
    data_dir: str | None = None,
    batch_size: int = 128,
    augment: bool = True,
    normalization: str | tuple[Sequence[float], Sequence[float]] = "dataset",
    validation_fraction: float = 0.0,
    train_examples: int | None = None,
    eval_examples: int | None = None,
    seed: int = 0,
    subset_seed: int | None = None,
    epochs: int | None = None,
    initial_epoch: int = 0,
    image_size: int | tuple[int, int] | None = None,
    eval_split: str | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """Builds the training and evaluation pipelines of a dataset.

    Args:
        dataset: dataset string, see `load_arrays`.
        data_dir: TFDS data directory for `"cifar10"`/`"cifar100"`.
        batch_size: examples per batch; the last batch of an epoch and of the
            evaluation split may be smaller.
        augment: whether training images get the paper's augmentation: a
            random `H x W` crop of the image zero-padded by 4 pixels (in raw
            pixel space, before normalization) and a random horizontal flip.
        normalization: `"dataset"` (published CIFAR statistics, otherwise the
            statistics of the training split actually used), `"imagenet"`, or
            `(mean, std)` per channel in [0, 1] pixel units (the
            normalisation a backbone family expects,
            `selfkd_tf.models.applications.input_normalization`; mean 0 and
            std 1/255 leave the pixels 0..255).
        validation_fraction: in `[0, 1)`. When positive, a stratified split of
            this fraction of the training set, chosen by `subset_seed`, is
            held out and returned as the evaluation split instead of the test
            split.
        train_examples: optional cap on the training split, a stratified
            subset chosen by `subset_seed` (small-data studies, smoke runs).
        eval_examples: optional cap on the evaluation split, likewise.
        seed: non-negative seed of the order and the augmentation.
        subset_seed: non-negative seed of the validation split and of the
            `train_examples`/`eval_examples` subsets; default `seed`. Fix it
            to train several seeds on one and the same subset.
        epochs: total number of epochs, or None; see the module docstring.
        initial_epoch: first epoch the training dataset yields.
        image_size: optional `H` or `(H, W)` every image is resized to.
        eval_split: what the evaluation dataset holds: `"test"`,
            `"validation"` (needs `validation_fraction > 0`) or `"train"`
            (the training split actually used, unaugmented, to measure how
            well a model fits it); default `"validation"` when
            `validation_fraction > 0`, else `"test"`. `eval_examples` caps
            it in every case.

    Returns:
        `(train, eval, info)`: two `tf.data.Dataset`s with elements
        `({"image": float32 [B, H, W, C], "index": int32 [B]}, int32 [B])`
        and their `DatasetInfo`. The training dataset is shuffled and
        augmented; the evaluation dataset is neither.

    Raises:
        DataError: invalid argument or input data.

    Example:

    >>> train, val, info = make_datasets(
    ...     "folder:/data/cifar10-jpeg", validation_fraction=0.1, epochs=200
    ... )  # doctest: +SKIP
    >>> model.fit(train, validation_data=val, epochs=200,
    ...           steps_per_epoch=info.steps_per_epoch)  # doctest: +SKIP
    """
    if isinstance(normalization, str):
        _check_choice(normalization, "normalization", _NORMALIZATIONS)
    _check_int(batch_size, "batch_size", minimum=1)
    _check_int(seed, "seed", minimum=0)
    if subset_seed is None:
        subset_seed = seed
    _check_int(subset_seed, "subset_seed", minimum=0)
    _check_int(initial_epoch, "initial_epoch", minimum=0)
    if epochs is not None:
        _check_int(epochs, "epochs", minimum=initial_epoch + 1)
    for name, cap in (
        ("train_examples", train_examples),
        ("eval_examples", eval_examples),
    ):
        if cap is not None:
            _check_int(cap, name, minimum=1)
    if (
        isinstance(validation_fraction, bool)
        or not isinstance(validation_fraction, (int, float))
        or not 0.0 <= validation_fraction < 1.0
    ):
        raise DataError(
            "validation_fraction must be a number in [0, 1); "
            f"got {validation_fraction!r}"
        )

    default_split = "validation" if validation_fraction > 0 else "test"
    eval_split = eval_split or default_split
    _check_choice(eval_split, "eval_split", (default_split, "train"))
    source, path = sources.parse(dataset)
    arrays = load_arrays(dataset, data_dir, image_size=image_size)
    x_train, y_train, x_eval, y_eval = splits.select_examples(
        arrays,
        validation_fraction=validation_fraction,
        train_examples=train_examples,
        eval_split=eval_split,
        eval_examples=eval_examples,
        seed=subset_seed,
    )
    channels = x_train.shape[-1]
    if not isinstance(normalization, str):
        mean, std = (tuple(float(v) for v in stats) for stats in normalization)
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise DataError(
                f"normalization: expected a mean and a positive std per channel of "
                f"{dataset}'s {channels}; got {normalization!r}")
    elif normalization == "imagenet":
        if channels != 3:
            raise DataError(
                "normalization='imagenet' needs 3-channel images; "
                f"{dataset} has {channels}"
            )
        mean, std = _IMAGENET_STATS
    elif arrays.published_stats is not None:
        mean, std = arrays.published_stats
    else:
        mean, std = _channel_stats(x_train)

    info = DatasetInfo(
        name=source.name if path is None else f"{source.name}:{path}",
        num_classes=arrays.num_classes,
        num_train=len(y_train),
        num_eval=len(y_eval),
        eval_split=eval_split,
        image_shape=tuple(int(d) for d in x_train.shape[1:]),
        mean=tuple(mean),
        std=tuple(std),
        class_names=arrays.class_names,
        steps_per_epoch=math.ceil(len(y_train) / batch_size),
    )
    train = _train_dataset(
        _batch_builder(x_train, y_train, mean, std),
        num_examples=len(y_train),
        batch_size=batch_size,
        augment=augment,
        seed=seed,
        epochs=epochs,
        initial_epoch=initial_epoch,
    )
    if epochs is not None:
        train.epoch_range = EpochRange(initial_epoch, epochs, info.steps_per_epoch)
    evaluation = _eval_dataset(
        _batch_builder(x_eval, y_eval, mean, std), len(y_eval), batch_size
    )
    return train, evaluation, info


# --- Pipelines ----------------------------------------------------------------

_BatchBuilder = Callable[..., tuple[dict[str, tf.Tensor], tf.Tensor]]


def _batch_builder(
    images: np.ndarray,
    labels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
) -> _BatchBuilder:
    """Returns `build(index, offset=None, flip=None)` making one batch.

    `index` is int `[B]`; `offset` (int32 `[B, 2]`) and `flip` (bool `[B]`),
    given together, describe the crop and flip of each example. The images
    stay in memory as one uint8 tensor and are gathered, augmented and
    normalized a whole batch at a time.
    """
    images = tf.constant(images)
    labels = tf.constant(labels, dtype=tf.int32)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    # (x / 255 - mean) / std as a single multiply-add.
    scale = tf.constant(1.0 / (255.0 * std))
    shift = tf.constant(-mean / std)

    def build(index, offset=None, flip=None):
        batch = tf.gather(images, index)
        if offset is not None:
            batch = _crop_and_flip(batch, offset, flip)
        features = {
            "image": tf.cast(batch, tf.float32) * scale + shift,
            "index": tf.cast(index, tf.int32),
        }
        return features, tf.gather(labels, index)

    return build


def _crop_and_flip(
    images: tf.Tensor, offset: tf.Tensor, flip: tf.Tensor
) -> tf.Tensor:
    """Crops each image from its zero-padded self, then optionally mirrors it.

    Args:
        images: uint8 `[B, H, W, C]`.
        offset: int32 `[B, 2]`, top-left corner `(row, col)` of each crop in
            the image padded by `_CROP_PADDING`, in `[0, 2 * _CROP_PADDING]`.
        flip: bool `[B]`, whether to mirror each crop horizontally.

    Returns:
        uint8 `[B, H, W, C]`.
    """
    height, width = images.shape[1], images.shape[2]
    p = _CROP_PADDING
    padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
    rows = offset[:, :1] + tf.range(height)
    cols = offset[:, 1:] + tf.range(width)
    # Mirroring the crop is reading its columns right to left.
    cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
    # Two batched gathers crop every image at its own offset in one op each.
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def _epoch_plan(
    num_examples: int, seed: int, epoch: tf.Tensor, augment: bool
) -> dict[str, tf.Tensor]:
    """The order and augmentation of one epoch, a function of `(seed, epoch)`.

    Returns:
        `{"index": int32 [N]}` (a permutation of `range(N)`) and, when
        `augment`, `"offset"` int32 `[N, 2]` and `"flip"` bool `[N]` aligned
        with it: the crop and flip of example `index[i]` depend only on
        `(seed, epoch, index[i])`.
    """
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])

    def stream(number):
        return tf.random.experimental.stateless_fold_in(key, number)

    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples), seed=stream(_ORDER_STREAM)
    )
    plan = {"index": order}
    if augment:
        # Drawn per example index, then read in epoch order.
        offset = tf.random.stateless_uniform(
            [num_examples, 2],
            seed=stream(_CROP_STREAM),
            maxval=2 * _CROP_PADDING + 1,
            dtype=tf.int32,
        )
        flip = tf.random.stateless_uniform(
            [num_examples], seed=stream(_FLIP_STREAM), maxval=2, dtype=tf.int32
        )
        plan["offset"] = tf.gather(offset, order)
        plan["flip"] = tf.gather(flip, order) == 1
    return plan


def _train_dataset(
    build: _BatchBuilder,
    *,
    num_examples: int,
    batch_size: int,
    augment: bool,
    seed: int,
    epochs: int | None,
    initial_epoch: int,
) -> tf.data.Dataset:
    """Shuffled, optionally augmented batches; see the module docstring."""
    steps = math.ceil(num_examples / batch_size)

    def epoch_batches(epoch):
        plan = _epoch_plan(num_examples, seed, epoch, augment)

        def batch_plan(step):
            start = step * batch_size
            return step, {
                k: v[start : start + batch_size] for k, v in plan.items()
            }

        return tf.data.Dataset.range(steps).map(batch_plan)

    if epochs is None:
        next_epoch = tf.Variable(
            initial_epoch, dtype=tf.int64, trainable=False, name="next_epoch"
        )
        epoch_numbers = tf.data.Dataset.from_tensors(0).map(
            lambda _: next_epoch.read_value()
        )
    else:
        epoch_numbers = tf.data.Dataset.range(initial_epoch, epochs)
    batches = (
        epoch_numbers.flat_map(epoch_batches)
        .map(
            lambda step, plan: (build(**plan), step),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
    if epochs is not None:
        return batches.map(lambda element, step: element).apply(
            tf.data.experimental.assert_cardinality(
                steps * (epochs - initial_epoch)
            )
        )

    def count_completed_epoch(element, step):
        # Runs when the consumer reads the batch (after the prefetch), so
        # batches prefetched by an abandoned iterator do not count.
        completed = tf.cast(step == steps - 1, tf.int64)
        with tf.control_dependencies([next_epoch.assign_add(completed)]):
            return tf.nest.map_structure(tf.identity, element)

    options = tf.data.Options()
    # A prefetch injected after the counting map would count ahead of the
    # consumer.
    options.experimental_optimization.inject_prefetch = False
    return (
        batches.map(count_completed_epoch)
        .apply(tf.data.experimental.assert_cardinality(steps))
        .with_options(options)
    )


def _eval_dataset(
    build: _BatchBuilder, num_examples: int, batch_size: int
) -> tf.data.Dataset:
    """Unshuffled, unaugmented batches of the evaluation split, in order."""
    return (
        tf.data.Dataset.range(num_examples)
        .batch(batch_size)
        .map(build, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


# --- Statistics ---------------------------------------------------------------


def _channel_stats(
    images: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 `[N, H, W, C]`, in [0, 1] units."""
    channels = images.shape[-1]
    pixels = images.reshape(-1, channels)
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    # Float64 sums over chunks: exact enough, and never a float copy of it all.
    for start in range(0, len(pixels), 1 << 22):
        chunk = pixels[start : start + (1 << 22)].astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    mean = total / len(pixels)
    std = np.sqrt(np.maximum(total_sq / len(pixels) - np.square(mean), 0.0))
    # A constant channel would otherwise divide by zero; one grey level is
    # the smallest meaningful spread.
    std = np.maximum(std, 1.0)
    return tuple((mean / 255.0).tolist()), tuple((std / 255.0).tolist())


# --- Argument checks ----------------------------------------------------------


def _image_size(image_size) -> tuple[int, int] | None:
    """Normalizes `image_size` (None, `H` or `(H, W)`) to None or `(H, W)`."""
    if image_size is None:
        return None
    size = (
        (image_size, image_size) if isinstance(image_size, int) else image_size
    )
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0
            for d in size
        )
    ):
        raise DataError(
            "image_size must be a positive int or (height, width); "
            f"got {image_size!r}"
        )
    return tuple(size)


def _check_int(value, name: str, *, minimum: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise DataError(
            f"{name} must be an integer >= {minimum}; got {value!r}"
        )


def _check_choice(value, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise DataError(
            f"{name} must be one of {', '.join(map(repr, allowed))}; "
            f"got {value!r}"
        )

