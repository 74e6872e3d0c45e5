"""`folder:PATH`: image files laid out as `PATH/{train,test}/<class>/<file>`.

Labels follow the sorted class folder names, which must be the same in both
splits. Every file TensorFlow decodes (JPEG, PNG, BMP, GIF, WebP, told by
the extension, in any case) is read; one that does not decode is refused with
its name. Images are converted to RGB (grayscale is replicated, alpha dropped)
and, when sizes differ, resized to `image_size`, or to the size of the first
training image (first file of the first class) when `image_size` is None
(with the ImageNet augmentation each image is cropped at its own size
instead; see `selfkd_tf.data.augmentation`).

`files` lists the files without decoding them, for the pipeline to read them
while training (`selfkd_tf.data.sources.streamed.FileSplit`); `load` decodes
them all into memory.

Folders copied from other systems carry files nobody meant as images. They
are skipped, and counted in one warning per split:

- hidden files and folders (names starting with `.`: `.DS_Store`, the `._*`
  AppleDouble files of macOS, `.ipynb_checkpoints`) and the system files
  `Thumbs.db`, `ehthumbs.db`, `desktop.ini` and `__MACOSX` folders;
- other files (`notes.txt`, TIFF images, ...) and folders nested inside a
  class folder, whose contents are not read.
"""

from __future__ import annotations

import collections
import logging
import os
import re

import numpy as np
import tensorflow as tf

from selfkd_tf.data.sources import registry
from selfkd_tf.data.sources.arrays import DataError, ImageArrays, first_line
from selfkd_tf.data.sources.arrays import image_arrays, resize_uint8
from selfkd_tf.data.sources.streamed import FileSplit, StreamedData, decode_image

__all__ = ["IMAGE_EXTENSIONS", "decode_files", "files", "first_image_size",
           "fixed_size", "load"]

IMAGE_EXTENSIONS = (
    ".bmp", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".png", ".webp"
)
# Written by Windows Explorer and macOS archivers; lower case.
_SYSTEM_NAMES = frozenset(["thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"])
_SPLITS = ("train", "test")

_log = logging.getLogger(__name__)


def files(spec: registry.SourceSpec) -> StreamedData:
    """Lists `root/{train,test}/<class>/<image>` without decoding any image.

    Raises:
        DataError: a missing split folder, a class folder without images,
            class folders that differ between the splits, or data that
            cannot be trained on (`StreamedData.check`).
    """
    root = spec.path
    files = {split: _class_files(os.path.join(root, split)) for split in _SPLITS}
    if files["train"].keys() != files["test"].keys():
        only_train = sorted(files["train"].keys() - files["test"].keys())
        only_test = sorted(files["test"].keys() - files["train"].keys())
        raise DataError(
            f"class folders differ between {root}/train and {root}/test: "
            f"only in train: {only_train}, only in test: {only_test}"
        )
    class_names = sorted(files["train"])
    splits = []
    for split in _SPLITS:
        paths = [path for name in class_names for path in files[split][name]]
        labels = [
            label
            for label, name in enumerate(class_names)
            for _ in files[split][name]
        ]
        splits.append(FileSplit(np.asarray(paths), np.asarray(labels, np.int64)))
    return StreamedData(root, *splits, tuple(class_names)).check()


def first_image_size(paths) -> tuple[int, int]:
    """`(H, W)` of the first file of `paths`, the size images are resized to
    when none is given.

    Raises:
        DataError: the file does not decode.
    """
    first = str(paths[0])
    try:
        return tuple(int(d) for d in _read_image(first).shape[:2])
    except tf.errors.OpError:
        raise _image_error(first) from None


@registry.register("folder", takes_path=True, stream=files)
def load(spec: registry.SourceSpec) -> ImageArrays:
    """Decodes `root/{train,test}/<class>/<image>` into memory."""
    listed = files(spec)
    size = spec.image_size or first_image_size(listed.train.paths)
    train, test = listed.train, listed.test
    return image_arrays(
        spec.path,
        decode_files(train.paths, size),
        train.labels,
        decode_files(test.paths, size),
        test.labels,
        listed.class_names,
    )


def _is_system_entry(name: str) -> bool:
    """Whether a file or folder name is hidden or an OS's metadata."""
    return name.startswith(".") or name.lower() in _SYSTEM_NAMES


def _class_files(split_dir: str) -> dict[str, list[str]]:
    """Maps each class folder name of `split_dir` to its sorted image files.

    Raises:
        DataError: `split_dir` is missing or has no class folders, or a class
            folder has no image files.
    """
    if not os.path.isdir(split_dir):
        raise DataError(
            f"missing folder {split_dir}; "
            "expected PATH/train/<class>/ and PATH/test/<class>/"
        )
    skipped = collections.defaultdict(list)
    classes = []
    for entry in os.scandir(split_dir):
        if _is_system_entry(entry.name):
            skipped["system"].append(entry.name)
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            skipped["other"].append(entry.name)
    if not classes:
        raise DataError(f"{split_dir} has no class folders")
    files = {}
    for name in sorted(classes):
        class_dir = os.path.join(split_dir, name)
        files[name] = []
        for entry in os.scandir(class_dir):
            relative = os.path.join(name, entry.name)
            if _is_system_entry(entry.name):
                skipped["system"].append(relative)
            elif entry.is_file() and entry.name.lower().endswith(
                IMAGE_EXTENSIONS
            ):
                files[name].append(entry.path)
            else:
                skipped["other"].append(relative + "/" * entry.is_dir())
        if not files[name]:
            raise DataError(
                f"class folder {class_dir} has no image files "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        files[name].sort()
    if skipped:
        _log.warning("%s: skipped %s", split_dir, _describe_skipped(skipped))
    return files


def _describe_skipped(skipped: dict[str, list[str]]) -> str:
    """`"2 hidden or system files and folders (.DS_Store, ._a.jpg) and ..."`."""
    kinds = {
        "system": "hidden or system files and folders",
        "other": "other files and nested folders, not images TensorFlow decodes",
    }
    parts = []
    for kind, description in kinds.items():
        names = sorted(skipped.get(kind, ()))
        if names:
            examples = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{len(names)} {description} ({examples})")
    return " and ".join(parts)


def _read_image(path) -> tf.Tensor:
    """Reads and decodes one image file to uint8 RGB `[H, W, 3]`."""
    return decode_image(tf.io.read_file(path))


def _image_error(path: str, others: int = 0) -> DataError:
    """A `DataError` naming an unreadable image file, with the reason."""
    try:
        _read_image(path)
        reason = ""
    except tf.errors.OpError as err:
        # Drop the op and function names TF wraps around the reason.
        reason = ": " + re.sub(
            r"\{\{.*?\}\}\s*|\s*\[Op:.*", "", first_line(err.message)
        )
    more = f" (and {others} more)" if others else ""
    return DataError(f"cannot read or decode image file {path}{more}{reason}")


def fixed_size(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """uint8 `[H, W, 3]` resized to `size` unless it has that size already."""
    image = tf.cond(
        tf.reduce_all(tf.shape(image)[:2] == size),
        lambda: image,
        lambda: resize_uint8(image, size),
    )
    return tf.ensure_shape(image, [*size, 3])


def decode_files(paths, size: tuple[int, int]) -> np.ndarray:
    """Decodes image files in parallel to uint8 RGB `[N, *size, 3]`.

    Raises:
        DataError: a file does not decode; the message names it.
    """
    paths = [str(path) for path in paths]

    def decode(path):
        return path, fixed_size(_read_image(path), size)

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
