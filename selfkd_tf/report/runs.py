"""Finding and reading the run directories that ``selfkd-report`` compares.

A run directory holds `metrics.json` (written by
`selfkd_tf.metrics.record.write_metrics_json` at the end of training), and
optionally `flags.json` (the resolved training flags) and `history.csv` (one
row per epoch). `load_runs` finds run directories under the given paths
(following symbolic links), reads the finished ones into `Run` objects and
lists the others as `SkippedRun` with the reason: a run still training (or
interrupted) has no `metrics.json` yet.

Example:

```python
found = load_runs(["runs/*"])
for skipped in found.skipped:
    print(skipped.path, skipped.reason)
report.write_report(found.runs, "report", skipped=found.skipped)
```
"""

import dataclasses
import glob
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from selfkd_tf.rundir.layout import FLAGS_FILE, HISTORY_FILE, METRICS_FILE
from selfkd_tf.rundir.reading import (
    RunDirectoryError, read_history, read_json_object, read_metrics)

_RUN_MARKERS = (METRICS_FILE, FLAGS_FILE, HISTORY_FILE)
"""A directory holding any of these files is a run directory."""

METHOD_NAMES = {"pskd": "PS-KD", "ls": "LS", "byot": "BYOT", "ds": "DS", "dmfl": "DMFL"}
"""Display names of the methods, in the order they appear in labels."""

@dataclasses.dataclass(frozen=True)
class Run:
    """The data of one run directory.

    Attributes:
        path: The run directory.
        name: Short name, unique among the loaded runs (see `load_runs`).
        metrics: Content of `metrics.json`.
        flags: Content of `flags.json`, `{}` when absent.
        history: Columns of `history.csv` as float arrays (unparsable cells
            are NaN), `{}` when absent.
    """

    path: str
    name: str
    metrics: dict[str, Any]
    flags: dict[str, Any]
    history: dict[str, np.ndarray]

    @property
    def file_stem(self) -> str:
        """`name` made safe for a file name."""
        return _file_stem(self.name)

    @property
    def num_exits(self) -> int:
        return len(self.metrics["exits"])

    @property
    def deepest(self) -> dict[str, Any]:
        """Scores of the deepest exit, the model's answer."""
        return self.metrics["exits"][-1]

    @property
    def method(self) -> str:
        return method_label(self.metrics["methods"])

    @property
    def model(self) -> str:
        """The architecture, with its width multiplier when it is not 1."""
        width = _as_float(self.flags.get("width_multiplier"))
        arch = str(self.metrics["arch"])
        if width is None or width == 1.0:
            return arch
        return f"{arch} (width {width:g})"

    @property
    def num_examples(self) -> int | None:
        """Examples the metrics were computed on; `None` in older records."""
        count = _as_float(self.metrics.get("num_examples"))
        return None if count is None else int(count)

    @property
    def image_size(self) -> str | None:
        """The training ``--image_size`` ("native" when unset), `None`
        without `flags.json`."""
        if not self.flags:
            return None
        size = self.flags.get("image_size")
        return "native" if size is None else str(size)

    def epoch_numbers(self) -> np.ndarray:
        """1-based epoch numbers of the rows of `history.csv`.

        Runs number epochs from 1 in the ``epoch`` column; histories written
        by `keras.callbacks.CSVLogger` (older runs) number them from 0, which
        shows as a row numbered 0.
        """
        column = next(iter(self.history.values()), np.array([]))
        epochs = self.history.get("epoch", np.arange(1, len(column) + 1))
        return epochs + 1 if np.nanmin(epochs, initial=np.inf) == 0 else epochs

    def train_times(self) -> tuple[float | None, float | None]:
        """`(total seconds, seconds per epoch)` of training, `None` if unknown.

        The total comes from `metrics.json` (it includes the time spent
        outside epochs, e.g. the final evaluation), else from the sum of the
        `epoch_time_s` column of `history.csv`. The time per epoch is the
        median of that column, so one epoch slowed by other work on a shared
        machine does not shift it, else the mean from `metrics.json`.
        """
        total = _as_float(self.metrics.get("train_time_s"))
        per_epoch = _as_float(self.metrics.get("train_time_per_epoch_s"))
        epoch_times = self.history.get("epoch_time_s", np.array([]))
        epoch_times = epoch_times[np.isfinite(epoch_times)]
        if epoch_times.size:
            total = float(epoch_times.sum()) if total is None else total
            per_epoch = float(np.median(epoch_times))
        return total, per_epoch


def method_label(methods: Sequence[str]) -> str:
    """Table label of a list of methods.

    Known methods are written in the order PS-KD, BYOT, DMFL whatever their
    order in `methods`; unknown ones follow, upper-cased, in their order.

    Example:

    >>> method_label([]), method_label(["dmfl", "pskd", "byot"])
    ('Baseline', '+PS-KD+BYOT+DMFL')
    """
    if not methods:
        return "Baseline"
    order = list(METHOD_NAMES)
    keys = [name.lower() for name in methods]
    # sorted() is stable, so unknown methods keep their relative order.
    keys = sorted(keys, key=lambda k: order.index(k) if k in order else len(order))
    return "".join("+" + METHOD_NAMES.get(k, k.upper()) for k in keys)


@dataclasses.dataclass(frozen=True)
class SkippedRun:
    """A run directory that is not reported, and why (one line)."""

    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class FoundRuns:
    """What `load_runs` found: the runs to report and the ones skipped."""

    runs: list[Run]
    skipped: list[SkippedRun]


# ---------------------------------------------------------------------------
# Finding
# ---------------------------------------------------------------------------


def _as_float(value: Any) -> float | None:
    """`value` as a finite float, or `None` (missing, null or unparsable)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _file_stem(name: str) -> str:
    """`"a/seed 0"` -> `"a-seed_0"`: path separators become `-`, other
    characters outside `[A-Za-z0-9._-]` become `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "-"))


def _is_run_dir(path: str, metrics_file: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f))
               for f in (*_RUN_MARKERS, metrics_file))


def _runs_under(directory: str, metrics_file: str, seen: set[str]) -> list[str]:
    """Run directories at or below `directory`, in sorted walk order.

    Symbolic links to directories are followed; `seen` (real paths already
    walked) keeps a link loop, or two links to one directory, from being
    walked twice.
    """
    found = []
    for root, subdirs, _ in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            subdirs.clear()
            continue
        seen.add(real)
        subdirs.sort()
        if _is_run_dir(root, metrics_file):
            found.append(root)
            subdirs.clear()  # a run's subdirectories are its own files
    return found


def find_run_dirs(specs: Sequence[str], metrics_file: str = METRICS_FILE) -> list[str]:
    """Resolves run specifications to run directories.

    Each spec is a run directory, a parent directory (searched recursively,
    through symbolic links; the search does not descend into runs), or a
    glob pattern whose matches are treated the same way. Glob matches holding
    no run are skipped (so `runs/*` may match an earlier report directory); a
    plain directory holding no run is an error. A directory reached twice
    (repeated specs, links) is listed once, at its first occurrence.

    Raises:
        RunDirectoryError: A directory does not exist or holds no run, or a
            pattern yields no run.
    """
    found: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(p for p in glob.glob(spec) if os.path.isdir(p))
        elif not os.path.isdir(spec):
            raise RunDirectoryError(f"{spec}: no such directory")
        else:
            matches = [spec]
        # A spec reached before (e.g. a run named after its parent) is no error.
        repeated = any(os.path.realpath(m) in seen for m in matches)
        runs = [run for match in matches for run in _runs_under(match, metrics_file, seen)]
        if not runs and not repeated:
            raise RunDirectoryError(
                f"{spec}: pattern matches no run directory" if matches != [spec]
                else f"{spec}: no {metrics_file}, and no run directory inside")
        found.extend(runs)
    return found


def _run_names(paths: Sequence[str]) -> list[str]:
    """Shortest path suffixes that tell the runs apart.

    Uses the last path component of every run, or the last two (`a/seed0`)
    when two runs share a base name, and so on. Paths are taken as found
    (a run reached through a link is named by the link).
    """
    parts = [os.path.abspath(p).strip(os.sep).split(os.sep) for p in paths]
    depth_needed = max(len(p) for p in parts)
    for depth in range(1, depth_needed + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len({_file_stem(n) for n in names}) == len(names):
            return names
    # Distinct paths whose file stems still collide after sanitising.
    return [f"{name}-{i}" for i, name in enumerate(names, start=1)]


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def history_columns(rows: Sequence[Sequence[str]] | None) -> dict[str, np.ndarray]:
    """The columns of `selfkd_tf.rundir.reading.read_history`'s rows as float
    arrays (cells that are not numbers, and a row cut short, give NaN);
    ``{}`` without a history."""
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    return {
        column: np.array([_as_float(row[i]) if i < len(row) else None for row in body],
                         dtype=float)
        for i, column in enumerate(header)
    }


def load_run(path: str, name: str | None = None,
             metrics_file: str = METRICS_FILE) -> Run:
    """Reads and validates one run directory.

    Args:
        path: The run directory.
        name: Name of the run; defaults to the directory's base name.
        metrics_file: The run's scores to report: `metrics.json` (written
            at the end of training) or another record of the same schema in
            the run directory, e.g. `metrics_test.json` from `selfkd-eval`.

    Raises:
        RunDirectoryError: the metrics file is missing (the message says so when
            the run has not finished training), is not valid JSON, or lacks
            what the report needs; `flags.json` is not valid JSON.
    """
    metrics_path = os.path.join(path, metrics_file)
    if not os.path.isfile(metrics_path):
        if metrics_file == METRICS_FILE:
            raise RunDirectoryError(
                f"{path}: no {metrics_file}: training has not finished "
                "(still running, or interrupted: rerun selfkd-train to resume)")
        # selfkd-eval names its record metrics_<split>.json; asking for that
        # name with --out alone would write the run's evaluation split under
        # another split's name.
        split = re.fullmatch(r"metrics_(test|validation|train)\.json", metrics_file)
        command = f"--split={split[1]}" if split else f"--out={metrics_path}"
        raise RunDirectoryError(
            f"{path}: no {metrics_file} (selfkd-eval --model={path} {command} "
            "writes it)")
    metrics = read_metrics(metrics_path)
    flags_path = os.path.join(path, FLAGS_FILE)
    flags = read_json_object(flags_path) if os.path.isfile(flags_path) else {}
    return Run(
        path=path,
        name=name or os.path.basename(os.path.abspath(path)),
        metrics=metrics,
        flags=flags,
        history=history_columns(read_history(os.path.join(path, HISTORY_FILE))),
    )


def load_runs(specs: Sequence[str], metrics_file: str = METRICS_FILE) -> FoundRuns:
    """Finds (see `find_run_dirs`), names and loads runs.

    ``metrics_file`` is as in `load_run`. A run that cannot be loaded (not
    finished, or unusable data) is skipped, with the reason, rather than
    stopping the others from being reported.

    Each run is named by the shortest suffix of its path that no other run
    shares, e.g. `seed0`, or `resnet18_pskd/seed0` next to
    `resnet18_baseline/seed0`.

    Raises:
        RunDirectoryError: a specification matches no run directory.
    """
    paths = find_run_dirs(specs, metrics_file)
    runs, skipped = [], []
    for path, name in zip(paths, _run_names(paths)):
        try:
            runs.append(load_run(path, name, metrics_file))
        except RunDirectoryError as err:
            reason = str(err).removeprefix(f"{path}: ")
            skipped.append(SkippedRun(path, " ".join(reason.split())))
    return FoundRuns(runs, skipped)
