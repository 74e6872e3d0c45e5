"""``data.json``: what a run was trained on, so a resumed run refuses other data.

`DataFingerprint` records the training split's size, the classes, the image
shape and the pixel statistics; resuming compares it with the data at hand
and says what differs (an image added to a class folder, another class
count).

Example:

```python
saved = DataFingerprint.from_json(read_json("runs/a/data.json"))
differences = saved.differences(DataFingerprint.from_info(info))
```
"""

from __future__ import annotations

import dataclasses
import math

from selfkd_tf.rundir.layout import DATA_FILE
from selfkd_tf.rundir.reading import RunDirectoryError


@dataclasses.dataclass(frozen=True)
class DataFingerprint:
    """What a run was trained on: enough to notice changed data on resume.

    Attributes:
        num_train: training examples.
        num_classes: classes.
        image_shape: ``(H, W, C)`` of the images the model takes.
        class_names: one name per class, in label order.
        mean, std: the per-channel pixel statistics the data was normalised
            with; for statistics of the training images themselves, they
            change when the images do.
    """

    num_train: int
    num_classes: int
    image_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_info(cls, info) -> "DataFingerprint":
        """From a `selfkd_tf.data.DatasetInfo`."""
        return cls(int(info.num_train), int(info.num_classes),
                   tuple(int(n) for n in info.image_shape),
                   tuple(str(n) for n in info.class_names),
                   tuple(float(v) for v in info.mean), tuple(float(v) for v in info.std))

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, value: object, path: str = DATA_FILE) -> "DataFingerprint":
        """Inverse of `to_json`.

        Raises:
            RunDirectoryError: ``value`` is not such a record.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(value, dict) or set(value) != fields:
            raise RunDirectoryError(
                f"{path} is not a data record: expected the keys {sorted(fields)}")

        def items(key, kind, what):
            found = value[key]
            if not isinstance(found, list) or not all(
                    isinstance(v, kind) and not isinstance(v, bool) for v in found):
                raise RunDirectoryError(f"{path}: {key} must be a list of {what}")
            return tuple(found)

        for key in ("num_train", "num_classes"):
            if not isinstance(value[key], int) or isinstance(value[key], bool):
                raise RunDirectoryError(f"{path}: {key} must be an integer")
        return cls(value["num_train"], value["num_classes"],
                   items("image_shape", int, "integers"),
                   items("class_names", str, "strings"),
                   items("mean", (int, float), "numbers"),
                   items("std", (int, float), "numbers"))

    def differences(self, other: "DataFingerprint") -> list[str]:
        """What differs from ``other``, e.g. ``["training examples 8 -> 9"]``."""
        found = []
        if self.num_train != other.num_train:
            found.append(f"training examples {self.num_train} -> {other.num_train}")
        if self.num_classes != other.num_classes:
            found.append(f"classes {self.num_classes} -> {other.num_classes}")
        elif self.class_names != other.class_names:
            found.append("class names " + ", ".join(
                f"{a} -> {b}" for a, b in zip(self.class_names, other.class_names) if a != b))
        if self.image_shape != other.image_shape:
            found.append("image shape " + " -> ".join(
                "x".join(map(str, s)) for s in (self.image_shape, other.image_shape)))
        statistics = self.mean + self.std
        if len(statistics) != len(other.mean + other.std) or not all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                for a, b in zip(statistics, other.mean + other.std)):
            found.append("pixel mean/std (the images changed)")
        return found
