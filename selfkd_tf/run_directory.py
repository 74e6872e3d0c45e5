"""Reading a run directory that may be damaged, stale or hostile.

Run directories travel between people and outlive the data they were
trained on. Before a run resumes, everything it reads from its directory is
checked, and any problem is a `RunDirectoryError` with a one-line message,
raised before anything is written:

- `check_contained`: no run file is a symbolic link that leads outside the
  directory, and no file that training appends to is a hard link, so
  training never writes outside ``--model_dir``;
- `read_json`: JSON files (``flags.json``, ``data.json``, ``metrics.json``)
  of bounded size, UTF-8, well-formed;
- `fits_type`: a value read from JSON against a settings field's type;
- `read_metrics`: a finished run's ``metrics.json`` with the scores a
  command prints;
- `read_history`: ``history.csv`` with an ``epoch`` column and well-formed
  rows (only the last may be cut short, as a kill leaves it);
- `DataFingerprint` (``data.json``): what the run was trained on, so that a
  resumed run refuses data that changed (an image added to a class folder,
  another class count) and says what differs.

Nothing here runs code from the files: JSON and CSV are parsed as data.

Example:

```python
check_contained("runs/a", ["history.csv", "checkpoints", "tensorboard"])
saved = DataFingerprint.from_json(read_json("runs/a/data.json"))
differences = saved.differences(DataFingerprint.from_info(info))
```
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import stat
import types
import typing
from typing import Sequence

from selfkd_tf.files import is_within

JSON_LIMIT_BYTES = 4 * 2**20
"""Largest JSON file read; the ones training writes are a few kilobytes."""
HISTORY_LIMIT_BYTES = 64 * 2**20
"""Largest ``history.csv`` read; 300 epochs take about 100 kilobytes."""

FLAGS_FILE = "flags.json"
"""The run's resolved settings (`selfkd_tf.settings.TrainSettings.to_json`)."""
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.keras"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
DATA_FILE = "data.json"
"""The run directory's record of its training data (`DataFingerprint`)."""
RUN_FILES = (FLAGS_FILE, DATA_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE,
             TENSORBOARD_DIR, CHECKPOINT_DIR)
"""Everything training writes in a run directory (and ``overwrite`` removes)."""

SCORE_FILES = tuple(
    f"{stem}_{split}.{extension}"
    for stem, extensions in (("metrics", ("json",)), ("early_exit", ("json", "png")))
    for split in ("test", "validation", "train") for extension in extensions)
"""What ``selfkd-eval`` writes beside the model by default: scores of the
model the run held, so ``overwrite`` removes them with it (a report must
not read an earlier model's scores as the new one's)."""

RESUME_SAFE_FIELDS = frozenset({
    "data_dir", "model_dir", "overwrite", "save_every_steps", "distribute",
    "jit_compile", "deterministic", "eval_every",
})
"""Fields of ``flags.json`` a resumed run may change: where things are and
how fast they run, not what is computed. Any other difference refuses to
resume, and runs that differ only in these (and the seed) are repeats of one
recipe."""


class RunDirectoryError(ValueError):
    """A file of a run directory cannot be used; ``str(error)`` is one line."""


def check_contained(run_dir: str, names: Sequence[str], appended: Sequence[str] = ()) -> None:
    """Refuses run files through which training would write outside ``run_dir``.

    Args:
        run_dir: the run directory (it may itself be a symbolic link).
        names: the entries of ``run_dir`` training writes; directories are
            searched entirely.
        appended: those of ``names`` that training appends to in place
            rather than replaces; they must not be hard links, whose other
            names may lie anywhere.

    Raises:
        RunDirectoryError: a symbolic link under one of ``names`` resolves
            outside ``run_dir``, or an appended file has other hard links.
    """
    root = os.path.realpath(run_dir)
    for name in names:
        top = os.path.join(run_dir, name)
        paths = [top]
        if os.path.isdir(top) and not os.path.islink(top):
            for directory, subdirectories, files in os.walk(top):
                paths += [os.path.join(directory, entry) for entry in subdirectories + files]
        for path in paths:
            if os.path.islink(path) and not is_within(os.path.realpath(path), root):
                raise RunDirectoryError(
                    f"{path} is a symbolic link to {os.path.realpath(path)}, outside "
                    f"{run_dir}; training never writes outside its run directory")
        if name in appended and os.path.isfile(top):
            status = os.stat(top)
            if stat.S_ISREG(status.st_mode) and status.st_nlink > 1:
                raise RunDirectoryError(
                    f"{top} has {status.st_nlink - 1} other hard link(s), which "
                    "training would write through; copy the file instead")


def _read_bytes(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise RunDirectoryError(f"cannot read {path}: {err.strerror or err}") from err
    if len(data) > limit:
        raise RunDirectoryError(
            f"{path} is larger than {limit // 2**20} MB; not a file a run writes")
    return data


def read_json(path: str) -> object:
    """The JSON value in ``path``.

    Raises:
        RunDirectoryError: the file is unreadable, larger than
            `JSON_LIMIT_BYTES`, not UTF-8, not JSON or nested too deeply.
    """
    data = _read_bytes(path, JSON_LIMIT_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        problem = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise RunDirectoryError(f"{path} is not valid JSON: {problem}") from err


def fits_type(value, hint) -> bool:
    """Whether a value read from JSON fits a type hint such as
    ``int | None`` or ``tuple[str, ...]``.

    Booleans are not numbers here, and an integer fits ``float``.

    >>> fits_type((1, 2), tuple[int, ...]), fits_type(True, int)
    (True, False)
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(fits_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(fits_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def read_metrics(path: str, score_keys: Sequence[str]) -> dict:
    """A ``metrics.json`` record with what a command prints of it: the
    ``dataset`` and ``split`` names, and every score of ``score_keys`` for
    each of its ``exits`` and the ``ensemble``.

    Raises:
        RunDirectoryError: the file is unreadable (see `read_json`) or not
            such a record.
    """
    record = read_json(path)

    def scores(value) -> bool:
        return isinstance(value, dict) and all(
            fits_type(value.get(k), float) for k in score_keys)

    if not (isinstance(record, dict)
            and all(isinstance(record.get(k), str) for k in ("dataset", "split"))
            and isinstance(record.get("exits"), list) and record["exits"]
            and all(scores(e) and "exit" in e for e in record["exits"])
            and scores(record.get("ensemble"))):
        raise RunDirectoryError(f"{path} is not a metrics record")
    return record


def read_history(path: str) -> list[list[str]] | None:
    """The rows of a ``history.csv``, header first; None if it is empty or absent.

    A kill may leave the last row short; every other row must have as many
    fields as the header, and the header an ``epoch`` column.

    Raises:
        RunDirectoryError: the file is unreadable, too large, not UTF-8 CSV,
            lacks the ``epoch`` column or has a malformed row.
    """
    if not os.path.exists(path):
        return None
    data = _read_bytes(path, HISTORY_LIMIT_BYTES)
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as err:
        raise RunDirectoryError(f"{path} is not a CSV file: {err}") from err
    if not rows:
        return None
    if "epoch" not in rows[0]:
        raise RunDirectoryError(f"{path} has no 'epoch' column; not a training history")
    for number, row in enumerate(rows[1:-1], start=2):
        if len(row) != len(rows[0]):
            raise RunDirectoryError(
                f"{path} line {number} has {len(row)} fields, the header {len(rows[0])}")
    return rows


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
