"""Comparison tables and figures of training runs.

A run directory holds `metrics.json` (written by
`selfkd_tf.metrics.write_metrics_json`), and optionally `flags.json` (the
resolved training flags) and `history.csv` (the `keras.callbacks.CSVLogger`
log). `load_runs` finds and validates run directories; `write_report` renders
into an output directory:

* `table1.md`: the deepest exit's top-1 / top-5 error, NLL, ECE, AURC and the
  training time of each run (layout of Table 1 of PS-KD), one table per
  dataset and split.
* `table2.md`: the accuracy of every exit and of the exits' ensemble.
* `figure2.png`: top-1 error against training time per epoch.
* `reliability_<run>.png`: reliability diagram of the deepest exit.
* `curves_<run>.png`: per-exit accuracy along training.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas,
so no display is needed and pyplot's global state is left alone.

Example:

```python
runs = load_runs(["runs/*"])
write_report(runs, "report")
```
"""

import csv
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RUN_FILES = ("metrics.json", "flags.json", "history.csv")
"""A directory holding any of these files is a run directory."""

METHOD_NAMES = {"pskd": "PS-KD", "byot": "BYOT", "dmfl": "DMFL"}
"""Display names of the methods, in the order they appear in labels."""

TABLE1_SCORES = (
    ("top1_err", "Top-1 err (%)", ".2f"),
    ("top5_err", "Top-5 err (%)", ".2f"),
    ("nll", "NLL", ".3f"),
    ("ece", "ECE (%)", ".2f"),
    ("aurc", "AURC (x1000)", ".2f"),
)
"""`(metrics.json key, column header, format)` of the Table 1 scores."""

_REQUIRED_KEYS = ("dataset", "split", "arch", "methods", "exits", "ensemble",
                  "reliability")
_RELIABILITY_KEYS = ("edges", "confidence", "accuracy", "count")
_ACCURACY_COLUMN = re.compile(r"^(val_)?(?:(?:exit_?(\d+)|(ensemble))_)?accuracy$")
_MISSING = "n/a"

logger = logging.getLogger(__name__)


class RunDataError(ValueError):
    """A run directory is missing or holds unusable data."""


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


# ---------------------------------------------------------------------------
# Loading
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


def _is_run_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in RUN_FILES)


def _runs_under(directory: str) -> list[str]:
    """Run directories at or below `directory`, in sorted walk order."""
    found = []
    for root, subdirs, _ in os.walk(directory):
        subdirs.sort()
        if _is_run_dir(root):
            found.append(root)
            subdirs.clear()  # a run's subdirectories are its own files
    return found


def find_run_dirs(specs: Sequence[str]) -> list[str]:
    """Resolves run specifications to run directories.

    Each spec is a run directory, a parent directory (searched recursively;
    the search does not descend into runs), or a glob pattern whose matches
    are treated the same way. Glob matches holding no run are skipped (so
    `runs/*` may match an earlier report directory); a plain directory
    holding no run is an error. Duplicates are dropped, keeping the first
    occurrence.

    Raises:
        RunDataError: A directory does not exist or holds no run, or a
            pattern yields no run.
    """
    found: list[str] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(p for p in glob.glob(spec) if os.path.isdir(p))
            runs = [run for match in matches for run in _runs_under(match)]
            if not runs:
                raise RunDataError(f"{spec}: pattern matches no run directory")
        elif not os.path.isdir(spec):
            raise RunDataError(f"{spec}: no such directory")
        else:
            runs = _runs_under(spec)
            if not runs:
                raise RunDataError(
                    f"{spec}: no metrics.json, and no run directory inside"
                )
        found.extend(runs)
    unique: dict[str, str] = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def _run_names(paths: Sequence[str]) -> list[str]:
    """Shortest path suffixes that tell the runs apart.

    Uses the last path component of every run, or the last two (`a/seed0`)
    when two runs share a base name, and so on.
    """
    parts = [os.path.realpath(p).strip(os.sep).split(os.sep) for p in paths]
    depth_needed = max(len(p) for p in parts)
    for depth in range(1, depth_needed + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len({_file_stem(n) for n in names}) == len(names):
            return names
    # Distinct paths whose file stems still collide after sanitising.
    return [f"{name}-{i}" for i, name in enumerate(names, start=1)]


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise RunDataError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise RunDataError(f"{path}: expected a JSON object")
    return data


def _check_metrics(metrics: dict[str, Any], path: str) -> None:
    """Raises `RunDataError` unless `metrics` has what the report reads."""
    missing = [key for key in _REQUIRED_KEYS if key not in metrics]
    if missing:
        raise RunDataError(f"{path}: missing {', '.join(missing)}")
    methods = metrics["methods"]
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise RunDataError(f"{path}: 'methods' must be a list of names")
    exits = metrics["exits"]
    if not isinstance(exits, list) or not exits:
        raise RunDataError(f"{path}: 'exits' must be a non-empty list")
    entries = [(f"exits[{i}]", e) for i, e in enumerate(exits)]
    for where, entry in entries + [("ensemble", metrics["ensemble"])]:
        if not isinstance(entry, dict):
            raise RunDataError(f"{path}: {where} must be an object")
        bad = [k for k, _, _ in TABLE1_SCORES if _as_float(entry.get(k)) is None]
        if bad:
            raise RunDataError(
                f"{path}: {where} lacks a number for {', '.join(bad)}")
    reliability = metrics["reliability"]
    if not isinstance(reliability, dict) or any(
        not isinstance(reliability.get(k), list) for k in _RELIABILITY_KEYS
    ):
        raise RunDataError(
            f"{path}: 'reliability' needs lists {', '.join(_RELIABILITY_KEYS)}"
        )
    num_bins = len(reliability["count"])
    lengths = [len(reliability[k]) for k in _RELIABILITY_KEYS]
    if lengths != [num_bins + 1, num_bins, num_bins, num_bins]:
        raise RunDataError(f"{path}: 'reliability' lists have inconsistent lengths")


def _read_history(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (ValueError, csv.Error) as err:  # undecodable bytes, NUL, ...
        raise RunDataError(f"{path}: unreadable CSV ({err})") from err
    # dtype=float turns the `None` of missing or unparsable cells into NaN.
    return {
        c: np.array([_as_float(row.get(c)) for row in rows], dtype=float)
        for c in columns
    }


def load_run(path: str, name: str | None = None,
             metrics_file: str = "metrics.json") -> Run:
    """Reads and validates one run directory.

    Args:
        path: The run directory.
        name: Name of the run; defaults to the directory's base name.
        metrics_file: The run's scores to report: `metrics.json` (written
            at the end of training) or another record of the same schema in
            the run directory, e.g. `metrics_test.json` from `selfkd-eval`.

    Raises:
        RunDataError: the metrics file is missing, is not valid JSON, or lacks
            what the report needs; `flags.json` is not valid JSON.
    """
    metrics_path = os.path.join(path, metrics_file)
    if not os.path.isfile(metrics_path):
        raise RunDataError(f"{path}: missing {metrics_file}")
    metrics = _read_json(metrics_path)
    _check_metrics(metrics, metrics_path)
    flags_path = os.path.join(path, "flags.json")
    flags = _read_json(flags_path) if os.path.isfile(flags_path) else {}
    return Run(
        path=path,
        name=name or os.path.basename(os.path.realpath(path)),
        metrics=metrics,
        flags=flags,
        history=_read_history(os.path.join(path, "history.csv")),
    )


def load_runs(specs: Sequence[str], metrics_file: str = "metrics.json") -> list[Run]:
    """Finds (see `find_run_dirs`), names and loads runs.

    ``metrics_file`` is as in `load_run`.

    Each run is named by the shortest suffix of its path that no other run
    shares, e.g. `seed0`, or `resnet18_pskd/seed0` next to
    `resnet18_baseline/seed0`.

    Raises:
        RunDataError: For the first run or specification that is unusable;
            no run is returned then.
    """
    paths = find_run_dirs(specs)
    return [load_run(p, n, metrics_file) for p, n in zip(paths, _run_names(paths))]


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                    numeric_from: int) -> str:
    """GitHub Markdown table; columns from `numeric_from` on align right."""
    rule = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return "\n".join(
        "| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |"
        for line in [header, rule, *rows]
    )


def _by_dataset(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by `dataset (split)`, groups and runs in input order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = f"{run.metrics['dataset']} ({run.metrics['split']})"
        groups.setdefault(key, []).append(run)
    return list(groups.items())


def _hms(seconds: float | None) -> str:
    """`3725.4` -> `"1:02:05"`."""
    if seconds is None:
        return _MISSING
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def table1_markdown(runs: Sequence[Run]) -> str:
    """Table 1: scores of each run's deepest exit, one table per dataset.

    Columns: Run, then as in PS-KD's Table 1: Model, Method, Top-1 err (%),
    Top-5 err (%), NLL, ECE (%), AURC (x1000), then Train time (h:mm:ss) and
    Time / epoch (s) (`n/a` when unknown, see `Run.train_times`).
    """
    header = ["Run", "Model", "Method", *(title for _, title, _ in TABLE1_SCORES),
              "Train time (h:mm:ss)", "Time / epoch (s)"]
    sections = ["# Table 1: deepest classifier", ""]
    for title, group in _by_dataset(runs):
        rows = []
        for run in group:
            total, per_epoch = run.train_times()
            scores = [format(run.deepest[k], fmt) for k, _, fmt in TABLE1_SCORES]
            rows.append([
                run.name, run.model, run.method, *scores, _hms(total),
                _MISSING if per_epoch is None else f"{per_epoch:.1f}",
            ])
        sections += [f"## {title}", "", _markdown_table(header, rows, 3), ""]
    return "\n".join(sections)


def table2_markdown(runs: Sequence[Run]) -> str:
    """Table 2: top-1 accuracy (%) of every exit and of the ensemble.

    One table per dataset, one row per run. With `N` the largest number of
    exits of the table's runs, the exit columns are `Exit 1 (stage 1)`, ...,
    `Exit N (deepest)`. Classifiers are aligned by depth: a run with `n < N`
    exits leaves the first `N - n` columns blank, so its deepest classifier
    is always under `(deepest)` (e.g. a single-exit baseline). A single-exit
    run has no ensemble, so its `Ensemble` cell is blank.
    """
    sections = ["# Table 2: accuracy (%) of each classifier", ""]
    for title, group in _by_dataset(runs):
        width = max(run.num_exits for run in group)
        exit_titles = [f"Exit {i} (stage {i})" for i in range(1, width)]
        header = ["Run", "Model", "Method", *exit_titles,
                  f"Exit {width} (deepest)", "Ensemble"]
        rows = []
        for run in group:
            accuracies = [
                f"{100.0 - e['top1_err']:.2f}" for e in run.metrics["exits"]
            ]
            ensemble = 100.0 - run.metrics["ensemble"]["top1_err"]
            rows.append([
                run.name, run.model, run.method,
                *[""] * (width - run.num_exits), *accuracies,
                f"{ensemble:.2f}" if run.num_exits > 1 else "",
            ])
        sections += [f"## {title}", "", _markdown_table(header, rows, 3), ""]
    sections.append(
        "Classifiers are aligned by depth: runs with fewer exits leave the "
        "shallow columns blank. Ensemble: mean of the exits' probabilities."
    )
    return "\n".join(sections) + "\n"


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _new_figure(size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)  # attaches the headless Agg canvas
    return figure


def _run_title(run: Run) -> str:
    # The run name on a line of its own: with the model and the method on
    # one line, long method labels ran off a single-column figure.
    return f"{run.name}\n{run.model} {run.method}"


def plot_figure2(runs: Sequence[Run], path: str) -> None:
    """Top-1 error of the deepest exit against training time per epoch.

    One point per run, annotated with the run name and coloured by method.
    Runs without timing information are listed under the plot instead.
    """
    figure = _new_figure((7.0, 5.0))
    axes = figure.add_subplot()
    timed = [(run, run.train_times()[1]) for run in runs]
    untimed = [run.name for run, seconds in timed if seconds is None]
    timed = [(run, seconds) for run, seconds in timed if seconds is not None]
    for method in dict.fromkeys(run.method for run, _ in timed):
        points = [(seconds, run.deepest["top1_err"])
                  for run, seconds in timed if run.method == method]
        axes.scatter(*zip(*points), label=method, s=40)
    for run, seconds in timed:
        axes.annotate(run.name, (seconds, run.deepest["top1_err"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=8)
    if timed:
        axes.legend(title="Method", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no run has timing information",
                  transform=axes.transAxes, ha="center")
    if untimed:
        figure.supxlabel("not shown (no timing): " + ", ".join(untimed), fontsize=8)
    axes.set_xlabel("Training time per epoch (s)")
    axes.set_ylabel("Top-1 error (%), deepest exit")
    axes.set_title("Top-1 error vs training time per epoch")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def plot_reliability(run: Run, path: str) -> None:
    """Reliability diagram of the run's deepest exit.

    Filled bars: accuracy per confidence bin; hatched outlines: mean
    confidence per bin; dashed diagonal: perfect calibration. Empty bins
    have no bar. The title gives the ECE.
    """
    reliability = run.metrics["reliability"]
    edges = np.asarray(reliability["edges"], dtype=float)
    # null (empty bin) -> NaN -> no bar.
    accuracy = np.nan_to_num(np.array(reliability["accuracy"], dtype=float))
    confidence = np.nan_to_num(np.array(reliability["confidence"], dtype=float))
    widths = np.diff(edges)
    figure = _new_figure((5.0, 5.0))
    axes = figure.add_subplot()
    axes.bar(edges[:-1], accuracy, width=widths, align="edge", color="tab:blue",
             edgecolor="black", label="Accuracy")
    axes.bar(edges[:-1], confidence, width=widths, align="edge", fill=False,
             hatch="//", edgecolor="tab:red", label="Confidence")
    axes.plot([0, 1], [0, 1], "--", color="gray", label="Perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence (max probability)",
             ylabel="Accuracy")
    axes.set_title(f"{_run_title(run)}\ndeepest exit, ECE = {run.deepest['ece']:.2f}%",
                   fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=120)


def _accuracy_columns(history: dict[str, np.ndarray],
                      num_exits: int) -> list[tuple[str, str | None, str | None]]:
    """`(label, train column, validation column)` of each accuracy series.

    Order: a plain `accuracy` (single-output model, labelled "Output"), the
    exits shallowest first, the ensemble.
    """
    series: dict[float, dict[str, str]] = {}
    for column in history:
        match = _ACCURACY_COLUMN.match(column)
        if match:
            val, exit_index, ensemble = match.groups()
            order = int(exit_index) if exit_index else math.inf if ensemble else 0
            series.setdefault(order, {})["val" if val else "train"] = column
    result = []
    for order in sorted(series):
        if order == 0:
            label = "Output"
        elif order == math.inf:
            label = "Ensemble"
        else:
            label = f"Exit {order}" + (" (deepest)" if order == num_exits else "")
        result.append((label, series[order].get("train"), series[order].get("val")))
    return result


def plot_curves(run: Run, path: str) -> bool:
    """Per-exit and ensemble accuracy (%) per epoch from `history.csv`.

    Solid lines: validation accuracy; dashed lines of the same colour:
    training accuracy, when logged.

    Returns:
        `False`, writing nothing, when the history has no accuracy column.
    """
    series = _accuracy_columns(run.history, run.num_exits)
    if not series:
        return False
    any_column = next(iter(run.history.values()))
    # CSVLogger numbers epochs from 0.
    epochs = run.history.get("epoch", np.arange(len(any_column))) + 1
    figure = _new_figure((7.0, 5.0))
    axes = figure.add_subplot()
    for index, (label, train, val) in enumerate(series):
        color = f"C{index % 10}"
        if val:
            axes.plot(epochs, 100 * run.history[val], color=color, label=label)
        if train:
            axes.plot(epochs, 100 * run.history[train], "--", color=color,
                      label=f"{label} (train)")
    axes.set_xlabel("Epoch")
    axes.set_ylabel("Accuracy (%)")
    axes.set_title(f"{_run_title(run)}\nsolid: validation, dashed: training",
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=120)
    return True


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_report(runs: Sequence[Run], out_dir: str) -> list[str]:
    """Writes the tables and figures of `runs` into `out_dir`.

    Everything is rendered into a temporary directory first and moved into
    `out_dir` (created if needed) only once complete, so a failure leaves
    `out_dir` untouched. Files of the same name in `out_dir` are replaced.
    A run whose history has no accuracy column gets no curves figure (a
    warning is logged).

    Returns:
        The paths written, sorted.
    """
    if not runs:
        raise RunDataError("no run to report")
    staging = tempfile.mkdtemp(prefix="selfkd-report-")
    try:
        _write_text(os.path.join(staging, "table1.md"), table1_markdown(runs))
        _write_text(os.path.join(staging, "table2.md"), table2_markdown(runs))
        plot_figure2(runs, os.path.join(staging, "figure2.png"))
        for run in runs:
            stem = run.file_stem
            plot_reliability(run, os.path.join(staging, f"reliability_{stem}.png"))
            if not plot_curves(run, os.path.join(staging, f"curves_{stem}.png")):
                logger.warning("%s: no accuracy column in history.csv, "
                               "curves_%s.png not written", run.path, stem)
        written = sorted(os.listdir(staging))
        os.makedirs(out_dir, exist_ok=True)
        for filename in written:
            shutil.move(os.path.join(staging, filename),
                        os.path.join(out_dir, filename))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [os.path.join(out_dir, filename) for filename in written]
