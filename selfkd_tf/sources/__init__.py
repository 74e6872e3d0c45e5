"""Data sources: where the images of a dataset come from.

Each source has its own module and registers itself by name in
`selfkd_tf.sources.registry`; a dataset string (`"digits"`, `"cifar100"`,
`"folder:/data/pets"`) picks one. Every source reads the whole dataset into
validated uint8 `ImageArrays`; `selfkd_tf.data` builds the pipelines.

| string | module | what it reads |
| --- | --- | --- |
| `cifar10`, `cifar100` | `tfds` | TensorFlow Datasets |
| `cifar:PATH` | `cifar` | the canonical CIFAR python pickles |
| `folder:PATH` | `folder` | `PATH/{train,test}/<class>/<image>` |
| `npz:PATH` | `npz` | arrays `x_train, y_train, x_test, y_test` |
| `digits` | `digits` | scikit-learn's handwritten digits, no download |

A new source is a module whose loader, `SourceSpec -> ImageArrays`, is
decorated with `registry.register(name)`, imported below.

>>> from selfkd_tf import sources
>>> arrays = sources.load("digits")
>>> arrays.x_train.shape, arrays.num_classes
((1442, 8, 8, 1), 10)
"""

from __future__ import annotations

import dataclasses

from selfkd_tf.sources import registry
from selfkd_tf.sources.arrays import DataError, ImageArrays, resize_array

# Imported for their registrations.
from selfkd_tf.sources import cifar, digits, folder, npz, tfds  # noqa: F401,E402

__all__ = ["DataError", "ImageArrays", "dataset_forms", "load", "parse"]

dataset_forms = registry.dataset_forms
parse = registry.parse


def load(
    dataset: str,
    *,
    data_dir: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> ImageArrays:
    """Reads the dataset a dataset string names.

    Args:
        dataset: e.g. `"digits"`, `"cifar100"` or `"npz:/data/x.npz"`.
        data_dir: TFDS data directory (`cifar10`, `cifar100` only).
        image_size: optional `(H, W)` every image is resized to (bilinear,
            antialiased).

    Returns:
        Validated `ImageArrays`.

    Raises:
        DataError: unknown dataset string, missing path or invalid data.
    """
    source, path = parse(dataset)
    arrays = source.load(
        registry.SourceSpec(
            source.name, path=path, data_dir=data_dir, image_size=image_size
        )
    )
    if image_size is None:
        return arrays
    return dataclasses.replace(
        arrays,
        x_train=resize_array(arrays.x_train, image_size),
        x_test=resize_array(arrays.x_test, image_size),
    )
