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
  across epochs, which it does when `steps_per_epoch` is given:

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

Sources, selected by the `dataset` string:

- `"cifar10"`, `"cifar100"`: TensorFlow Datasets, prepared in `data_dir` (or
  downloaded by TFDS when it is not).
- `"cifar:PATH"`: the canonical python pickles, `cifar-10-batches-py` or
  `cifar-100-python` (fine labels), given as that folder, its parent folder or
  the `.tar.gz` archive (read in place). Unpickling runs arbitrary code, so
  only load archives you trust.
- `"folder:PATH"`: `PATH/train/<class>/*` and `PATH/test/<class>/*` image files
  (JPEG, PNG, BMP, GIF; other files are ignored). Labels follow the sorted
  class folder names, which must be the same in both splits. Images are
  converted to RGB (grayscale is replicated, alpha dropped) and, when sizes
  differ, resized to `image_size`, or to the size of the first training image
  (first file of the first class) when `image_size` is None.
- `"npz:PATH"`: arrays `x_train`, `y_train`, `x_test`, `y_test` and optionally
  `class_names`. Integer images hold values in [0, 255]; floating images hold
  values in [0, 1] and are scaled by 255. `[N, H, W]` images get a channel
  axis; channels are otherwise kept as they are. Without `class_names`, there
  are `max(label) + 1` classes named "0", "1", ...

Images are decoded once and held in memory as uint8; `image_size` resizes them
once at load time (bilinear, antialiased).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import pickle
import re
import tarfile
import zipfile
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "DataError",
    "DatasetInfo",
    "ImageArrays",
    "load_arrays",
    "make_datasets",
]

_DATASET_FORMS = (
    "'cifar10', 'cifar100', 'cifar:PATH', 'folder:PATH', 'npz:PATH'"
)
_PATH_SOURCES = ("cifar", "folder", "npz")

# Published per-channel statistics of the CIFAR training sets, keyed by the
# number of classes; all other sources compute theirs from the training split.
_CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_NORMALIZATIONS = ("dataset", "imagenet")

_CROP_PADDING = 4
_IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# Distinct streams of the numpy generator that selects examples, so that the
# validation carve-out and the size caps do not depend on one another.
_VALIDATION_STREAM, _TRAIN_CAP_STREAM, _EVAL_CAP_STREAM = 0, 1, 2
# Distinct streams of the stateless TF generator, per epoch.
_ORDER_STREAM, _CROP_STREAM, _FLIP_STREAM = 0, 1, 2


class DataError(ValueError):
    """Invalid dataset argument or input data; the message names the culprit."""


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
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    num_classes: int


def load_arrays(
    dataset: str,
    data_dir: str | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
) -> ImageArrays:
    """Loads a whole dataset into memory as validated uint8 arrays.

    Args:
        dataset: one of `"cifar10"`, `"cifar100"`, `"cifar:PATH"`,
            `"folder:PATH"`, `"npz:PATH"` (see the module docstring).
        data_dir: TFDS data directory; only used by `"cifar10"`/`"cifar100"`.
        image_size: optional `H` or `(H, W)` every image is resized to.

    Returns:
        An `ImageArrays`.

    Raises:
        DataError: unknown dataset string, missing path or invalid data.

    Example:

    >>> arrays = load_arrays("npz:/data/digits.npz")  # doctest: +SKIP
    >>> arrays.x_train.shape, arrays.num_classes  # doctest: +SKIP
    ((1000, 28, 28, 1), 10)
    """
    kind, path = _parse_dataset(dataset)
    size = _image_size(image_size)
    if kind == "folder":
        arrays = _load_folder(path, size)
    elif kind == "cifar":
        arrays = _load_cifar_pickles(path)
    elif kind == "npz":
        arrays = _load_npz(path)
    else:
        arrays = _load_tfds(kind, data_dir)
    if size is None:
        return arrays
    return dataclasses.replace(
        arrays,
        x_train=_resize_array(arrays.x_train, size),
        x_test=_resize_array(arrays.x_test, size),
    )


def make_datasets(
    dataset: str,
    *,
    data_dir: str | None = None,
    batch_size: int = 128,
    augment: bool = True,
    normalization: str = "dataset",
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
            statistics of the training split actually used) or `"imagenet"`.
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
    kind, path = _parse_dataset(dataset)
    arrays = load_arrays(dataset, data_dir, image_size=image_size)
    x_train, y_train, x_eval, y_eval = _select_splits(
        arrays, validation_fraction, train_examples, subset_seed
    )
    if eval_split == "train":
        x_eval, y_eval = x_train, y_train
    if eval_examples is not None and eval_examples < len(y_eval):
        kept = _stratified_sample(y_eval, eval_examples, subset_seed, _EVAL_CAP_STREAM)
        x_eval, y_eval = x_eval[kept], y_eval[kept]
    channels = x_train.shape[-1]
    if normalization == "imagenet":
        if channels != 3:
            raise DataError(
                "normalization='imagenet' needs 3-channel images; "
                f"{dataset} has {channels}"
            )
        mean, std = _IMAGENET_STATS
    elif kind in ("cifar10", "cifar100", "cifar"):
        mean, std = _CIFAR_STATS[arrays.num_classes]
    else:
        mean, std = _channel_stats(x_train)

    info = DatasetInfo(
        name=kind if path is None else f"{kind}:{path}",
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


# --- Splits and statistics ----------------------------------------------------


def _select_splits(
    arrays: ImageArrays,
    validation_fraction: float,
    train_examples: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Carves the validation split and applies the training cap.

    Returns:
        `(x_train, y_train, x_eval, y_eval)`, the evaluation split being the
        validation split or the test split. Kept examples stay in their
        original relative order, which defines their index.
    """
    x_train, y_train = arrays.x_train, arrays.y_train
    if validation_fraction > 0:
        held_out = _stratified_sample(
            y_train,
            round(validation_fraction * len(y_train)),
            seed,
            _VALIDATION_STREAM,
        )
        if not 0 < len(held_out) < len(y_train):
            raise DataError(
                f"validation_fraction={validation_fraction} of {len(y_train)} "
                f"training examples leaves {len(held_out)} for validation; "
                "both splits need examples"
            )
        kept = np.setdiff1d(np.arange(len(y_train)), held_out)
        x_eval, y_eval = x_train[held_out], y_train[held_out]
        x_train, y_train = x_train[kept], y_train[kept]
    else:
        x_eval, y_eval = arrays.x_test, arrays.y_test
    if train_examples is not None and train_examples < len(y_train):
        kept = _stratified_sample(
            y_train, train_examples, seed, _TRAIN_CAP_STREAM
        )
        x_train, y_train = x_train[kept], y_train[kept]
    return x_train, y_train, x_eval, y_eval


def _stratified_sample(
    labels: np.ndarray, count: int, seed: int, stream: int
) -> np.ndarray:
    """Indices of `count` examples drawn per class, in proportion to its size.

    Args:
        labels: int `[N]`.
        count: number of examples to draw, at most `N`.
        seed: non-negative seed; with `stream`, fixes the draw.
        stream: distinguishes independent draws made with the same seed.

    Returns:
        int64 `[count]`, increasing.
    """
    rng = np.random.default_rng([seed, stream])
    classes, sizes = np.unique(labels, return_counts=True)
    quotas = sizes * (count / len(labels))
    taken = np.floor(quotas).astype(np.int64)
    # Largest remainders get the examples rounding left over; the stable sort
    # breaks ties towards lower class ids.
    leftover = count - int(taken.sum())
    taken[np.argsort(taken - quotas, kind="stable")[:leftover]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == label))[:size]
        for label, size in zip(classes, taken)
    ]
    return np.sort(np.concatenate(chosen))


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


# --- Sources ------------------------------------------------------------------


def _parse_dataset(dataset: str) -> tuple[str, str | None]:
    """Splits a dataset string into `(kind, absolute path or None)`."""
    if dataset in ("cifar10", "cifar100"):
        return dataset, None
    kind, colon, path = str(dataset).partition(":")
    if not colon or kind not in _PATH_SOURCES:
        raise DataError(
            f"unknown dataset {dataset!r}; expected one of {_DATASET_FORMS}"
        )
    if not path:
        raise DataError(
            f"dataset {dataset!r} has an empty path; expected {kind}:PATH"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"{kind} path does not exist: {path}")
    return kind, path


def _image_arrays(
    source: str,
    x_train,
    y_train,
    x_test,
    y_test,
    class_names: Sequence[str] | None = None,
) -> ImageArrays:
    """Validates raw arrays from any source and converts them to `ImageArrays`.

    Args:
        source: what the arrays were read from, for messages.
        x_train, x_test: images `[N, H, W]` or `[N, H, W, C]`, integers in
            [0, 255] or floats in [0, 1].
        y_train, y_test: integer labels `[N]` (or `[N, 1]`).
        class_names: names in label order; None names classes "0", "1", ...
            up to the largest label.
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
    return ImageArrays(
        x_train, y_train, x_test, y_test, class_names, len(class_names)
    )


def _uint8_images(source: str, name: str, images) -> np.ndarray:
    """Converts images to uint8 `[N, H, W, C]` (see `_image_arrays`)."""
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


def _load_tfds(name: str, data_dir: str | None) -> ImageArrays:
    """Loads `cifar10`/`cifar100` with TensorFlow Datasets."""
    # Imported here: it adds seconds to start-up and only this source needs it.
    import tensorflow_datasets as tfds

    try:
        splits, info = tfds.load(
            name,
            split=["train", "test"],
            data_dir=data_dir,
            as_supervised=True,
            with_info=True,
        )
        # Chunks rather than batch_size=-1, which relies on split sizes from
        # the metadata.
        (x_train, y_train), (x_test, y_test) = (
            [
                np.concatenate(part)
                for part in zip(*tfds.as_numpy(split.batch(10_000)))
            ]
            for split in splits
        )
    # TFDS fails in many ways (missing data, no network, ...), all reported
    # the same way.
    except Exception as err:
        raise DataError(
            f"cannot load TFDS dataset {name!r} (data_dir={data_dir}): "
            f"{_first_line(err)}"
        ) from None
    return _image_arrays(
        f"TFDS {name}",
        x_train,
        y_train,
        x_test,
        y_test,
        info.features["label"].names,
    )


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    """File names and pickle keys of one canonical CIFAR python release."""

    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


_CIFAR_LAYOUTS = (
    _CifarLayout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    _CifarLayout(
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
)
_CIFAR_FILES = frozenset(
    name
    for layout in _CIFAR_LAYOUTS
    for name in (*layout.train, layout.test, layout.meta)
)


def _load_cifar_pickles(path: str) -> ImageArrays:
    """Loads CIFAR pickles from a release folder, its parent or its archive."""
    if os.path.isdir(path):
        return _read_cifar(
            path,
            lambda name: os.path.isfile(os.path.join(path, name)),
            lambda name: pathlib.Path(path, name).read_bytes(),
        )
    # Read the archive once, in order: seeking back in a .gz stream would
    # decompress it again from the start.
    contents = {}
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if (
                    member.isfile()
                    and os.path.basename(member.name) in _CIFAR_FILES
                ):
                    contents[os.path.normpath(member.name)] = (
                        archive.extractfile(member).read()
                    )
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"cannot read {path} as a CIFAR tar archive: {_first_line(err)}"
        ) from None
    return _read_cifar(path, contents.__contains__, contents.__getitem__)


def _read_cifar(
    source: str, exists: Callable[[str], bool], read: Callable[[str], bytes]
) -> ImageArrays:
    """Reads a CIFAR release through `exists`/`read` of relative file names."""
    found = [
        (layout, prefix)
        for layout in _CIFAR_LAYOUTS
        for prefix in ("", layout.folder)
        if exists(os.path.join(prefix, layout.meta))
    ]
    if len({layout.folder for layout, _ in found}) != 1:
        problem = (
            "holds both CIFAR-10 and CIFAR-100 data"
            if found
            else "holds no CIFAR python data"
        )
        raise DataError(
            f"{source} {problem}; expected cifar-10-batches-py or "
            "cifar-100-python (the folder, its parent folder or its .tar.gz "
            "archive)"
        )
    layout, prefix = found[0]

    def unpickle(name):
        where = os.path.join(source, prefix, name)
        if not exists(os.path.join(prefix, name)):
            raise DataError(f"missing CIFAR file {where}")
        try:
            # The canonical files are Python 2 pickles; "bytes" keeps their
            # str keys as bytes.
            content = pickle.loads(
                read(os.path.join(prefix, name)), encoding="bytes"
            )
        # Corrupt pickles raise almost any exception type.
        except Exception as err:
            raise DataError(
                f"cannot unpickle {where}: {_first_line(err)}"
            ) from None
        if not isinstance(content, dict):
            raise DataError(
                f"{where} holds a {type(content).__name__}, not a CIFAR dict"
            )
        return where, {
            k.decode() if isinstance(k, bytes) else k: v
            for k, v in content.items()
        }

    def field(where, content, key):
        if key not in content:
            raise DataError(f"{where} has no key {key!r}")
        return content[key]

    def batch(name):
        where, content = unpickle(name)
        data = np.asarray(field(where, content, "data"))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{where}: 'data' has shape {data.shape}; expected [N, 3072]"
            )
        # Rows hold the red, green and blue 32x32 planes one after the other.
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(field(where, content, layout.label_key))

    train = [batch(name) for name in layout.train]
    x_test, y_test = batch(layout.test)
    where, meta = unpickle(layout.meta)
    names = [
        n.decode() if isinstance(n, bytes) else n
        for n in field(where, meta, layout.names_key)
    ]
    return _image_arrays(
        os.path.join(source, prefix),
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        x_test,
        y_test,
        names,
    )


def _load_npz(path: str) -> ImageArrays:
    """Loads `x_train, y_train, x_test, y_test[, class_names]` from an .npz."""
    try:
        content = np.load(path, allow_pickle=False)
        if isinstance(content, np.lib.npyio.NpzFile):
            with content:
                arrays = {key: content[key] for key in content.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"cannot read npz file {path}: {_first_line(err)}"
        ) from None
    if not isinstance(content, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive")
    missing = [key for key in _NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks arrays {', '.join(missing)}; "
            f"expected {', '.join(_NPZ_KEYS)} "
            "(and optionally class_names)"
        )
    return _image_arrays(
        path, *(arrays[key] for key in _NPZ_KEYS), arrays.get("class_names")
    )


def _load_folder(root: str, size: tuple[int, int] | None) -> ImageArrays:
    """Decodes `root/{train,test}/<class>/<image>` into memory."""
    files = {
        split: _class_files(os.path.join(root, split))
        for split in ("train", "test")
    }
    if files["train"].keys() != files["test"].keys():
        only_train = sorted(files["train"].keys() - files["test"].keys())
        only_test = sorted(files["test"].keys() - files["train"].keys())
        raise DataError(
            f"class folders differ between {root}/train and {root}/test: "
            f"only in train: {only_train}, only in test: {only_test}"
        )
    class_names = sorted(files["train"])
    splits = []
    for split in ("train", "test"):
        paths = [path for name in class_names for path in files[split][name]]
        labels = [
            label
            for label, name in enumerate(class_names)
            for _ in files[split][name]
        ]
        splits.append((paths, labels))
    if size is None:
        first = splits[0][0][0]
        try:
            size = tuple(_read_image(first).shape[:2])
        except tf.errors.OpError:
            raise _image_error(first) from None
    (train_paths, y_train), (test_paths, y_test) = splits
    return _image_arrays(
        root,
        _decode_files(train_paths, size),
        np.asarray(y_train),
        _decode_files(test_paths, size),
        np.asarray(y_test),
        class_names,
    )


def _class_files(split_dir: str) -> dict[str, list[str]]:
    """Maps each class folder name of `split_dir` to its sorted image files."""
    if not os.path.isdir(split_dir):
        raise DataError(
            f"missing folder {split_dir}; "
            "expected PATH/train/<class>/ and PATH/test/<class>/"
        )
    classes = sorted(
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise DataError(f"{split_dir} has no class folders")
    files = {}
    for name in classes:
        class_dir = os.path.join(split_dir, name)
        files[name] = sorted(
            entry.path
            for entry in os.scandir(class_dir)
            if entry.is_file()
            and entry.name.lower().endswith(_IMAGE_EXTENSIONS)
        )
        if not files[name]:
            raise DataError(
                f"class folder {class_dir} has no image files "
                f"({', '.join(_IMAGE_EXTENSIONS)})"
            )
    return files


def _read_image(path) -> tf.Tensor:
    """Reads and decodes one image file to uint8 RGB `[H, W, 3]`."""
    return tf.io.decode_image(
        tf.io.read_file(path), channels=3, expand_animations=False
    )


def _image_error(path: str, others: int = 0) -> DataError:
    """A `DataError` naming an unreadable image file, with the reason."""
    try:
        _read_image(path)
        reason = ""
    except tf.errors.OpError as err:
        # Drop the op and function names TF wraps around the reason.
        reason = ": " + re.sub(
            r"\{\{.*?\}\}\s*|\s*\[Op:.*", "", _first_line(err.message)
        )
    more = f" (and {others} more)" if others else ""
    return DataError(f"cannot read or decode image file {path}{more}{reason}")


def _decode_files(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """Decodes image files in parallel to uint8 RGB `[N, *size, 3]`."""

    def decode(path):
        image = _read_image(path)
        image = tf.cond(
            tf.reduce_all(tf.shape(image)[:2] == size),
            lambda: image,
            lambda: _resize_uint8(image, size),
        )
        return path, tf.ensure_shape(image, [*size, 3])

    decoded = (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Unreadable files drop out here and are reported by name below,
        # instead of an error from deep inside the pipeline.
        .ignore_errors()
        .batch(1024)
        .prefetch(tf.data.AUTOTUNE)
    )
    done, chunks = [], []
    for names, images in decoded.as_numpy_iterator():
        done.extend(os.fsdecode(name) for name in names)
        chunks.append(images)
    if len(done) < len(paths):
        failed = sorted(set(paths) - set(done))
        raise _image_error(failed[0], others=len(failed) - 1)
    return np.concatenate(chunks)


def _resize_uint8(images: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Resizes uint8 `[..., H, W, C]` to `size`, bilinear and antialiased."""
    resized = tf.image.resize(images, size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _resize_array(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes uint8 `[N, H, W, C]` to `[N, size[0], size[1], C]` in chunks."""
    if images.shape[1:3] == size:
        return images
    return np.concatenate(
        [
            _resize_uint8(images[i : i + 1024], size).numpy()
            for i in range(0, len(images), 1024)
        ]
    )


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


def _first_line(error) -> str:
    """The first line of an error message: `DataError`s fit on one line."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
