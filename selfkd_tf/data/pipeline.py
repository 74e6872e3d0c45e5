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
`(seed, e)`, and the augmentation of an example from `(seed, e, index)`
(`selfkd_tf.data.plan`; record files, which are read in sequence, are
shuffled by file and within windows, also as a function of `(seed, e)`:
`selfkd_tf.data.streaming.record_batches`). A run resumed at epoch `e`, or
part-way through it, sees exactly the data an uninterrupted run sees, and every
data-parallel replica and worker that builds the datasets with the same
arguments sees its part of the same batches. The last batch of an epoch may be
smaller than `batch_size`, so every example is seen once per epoch.

Several workers (`share`, a `selfkd_tf.data.plan.WorkerShare`): each worker's
datasets hold only its replicas' rows of every global batch, one element per
step and replica, and it reads and decodes only those examples. The `index`
stays global, the example's position in the whole training split, so every
worker's rows address the one PS-KD table.

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
- `"cifar10"`, `"cifar100"`, `"imagenet2012"`: TensorFlow Datasets, prepared
  in `data_dir`;
- `"cifar:PATH"`: the canonical CIFAR python pickles;
- `"folder:PATH"`: `PATH/{train,test}/<class>/<image file>`;
- `"npz:PATH"`: arrays `x_train`, `y_train`, `x_test`, `y_test`.

Every source refuses data that cannot be trained on (a `DataError` naming the
problem): mismatched lengths, an empty split, labels out of range, a single
class, fewer training examples than classes.

Memory (`cache`): data sources held in memory (`digits`, `cifar:`, `npz:`)
stay there. Those that read files (`folder:`, TFDS) are decoded in the
pipeline as they are used, with parallel calls and prefetching, keeping only
file lists, labels and indices in memory (tens of bytes an image), unless
their images fit `MEMORY_CACHE_BYTES` decoded at one size: then
``cache="auto"`` (the default) decodes them once into memory as uint8.
``cache="memory"`` always does, ``cache="none"`` never. A streamed and a
cached run see the same images. `image_size` resizes every image
(bilinear, antialiased); without it images take the size of the first
training image. With ``augmentation="imagenet"`` each image is instead
cropped at its own size to `image_size` (default 224), so its files are
always streamed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from selfkd_tf.data import sources, splits, statistics, streaming
from selfkd_tf.data.augmentation import AUGMENTATIONS
from selfkd_tf.data.plan import WorkerShare
from selfkd_tf.data.sources import DataError, ImageArrays
from selfkd_tf.data.sources.arrays import resize_array
from selfkd_tf.data.sources.folder import first_image_size
from selfkd_tf.data.sources.streamed import FileSplit, StreamedData, decode_image
from selfkd_tf.data.sources.tfds import IMAGENET_STATS

__all__ = [
    "CACHE_MODES",
    "MEMORY_CACHE_BYTES",
    "DataError",
    "DatasetInfo",
    "ImageArrays",
    "class_names",
    "load_arrays",
    "make_datasets",
]

_NORMALIZATIONS = ("dataset", "imagenet")
CACHE_MODES = ("auto", "memory", "none")
MEMORY_CACHE_BYTES = 256 * 2**20
"""``cache="auto"`` decodes a streamed data set into memory when its images,
both splits, take at most this many bytes as uint8 at the size fed to the
model (CIFAR-100's 60,000 32x32 images take 184 MB)."""
IMAGENET_SIZE = 224
"""The image size of ``augmentation="imagenet"`` when none is given."""


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
        cache: `"memory"` (images decoded once and held in memory) or
            `"none"` (decoded as they are used).
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
    cache: str = "memory"


def load_arrays(
    dataset: str,
    data_dir: str | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
) -> ImageArrays:
    """Loads a whole dataset into memory as validated uint8 arrays.

    Args:
        dataset: one of `"digits"`, `"cifar10"`, `"cifar100"`,
            `"imagenet2012"`, `"cifar:PATH"`, `"folder:PATH"`, `"npz:PATH"`
            (see the module docstring).
        data_dir: TFDS data directory; only used by the TFDS data sets.
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


def class_names(dataset: str, data_dir: str | None = None) -> tuple[str, ...]:
    """The class names of a dataset, in label order, decoding no image where
    the source reads files.

    Raises:
        DataError: as `load_arrays`.
    """
    source, path = sources.parse(dataset)
    spec = sources.SourceSpec(source.name, path=path, data_dir=data_dir)
    if source.stream is not None:
        return source.stream(spec).class_names
    return source.load(spec).class_names


def make_datasets(
    dataset: str,
    *,
    data_dir: str | None = None,
    batch_size: int = 128,
    augment: bool = True,
    augmentation: str | None = None,
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
    cache: str = "auto",
    share: WorkerShare | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """Builds the training and evaluation pipelines of a dataset.

    Args:
        dataset: dataset string, see `load_arrays`.
        data_dir: TFDS data directory for the TFDS data sets.
        batch_size: examples per (global) batch; the last batch of an epoch
            and of the evaluation split may be smaller.
        augment: False is ``augmentation="none"``.
        augmentation: `"cifar"` (the default; the paper's: a random `H x W`
            crop of the image zero-padded by 4 pixels, in raw pixel space,
            and a random horizontal flip), `"imagenet"` (random-resized
            crop, flip, colour jitter and lighting for training; resize and
            centre crop for evaluation; `selfkd_tf.data.augmentation`) or
            `"none"`.
        normalization: `"dataset"` (published statistics of CIFAR and
            ImageNet, otherwise the statistics of the training split
            actually used, computed at start-up), `"imagenet"`, or
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
        image_size: optional `H` or `(H, W)` every image is resized (or,
            with the ImageNet augmentation, cropped) to.
        eval_split: what the evaluation dataset holds: `"test"`,
            `"validation"` (needs `validation_fraction > 0`) or `"train"`
            (the training split actually used, unaugmented, to measure how
            well a model fits it); default `"validation"` when
            `validation_fraction > 0`, else `"test"`. `eval_examples` caps
            it in every case.
        cache: `"auto"`, `"memory"` or `"none"`: whether a source that reads
            files is decoded once into memory; see the module docstring.
        share: this worker's replicas of a multi-worker run; default: one
            worker with one replica.

    Returns:
        `(train, eval, info)`: two `tf.data.Dataset`s with elements
        `({"image": float32 [B, H, W, C], "index": int32 [B]}, int32 [B])`
        and their `DatasetInfo`. The training dataset is shuffled and
        augmented; the evaluation dataset is neither. With a `share` of
        several replicas, each element is one replica's part of a batch.

    Raises:
        DataError: invalid argument or input data.

    Example:

    >>> train, val, info = make_datasets(
    ...     "folder:/data/cifar10-jpeg", validation_fraction=0.1, epochs=200
    ... )  # doctest: +SKIP
    >>> model.fit(train, validation_data=val, epochs=200,
    ...           steps_per_epoch=info.steps_per_epoch)  # doctest: +SKIP
    """
    augmentation = _augmentation(augment, augmentation)
    if isinstance(normalization, str):
        _check_choice(normalization, "normalization", _NORMALIZATIONS)
    _check_choice(cache, "cache", CACHE_MODES)
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
    size = _image_size(image_size)
    if size is None and augmentation == "imagenet":
        size = (IMAGENET_SIZE, IMAGENET_SIZE)
    share = share or WorkerShare()

    default_split = "validation" if validation_fraction > 0 else "test"
    eval_split = eval_split or default_split
    _check_choice(eval_split, "eval_split", (default_split, "train"))
    source, path = sources.parse(dataset)
    spec = sources.SourceSpec(source.name, path=path, data_dir=data_dir)
    streamed = None
    if source.stream is not None:
        streamed = source.stream(spec)
        size = size or _first_size(streamed)
        if _cached(streamed, size, cache, augmentation):
            streamed = None
    select = {
        "validation_fraction": validation_fraction, "train_examples": train_examples,
        "eval_split": eval_split, "eval_examples": eval_examples, "seed": subset_seed,
    }
    if streamed is None:
        arrays = load_arrays(dataset, data_dir, image_size=size)
        size = size or arrays.x_train.shape[1:3]
        x_train, y_train, x_eval, y_eval = splits.select_examples(arrays, **select)
        train_reader = streaming.MemoryReader(x_train, y_train)
        eval_reader = streaming.MemoryReader(x_eval, y_eval)
        num_train, num_eval = len(y_train), len(y_eval)
        names, published = arrays.class_names, arrays.published_stats
        train_batches = streaming.plan_batches(
            num_train, batch_size, seed=seed, augmentation=augmentation)
        eval_keys = _index_keys(num_eval)
    else:
        train_split, eval_split_data = _select_streamed(streamed, select)
        train_reader, eval_reader = (
            _reader(split) for split in (train_split, eval_split_data))
        num_train, num_eval = train_split.num_examples, eval_split_data.num_examples
        names, published = streamed.class_names, streamed.published_stats
        train_batches = _streamed_batches(train_split, batch_size, seed, augmentation)
        eval_keys = _streamed_keys(eval_split_data)
    channels = train_reader.channels
    if augmentation == "imagenet" and channels != 3:
        raise DataError(
            f"augmentation='imagenet' needs 3-channel images; {dataset} has {channels}")
    if not isinstance(normalization, str):
        mean, std = (tuple(float(v) for v in stats) for stats in normalization)
        if len(mean) == len(std) and len(mean) != channels:
            raise DataError(
                f"normalization: {dataset} has {channels}-channel images and the "
                f"normalization (a backbone family's, for its network) {len(mean)} "
                "channels; give the network images with as many channels")
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
        mean, std = IMAGENET_STATS
    elif published is not None:
        mean, std = published
    elif streamed is None:
        mean, std = statistics.channel_stats(x_train)
    else:
        mean, std = statistics.streamed_stats(
            train_reader, _streamed_keys(train_split), num_train, augmentation, size,
            batch_size)

    info = DatasetInfo(
        name=source.name if path is None else f"{source.name}:{path}",
        num_classes=len(names),
        num_train=num_train,
        num_eval=num_eval,
        eval_split=eval_split,
        image_shape=(*size, channels),
        mean=tuple(mean),
        std=tuple(std),
        class_names=names,
        steps_per_epoch=math.ceil(num_train / batch_size),
        cache="memory" if streamed is None else "none",
    )

    def builder(reader, training):
        return streaming.batch_builder(
            reader, mean=mean, std=std, augmentation=augmentation, size=size,
            training=training)

    train = streaming.train_dataset(
        train_batches,
        builder(train_reader, True),
        num_examples=num_train,
        batch_size=batch_size,
        epochs=epochs,
        initial_epoch=initial_epoch,
        share=share,
    )
    if epochs is not None:
        train.epoch_range = EpochRange(initial_epoch, epochs, info.steps_per_epoch)
    evaluation = streaming.eval_dataset(
        eval_keys, builder(eval_reader, False), num_eval, batch_size, share)
    return train, evaluation, info


# --- Streamed data --------------------------------------------------------------


def _cached(streamed: StreamedData, size, cache: str, augmentation: str) -> bool:
    """Whether a streamed data set is decoded once into memory instead.

    Raises:
        DataError: ``cache="memory"`` with the ImageNet augmentation.
    """
    if augmentation == "imagenet":
        if cache == "memory":
            raise DataError(
                "cache='memory' holds images at one size; augmentation='imagenet' "
                "crops each image at its own size: use cache='auto' or 'none'")
        return False
    if cache != "auto":
        return cache == "memory"
    images = streamed.train.num_examples + streamed.test.num_examples
    return images * size[0] * size[1] * 3 <= MEMORY_CACHE_BYTES


def _first_size(streamed: StreamedData) -> tuple[int, int]:
    """The size of the first training image, which the others are resized to."""
    train = streamed.train
    if isinstance(train, FileSplit):
        return first_image_size(train.paths)
    _, record = next(iter(train.records(shuffle_files=None)))
    encoded, _ = train.parse(record)
    return tuple(int(d) for d in decode_image(encoded).shape[:2])


def _select_streamed(streamed: StreamedData, select: dict):
    """The training and evaluation splits of a streamed data set.

    Labels of record files are read (one pass, no image decoded) only when a
    subset is asked for.
    """
    train, test = streamed.train, streamed.test
    if not (select["validation_fraction"] or select["train_examples"]
            or select["eval_examples"]):
        return train, (train if select["eval_split"] == "train" else test)
    train_positions, (eval_from, evaluation) = splits.select_positions(
        train.labels, test.labels, streamed.num_classes, **select)
    return (train.subset(train_positions),
            (train if eval_from == "train" else test).subset(evaluation))


def _reader(split):
    return (streaming.FileReader(split) if isinstance(split, FileSplit)
            else streaming.RecordReader(split))


def _streamed_batches(split, batch_size: int, seed: int, augmentation: str):
    if isinstance(split, FileSplit):
        return streaming.plan_batches(
            split.num_examples, batch_size, seed=seed, augmentation=augmentation)
    return streaming.record_batches(
        split, batch_size, seed=seed, augmentation=augmentation)


def _index_keys(num_examples: int) -> tf.data.Dataset:
    return tf.data.Dataset.range(num_examples).map(
        tf.autograph.experimental.do_not_convert(
            lambda i: {"index": tf.cast(i, tf.int32)}))


def _streamed_keys(split) -> tf.data.Dataset:
    if isinstance(split, FileSplit):
        return _index_keys(split.num_examples)
    return split.records(shuffle_files=None).map(
        tf.autograph.experimental.do_not_convert(
            lambda index, record: {"index": index, "record": record}))


# --- Argument checks ----------------------------------------------------------


def _augmentation(augment: bool, augmentation: str | None) -> str:
    """The augmentation asked for by ``augment`` and ``augmentation``."""
    if augmentation is None:
        return "cifar" if augment else "none"
    _check_choice(augmentation, "augmentation", AUGMENTATIONS)
    if not augment and augmentation != "none":
        raise DataError(
            f"augment=False contradicts augmentation={augmentation!r}; give one of them")
    return augmentation


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

