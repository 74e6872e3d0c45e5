"""Whether a metrics record belongs to the run directory that holds it.

`selfkd-report` reads from every run directory a record of the scores to
report (``metrics.json``, or a ``selfkd-eval`` record such as
``metrics_test.json``) and, for the generalisation gap, a training-split
record (``metrics_train.json``). A record that is not the run's own (read
through a path that every run shares, copied from another run directory, or
left from before the run was trained again) gives the run another model's
numbers without any error. This module refuses such records:

* `check_file_name`: a record is named by a plain file name, looked up in
  each run directory; a path (absolute, ``../``) would make every run read
  one and the same file.
* `check_record`: what a record says of the model it scored (`MODEL_FIELDS`:
  architecture, methods, epochs, parameter count, number of exits; training
  and ``selfkd-eval`` write them) must agree with the run's ``flags.json``
  and, for a second record of the run, with its reported scores.
* `first_copy`: records are not written by hand, so two runs whose records
  hold the very same scores are one run counted twice, or one record copied
  into another run. This also catches what `check_record` cannot: a record
  copied between runs that differ only in what a record does not hold (the
  seed, the learning rate, ...).

The width multiplier and the number of stages are not in a record; they show
in its parameter count, which a second record must share with the reported
one.

Example:

```python
check_file_name("metrics_train.json")
check_reported(found.runs, "metrics_test.json")
check_record(run, train_record, "runs/a/metrics_train.json", reference=run.metrics)
```
"""

import json
import os
import unicodedata
from typing import Any, Sequence

from selfkd_tf.report.runs import Run, method_label
from selfkd_tf.rundir.reading import RunDirectoryError

FLAG_FIELDS = ("arch", "methods", "epochs")
"""Fields of a metrics record that the run's ``flags.json`` holds too."""

MODEL_FIELDS = (*FLAG_FIELDS, "params", "num_exits")
"""Fields of a metrics record that describe the model it scored."""


def file_name_problem(name: str) -> str | None:
    """Why ``name`` does not name a file inside a directory, or `None`.

    A plain file name is not empty, has no directory separator, is not ``.``
    or ``..``, and has no control character (a new line, a NUL).

    Example:

    >>> file_name_problem("metrics_train.json") is None
    True
    >>> file_name_problem("../a/metrics_train.json").split(":")[0]
    'a path, not a file name'
    """
    if not name:
        problem = "empty"
    elif name in (".", ".."):
        problem = "a directory, not a file name"
    elif any(s in name for s in (os.sep, os.altsep) if s):
        problem = "a path, not a file name"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        problem = "not a file name (it holds a control character)"
    else:
        return None
    return (f"{problem}: give the name of a file inside each run directory, "
            "so that every run reads its own record")


def check_file_name(name: str) -> None:
    """Raises `ValueError` unless ``name`` is a plain file name
    (`file_name_problem`).

    Raises:
        ValueError: (one line) the name and its problem.

    Example:

    >>> check_file_name("/runs/a/metrics_train.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: '/runs/a/metrics_train.json' is a path, not a file name: ...
    """
    problem = file_name_problem(name)
    if problem:
        raise ValueError(f"{name!r} is {problem}")


def _comparable(field: str, value: Any) -> Any:
    """``value`` in one form whatever file it comes from; `None` if unknown.

    Methods are a list in records and in newer ``flags.json``, a
    comma-separated string in older ones; their order does not matter.
    """
    if value is None:
        return None
    if field == "methods":
        names = value.split(",") if isinstance(value, str) else value
        return tuple(sorted(str(n).strip().lower() for n in names if str(n).strip()))
    if field in ("epochs", "params"):
        try:
            return int(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _field(source: dict[str, Any], field: str) -> Any:
    if field == "num_exits" and "exits" in source:
        return len(source["exits"])
    return _comparable(field, source.get(field))


def _shown(field: str, value: Any) -> str:
    return method_label(value) if field == "methods" else str(value)


def check_record(run: Run, record: dict[str, Any], path: str,
                 reference: dict[str, Any] | None = None) -> None:
    """Raises unless ``record`` describes the model of ``run``.

    The record's `FLAG_FIELDS` must equal the run's ``flags.json`` (methods
    in any order) and, given a ``reference`` record (the run's reported
    scores), its `MODEL_FIELDS` must equal the reference's. A field that
    either side lacks (older files, a run without ``flags.json``) is not
    compared.

    Args:
        run: The run whose directory holds the record.
        record: A metrics record (`selfkd_tf.rundir.reading.read_metrics`).
        path: The record's file, for the message.
        reference: Another record of the run, e.g. ``run.metrics``.

    Raises:
        RunDirectoryError: (one line naming the file and the field) a field
            differs.

    Example:

    >>> check_record(run, {**run.metrics, "methods": []}, "runs/a/m.json")  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    RunDirectoryError: runs/a/m.json: methods Baseline in the record, +PS-KD in ...
    """
    checks = [(FLAG_FIELDS, run.flags, "the run's flags.json")]
    if reference is not None:
        checks.append((MODEL_FIELDS, reference, "the run's reported scores"))
    for fields, expected, where in checks:
        for field in fields:
            got, want = _field(record, field), _field(expected, field)
            if got is not None and want is not None and got != want:
                raise RunDirectoryError(
                    f"{path}: {field} {_shown(field, got)} in the record, "
                    f"{_shown(field, want)} in {where}: the record is not of "
                    "this run's model (copied from another run, or written "
                    "before the run was trained again)")


def check_reported(runs: Sequence[Run], metrics_file: str) -> None:
    """`check_record` of each run's reported scores (``run.metrics``, read
    from ``metrics_file`` in its directory) against its ``flags.json``.

    Raises:
        RunDirectoryError: (one line naming the file and the field) a run's
            reported record is not of its model.
    """
    for run in runs:
        check_record(run, run.metrics, os.path.join(run.path, metrics_file))


def _scores(record: dict[str, Any]) -> str:
    return json.dumps([record["split"], record.get("num_examples"),
                       record["exits"], record["ensemble"]], sort_keys=True)


def first_copy(records: Sequence[dict[str, Any] | None]) -> tuple[int, int] | None:
    """The first pair ``(i, j)``, ``i < j``, of records with the very same
    scores (split, number of examples, every exit's and the ensemble's
    scores), or `None`. `None` entries (no record) are passed over.

    Example:

    >>> first_copy([record_a, None, record_b, dict(record_a)])  # doctest: +SKIP
    (0, 3)
    """
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if record is None:
            continue
        key = _scores(record)
        if key in seen:
            return seen[key], index
        seen[key] = index
    return None
