"""`cifar10`, `cifar100`, `imagenet2012`: TensorFlow Datasets (TFDS), read as tf.data.

A copy prepared in `data_dir` (default: TFDS's, `~/tensorflow_datasets` or
`$TFDS_DATA_DIR`) is read offline, straight from its TFRecord files
(`stream`: `selfkd_tf.data.sources.streamed.RecordSplit`), never converted
to arrays; small ones may be decoded once into memory (`load`, through the
same files). The evaluation split is `test`, or `validation` where there is
no `test` (ImageNet).

When there is no prepared copy:

- `cifar10`, `cifar100`: TFDS downloads and prepares one, after a quick
  check that the download host (or the HTTPS proxy the environment names, as
  `requests` would use) accepts a connection within `CONNECT_TIMEOUT_S`
  seconds: without a network the load fails at once with a `DataError`
  naming the offline choices, instead of TFDS retrying for minutes.
  Whatever a failed or interrupted download wrote into `data_dir` is removed.
- `imagenet2012`: its files are downloaded by hand (`MANUAL_FILES`, into
  `<data_dir>/downloads/manual`); TFDS prepares the copy from them. A
  missing file is named in one line.

A prepared copy whose record files are missing is refused, naming one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import urllib.parse
import urllib.request
from typing import Iterator

import numpy as np
import tensorflow as tf

from selfkd_tf.data.sources import registry
from selfkd_tf.data.sources.arrays import DataError, ImageArrays, first_line
from selfkd_tf.data.sources.arrays import image_arrays, resize_uint8
from selfkd_tf.data.sources.cifar import PUBLISHED_STATS
from selfkd_tf.data.sources.streamed import RecordSplit, StreamedData, decode_image

__all__ = ["CONNECT_TIMEOUT_S", "DOWNLOAD_HOST", "IMAGENET_STATS", "MANUAL_FILES"]

# Where TFDS's cifar10 and cifar100 builders download their archives from.
DOWNLOAD_HOST = "www.cs.toronto.edu"
_HTTPS_PORT = 443
CONNECT_TIMEOUT_S = 5.0
_OFFLINE_CHOICES = (
    "offline, use --data_dir=DIR holding a prepared TFDS copy, "
    "--dataset=cifar:PATH (the CIFAR python pickles), folder:PATH, npz:PATH, "
    "or the embedded --dataset=digits"
)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""The per-channel mean and std of ImageNet's training images, in [0, 1] units."""
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}
"""The files a data set's TFDS builder needs downloaded by hand."""


def _builder(spec: registry.SourceSpec):
    """The TFDS builder of `spec.name`, prepared (downloaded when possible).

    Raises:
        DataError: not prepared and it cannot be: no network, or files to be
            downloaded by hand missing; record files of the copy missing.
    """
    # Imported here: it adds seconds to start-up and only this source needs it.
    import tensorflow_datasets as tfds

    name = spec.name
    builder = tfds.builder(name, data_dir=spec.data_dir)
    root = os.fspath(builder.data_dir_root)
    # is_prepared() warns about a variant folder that does not exist.
    if not (builder.data_path.exists() and builder.is_prepared()):
        if name in MANUAL_FILES:
            manual = os.path.join(root, "downloads", "manual")
            missing = [f for f in MANUAL_FILES[name]
                       if not os.path.isfile(os.path.join(manual, f))]
            if missing:
                raise DataError(
                    f"TFDS dataset {name!r} is not prepared in {root} and its files "
                    f"are downloaded by hand: {', '.join(missing)} missing in {manual}")
            config = tfds.download.DownloadConfig(manual_dir=manual)
            builder.download_and_prepare(download_config=config)
        else:
            unreachable = _unreachable(DOWNLOAD_HOST, _HTTPS_PORT)
            if unreachable:
                raise DataError(
                    f"TFDS dataset {name!r} is not prepared in {root} and "
                    f"cannot be downloaded: {unreachable}; {_OFFLINE_CHOICES}"
                )
            with _removed_on_failure(root, [name, "downloads"]):
                builder.download_and_prepare()
    if builder.info.file_format.value != "tfrecord":
        raise DataError(
            f"TFDS dataset {name!r} in {root} is stored as "
            f"{builder.info.file_format.value}; only TFRecord copies are read")
    return builder


def _record_split(builder, split: str) -> RecordSplit:
    """The record files of one prepared split.

    Raises:
        DataError: a record file is missing.
    """
    import tensorflow_datasets as tfds

    info = builder.info.splits[split]
    files = tuple(os.fspath(path) for path in info.filepaths)
    missing = [path for path in files if not os.path.exists(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"TFDS dataset {builder.name!r} split {split!r} is incomplete: "
            f"{missing[0]}{more} missing; prepare it again")
    features = builder.info.features
    decoders = {"image": tfds.decode.SkipDecoding()}

    def parse(record):
        example = features.deserialize_example(record, decoders=decoders)
        return example["image"], tf.cast(example["label"], tf.int64)

    return RecordSplit(files, tuple(int(n) for n in info.shard_lengths), parse,
                       name=f"TFDS {builder.name} {split}")


def stream(spec: registry.SourceSpec) -> StreamedData:
    """The prepared TFDS copy's training and evaluation splits, unread."""
    try:
        builder = _builder(spec)
        evaluation = "test" if "test" in builder.info.splits else "validation"
        train, test = (_record_split(builder, split) for split in ("train", evaluation))
        class_names = tuple(builder.info.features["label"].names)
    except DataError:
        raise
    # TFDS fails in many ways (missing data, a broken download, ...), all
    # reported the same way.
    except Exception as err:
        raise DataError(
            f"cannot load TFDS dataset {spec.name!r} (data_dir={spec.data_dir}): "
            f"{first_line(err)}; {_OFFLINE_CHOICES}"
        ) from None
    stats = (IMAGENET_STATS if spec.name == "imagenet2012"
             else PUBLISHED_STATS[len(class_names)])
    return StreamedData(f"TFDS {spec.name}", train, test, class_names, stats).check()


def decode_split(split: RecordSplit, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Every image of `split` decoded (and resized to `size` when given) and
    its label, through tf.data: uint8 `[N, H, W, 3]` and int64 `[N]`."""

    def decode(index, record):
        encoded, label = split.parse(record)
        image = decode_image(encoded)
        if size is not None:
            image = tf.ensure_shape(resize_uint8(image, size), [*size, 3])
        return image, label

    batches = split.records(shuffle_files=None).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ).batch(4096)
    images, labels = zip(*batches.as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)


def _load(spec: registry.SourceSpec) -> ImageArrays:
    """Decodes a prepared (or downloaded) TFDS copy into memory."""
    streamed = stream(spec)
    try:
        (x_train, y_train), (x_test, y_test) = (
            decode_split(split, spec.image_size)
            for split in (streamed.train, streamed.test))
    except (tf.errors.OpError, ValueError) as err:
        raise DataError(
            f"cannot decode TFDS dataset {spec.name!r} into memory: {first_line(err)}; "
            "images of several sizes need --image_size") from None
    return image_arrays(streamed.source, x_train, y_train, x_test, y_test,
                        streamed.class_names, streamed.published_stats)


for _name in ("cifar10", "cifar100", "imagenet2012"):
    registry.register(_name, stream=stream)(_load)


def _unreachable(host: str, port: int) -> str | None:
    """Why a TCP connection to `host:port` fails, or None when it succeeds.

    The connection goes to the HTTPS proxy of the environment instead
    (`https_proxy`, unless `no_proxy` exempts `host`), as the download
    would. Name resolution and connecting together take at most
    `CONNECT_TIMEOUT_S` seconds.
    """
    proxy = urllib.request.getproxies().get("https")
    target = f"{host}:{port}"
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(
            proxy if "://" in proxy else f"http://{proxy}"
        )
        host, port = parsed.hostname, parsed.port or 80
        target = f"the HTTPS proxy {host}:{port}"
    outcome = []

    def connect():
        try:
            # The join below times out first; this only ends the thread.
            socket.create_connection((host, port), CONNECT_TIMEOUT_S + 1).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{target} is unreachable ({first_line(err)})")

    # A daemon thread: name resolution has no timeout of its own, and an
    # abandoned lookup must not keep the process from exiting.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    if not outcome:
        return f"{target} gave no answer within {CONNECT_TIMEOUT_S:g} s"
    return outcome[0]


@contextlib.contextmanager
def _removed_on_failure(root: str, children: list[str]) -> Iterator[None]:
    """Removes what the body added to `root/<child>` if the body fails.

    Files and folders present before are kept; `root` itself, and any of its
    parents, are removed when the body created them.
    """
    new_top = None
    if not os.path.exists(root):
        new_top = root
        while not os.path.exists(os.path.dirname(new_top)):
            new_top = os.path.dirname(new_top)
    before = {
        path for child in children for path in _tree(os.path.join(root, child))
    }
    try:
        yield
    except BaseException:
        if new_top:
            shutil.rmtree(new_top, ignore_errors=True)
        else:
            for child in children:
                # Deepest first, so a new folder is empty when it is reached.
                for path in sorted(
                    _tree(os.path.join(root, child)) - before, reverse=True
                ):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    elif os.path.lexists(path):
                        os.remove(path)
        raise


def _tree(path: str) -> set[str]:
    """`path` and every file and folder below it, if it exists."""
    if not os.path.lexists(path):
        return set()
    found = {path}
    for folder, dirs, files in os.walk(path):
        found.update(os.path.join(folder, name) for name in dirs + files)
    return found
