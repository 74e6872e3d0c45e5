"""`npz:PATH`: arrays `x_train`, `y_train`, `x_test`, `y_test` in one `.npz`.

An optional `class_names` array names the classes; without it there are
`max(label) + 1` classes named "0", "1", ... Integer images hold values in
[0, 255]; floating images hold values in [0, 1] and are scaled by 255.
`[N, H, W]` images get a channel axis; channels are otherwise kept as they
are. The file is read with `allow_pickle=False`: an object array, which only
a pickle can hold (and a pickle can run code), is refused.
"""

from __future__ import annotations

import zipfile

import numpy as np

from selfkd_tf.data.sources import registry
from selfkd_tf.data.sources.arrays import DataError, ImageArrays, first_line
from selfkd_tf.data.sources.arrays import image_arrays

__all__ = ["load"]

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@registry.register("npz", takes_path=True)
def load(spec: registry.SourceSpec) -> ImageArrays:
    """Loads `x_train, y_train, x_test, y_test[, class_names]` from an .npz."""
    path = spec.path
    try:
        content = np.load(path, allow_pickle=False)
        if isinstance(content, np.lib.npyio.NpzFile):
            with content:
                arrays = {key: content[key] for key in content.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"cannot read npz file {path}: {first_line(err)}"
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
    return image_arrays(
        path, *(arrays[key] for key in _NPZ_KEYS), arrays.get("class_names")
    )
