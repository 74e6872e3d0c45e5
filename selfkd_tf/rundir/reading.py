"""Reading a run directory that may be damaged, stale or hostile.

Run directories travel between people and outlive the data they were
trained on. Every command that reads one (training resuming it,
``selfkd-eval``, ``selfkd-report``) reads its files through this module, and
any problem is a `RunDirectoryError` with a one-line message that names the
file, raised before anything is written:

- `check_contained`: no run file is a symbolic link that leads outside the
  directory, and no file that training appends to is a hard link, so
  training never writes outside ``--model_dir``;
- `read_json`, `read_json_object`: JSON files (``flags.json``,
  ``data.json``, ``metrics.json``) of bounded size, UTF-8, well-formed;
- `fits_type`: a value read from JSON against a settings field's type;
- `read_metrics`: a ``metrics.json`` record (training's, or
  ``selfkd-eval``'s ``metrics_<split>.json``) with every score of every
  exit, the ensemble and the reliability bins;
- `read_temperatures`: a temperature-scaling record
  (``temperatures_<split>.json``);
- `read_history`: ``history.csv`` with an ``epoch`` column and well-formed
  rows (only the last may be cut short, as a kill leaves it).

Nothing here runs code from the files: JSON and CSV are parsed as data. The
module imports neither TensorFlow nor Keras.

Example:

```python
check_contained("runs/a", ["history.csv", "checkpoints", "tensorboard"])
record = read_metrics("runs/a/metrics.json")
rows = read_history("runs/a/history.csv")   # header first
```
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import types
import typing
from typing import Sequence

from selfkd_tf.files import is_within
from selfkd_tf.metrics.scores import METRIC_KEYS

JSON_LIMIT_BYTES = 4 * 2**20
"""Largest JSON file read; the ones training writes are a few kilobytes."""
HISTORY_LIMIT_BYTES = 64 * 2**20
"""Largest ``history.csv`` read; 300 epochs take about 100 kilobytes."""

_RECORD_NAMES = ("dataset", "split", "arch")
_RELIABILITY_KEYS = ("edges", "confidence", "accuracy", "count")


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


def read_json_object(path: str) -> dict:
    """The JSON object in ``path`` (`read_json`).

    Raises:
        RunDirectoryError: as `read_json`, or the value is not an object.
    """
    value = read_json(path)
    if not isinstance(value, dict):
        raise RunDirectoryError(f"{path}: expected a JSON object")
    return value


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def read_metrics(path: str) -> dict:
    """A metrics record (``metrics.json``'s schema, `selfkd_tf.metrics.record`).

    The record must name its ``dataset``, ``split`` and ``arch``, list its
    ``methods``, and hold every score of `selfkd_tf.metrics.scores.METRIC_KEYS`
    as a finite number for each of its ``exits`` and the ``ensemble``, and
    the deepest exit's ``reliability`` bins.

    Raises:
        RunDirectoryError: the file is unreadable (see `read_json`) or lacks
            part of the record; the message names the file and the part.
    """
    return check_metrics_record(read_json_object(path), path)


def check_metrics_record(record: dict, path: str) -> dict:
    """``record`` if it is a metrics record (see `read_metrics`).

    Raises:
        RunDirectoryError: it lacks part of the record; the message names
            ``path`` (where it was read) and the part.
    """
    missing = [key for key in (*_RECORD_NAMES, "methods", "exits", "ensemble",
                               "reliability") if key not in record]
    if missing:
        raise RunDirectoryError(f"{path}: missing {', '.join(missing)}")
    wrong = [key for key in _RECORD_NAMES if not isinstance(record[key], str)]
    if wrong:
        raise RunDirectoryError(f"{path}: {', '.join(wrong)} must be names")
    methods = record["methods"]
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise RunDirectoryError(f"{path}: 'methods' must be a list of names")
    exits = record["exits"]
    if not isinstance(exits, list) or not exits:
        raise RunDirectoryError(f"{path}: 'exits' must be a non-empty list")
    entries = [(f"exits[{i}]", e) for i, e in enumerate(exits)]
    for where, entry in entries + [("ensemble", record["ensemble"])]:
        if not isinstance(entry, dict):
            raise RunDirectoryError(f"{path}: {where} must be an object")
        bad = [k for k in METRIC_KEYS if not _is_number(entry.get(k))]
        if bad:
            raise RunDirectoryError(f"{path}: {where} lacks a number for {', '.join(bad)}")
    reliability = record["reliability"]
    if not isinstance(reliability, dict) or any(
            not isinstance(reliability.get(k), list) for k in _RELIABILITY_KEYS):
        raise RunDirectoryError(
            f"{path}: 'reliability' needs lists {', '.join(_RELIABILITY_KEYS)}")
    num_bins = len(reliability["count"])
    lengths = [len(reliability[k]) for k in _RELIABILITY_KEYS]
    if lengths != [num_bins + 1, num_bins, num_bins, num_bins]:
        raise RunDirectoryError(f"{path}: 'reliability' lists have inconsistent lengths")
    return record


def read_temperatures(path: str) -> dict:
    """A temperature record (``temperatures_<split>.json``, written by
    ``selfkd-eval --fit_temperature``).

    It holds ``temperatures``, one finite number > 0 per exit; ``fitted_on``
    and ``reported_on``, each with the ``split`` name, the ``rows`` and their
    ``num_examples``; and the metrics records ``before`` and ``after``
    temperature scaling (see `check_metrics_record`) of as many exits.

    Raises:
        RunDirectoryError: the file is unreadable or not such a record.
    """
    record = read_json_object(path)
    temperatures = record.get("temperatures")
    if not (isinstance(temperatures, list) and temperatures
            and all(_is_number(t) and t > 0 for t in temperatures)):
        raise RunDirectoryError(
            f"{path}: 'temperatures' must be a list of numbers > 0, one per exit")
    for key in ("fitted_on", "reported_on"):
        where = record.get(key)
        if not (isinstance(where, dict) and isinstance(where.get("split"), str)
                and isinstance(where.get("rows"), str)
                and isinstance(where.get("num_examples"), int)):
            raise RunDirectoryError(
                f"{path}: '{key}' must name the split, rows and num_examples")
    for key in ("before", "after"):
        if not isinstance(record.get(key), dict):
            raise RunDirectoryError(f"{path}: missing the metrics record '{key}'")
        check_metrics_record(record[key], f"{path} ({key})")
        if len(record[key]["exits"]) != len(temperatures):
            raise RunDirectoryError(
                f"{path}: {len(temperatures)} temperatures for "
                f"{len(record[key]['exits'])} exits")
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


