"""Comparison tables and figures of training runs.

`selfkd_tf.runs.load_runs` finds and reads run directories; `write_report`
renders them into an output directory:

* `table1.md`: the deepest exit's top-1 / top-5 error, NLL, ECE, AURC and the
  training time of each run (layout of Table 1 of PS-KD), one table per
  dataset and split.
* `table2.md`: the accuracy of every exit and of the exits' ensemble.
* `figure2.png`: top-1 error against training time per epoch.
* `reliability_<run>.png`: reliability diagram of the deepest exit.
* `curves_<run>.png`: per-exit accuracy along training.

Runs are grouped into one table per data set and split; under a table whose
runs scored different numbers of examples, trained at different image sizes
or have different numbers of exits, a note says they are not comparable
(`incomparable`). Runs that could not be reported are listed with the reason.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas,
so no display is needed and pyplot's global state is left alone.

Example:

```python
found = runs.load_runs(["runs/*"])
write_report(found.runs, "report", skipped=found.skipped)
```
"""

import logging
import math
import os
import re
import shutil
import tempfile
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from selfkd_tf.runs import Run, RunDataError, SkippedRun

TABLE1_SCORES = (
    ("top1_err", "Top-1 err (%)", ".2f"),
    ("top5_err", "Top-5 err (%)", ".2f"),
    ("nll", "NLL", ".3f"),
    ("ece", "ECE (%)", ".2f"),
    ("aurc", "AURC (x1000)", ".2f"),
)
"""`(metrics.json key, column header, format)` of the Table 1 scores,
those `selfkd_tf.runs.SCORES` requires."""

_ACCURACY_COLUMN = re.compile(r"^(val_)?(?:(?:exit_?(\d+)|(ensemble))_)?accuracy$")
_MISSING = "n/a"

logger = logging.getLogger(__name__)


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


_COMPARED = (
    ("numbers of scored examples", lambda run: run.num_examples),
    ("image sizes", lambda run: run.image_size),
    ("numbers of exits", lambda run: run.num_exits),
)
"""What must match for the rows of one table to compare like with like
(the data set and split match within a table)."""


def incomparable(runs: Sequence[Run]) -> list[str]:
    """One phrase per property in `_COMPARED` that ``runs`` do not share.

    Unknown values (older records without ``num_examples``, runs without
    ``flags.json``) are left out of the comparison.

    Example:

    >>> incomparable([run_a, run_b])  # doctest: +SKIP
    ['numbers of scored examples differ (2000: a; 10000: b)']
    """
    phrases = []
    for label, value_of in _COMPARED:
        names: dict = {}
        for run in runs:
            value = value_of(run)
            if value is not None:
                names.setdefault(value, []).append(run.name)
        if len(names) > 1:
            phrases.append(f"{label} differ (" + "; ".join(
                f"{value}: {', '.join(group)}" for value, group in names.items()) + ")")
    return phrases


def _group_note(group: Sequence[Run]) -> list[str]:
    """Markdown lines under a table whose runs are not comparable."""
    phrases = incomparable(group)
    return [f"**Not comparable:** {'; '.join(phrases)}.", ""] if phrases else []


def _report_notes(runs: Sequence[Run], skipped: Sequence[SkippedRun]) -> list[str]:
    """Markdown lines closing a table file: separate tables, skipped runs."""
    lines = []
    if len(_by_dataset(runs)) > 1:
        lines += ["Runs on different data sets or splits are in separate tables; "
                  "numbers from different tables are not comparable.", ""]
    if skipped:
        lines += ["Skipped runs (not in the tables):", ""]
        lines += [f"- `{s.path}`: {s.reason}" for s in skipped]
        lines.append("")
    return lines


def _hms(seconds: float | None) -> str:
    """`3725.4` -> `"1:02:05"`."""
    if seconds is None:
        return _MISSING
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def table1_markdown(runs: Sequence[Run], skipped: Sequence[SkippedRun] = ()) -> str:
    """Table 1: scores of each run's deepest exit, one table per dataset.

    Columns: Run, then as in PS-KD's Table 1: Model, Method, Top-1 err (%),
    Top-5 err (%), NLL, ECE (%), AURC (x1000), then Train time (h:mm:ss) and
    Time / epoch (s) (`n/a` when unknown, see `Run.train_times`). A table
    whose runs are not comparable (`incomparable`) says so under it; the
    file ends with the `skipped` runs and their reasons.
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
        sections += [f"## {title}", "", _markdown_table(header, rows, 3), "",
                     *_group_note(group)]
    return "\n".join(sections + _report_notes(runs, skipped))


def table2_markdown(runs: Sequence[Run], skipped: Sequence[SkippedRun] = ()) -> str:
    """Table 2: top-1 accuracy (%) of every exit and of the ensemble.

    One table per dataset, one row per run. With `N` the largest number of
    exits of the table's runs, the exit columns are `Exit 1 (stage 1)`, ...,
    `Exit N (deepest)`. Classifiers are aligned by depth: a run with `n < N`
    exits leaves the first `N - n` columns blank, so its deepest classifier
    is always under `(deepest)` (e.g. a single-exit baseline). A single-exit
    run has no ensemble, so its `Ensemble` cell is blank. Notes as in
    `table1_markdown`.
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
        sections += [f"## {title}", "", _markdown_table(header, rows, 3), "",
                     *_group_note(group)]
    sections += [
        "Classifiers are aligned by depth: runs with fewer exits leave the "
        "shallow columns blank. Ensemble: mean of the exits' probabilities.", "",
        *_report_notes(runs, skipped),
    ]
    return "\n".join(sections)


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
    epochs = run.epoch_numbers()
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


def write_report(runs: Sequence[Run], out_dir: str,
                 skipped: Sequence[SkippedRun] = ()) -> list[str]:
    """Writes the tables and figures of `runs` into `out_dir`.

    The tables end with the `skipped` runs (e.g. `FoundRuns.skipped`) and
    the reason each was left out.

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
        _write_text(os.path.join(staging, "table1.md"), table1_markdown(runs, skipped))
        _write_text(os.path.join(staging, "table2.md"), table2_markdown(runs, skipped))
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
