"""Data sources: where the images of a dataset come from.

Each source has its own module and registers itself by name in
`selfkd_tf.data.sources.registry`; a dataset string (`"digits"`, `"cifar100"`,
`"folder:/data/pets"`) picks one. Every source can read the whole dataset
into validated uint8 `ImageArrays` (`load`); a source that reads files also
describes them without decoding them (`stream`: `streamed.StreamedData`),
for `selfkd_tf.data.pipeline` to read them while training.

| string | module | what it reads |
| --- | --- | --- |
| `cifar10`, `cifar100`, `imagenet2012` | `tfds` | TensorFlow Datasets |
| `cifar:PATH` | `cifar` | the canonical CIFAR python pickles |
| `folder:PATH` | `folder` | `PATH/{train,test}/<class>/<image>` |
| `npz:PATH` | `npz` | arrays `x_train, y_train, x_test, y_test` |
| `digits` | `digits` | scikit-learn's handwritten digits, no download |

A new source is a module whose loader, `SourceSpec -> ImageArrays`, is
decorated with `registry.register(name)` (``stream=`` for one that reads
files), imported below.

>>> from selfkd_tf.data import sources
>>> source, path = sources.parse("npz:/data/tiny.npz")  # doctest: +SKIP
"""

from selfkd_tf.data.sources.arrays import DataError, ImageArrays
from selfkd_tf.data.sources.registry import SourceSpec, dataset_forms, parse

# Imported for their registrations.
from selfkd_tf.data.sources import cifar, digits, folder, npz, tfds  # noqa: F401,E402

__all__ = ["DataError", "ImageArrays", "SourceSpec", "dataset_forms", "parse"]
