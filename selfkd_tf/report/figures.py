"""The figures of a report of training runs (`selfkd_tf.report.tables`).

* `plot_figure2`: top-1 error of the deepest exit against training time per
  epoch, one point per run.
* `plot_reliability`: reliability diagram of a run's deepest exit.
* `plot_curves`: per-exit accuracy along training, on the split the run
  scored while training (`training_eval_split`) and on its training batches.

Each function saves its figure and returns it (`None`: nothing to draw).

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas,
so no display is needed and pyplot's global state is left alone.

Example:

```python
found = runs.load_runs(["runs/*"])
plot_figure2(found.runs, "report/figure2.png")
plot_curves(found.runs[0], "report/curves.png")
```
"""

import math
import re
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from selfkd_tf.report.runs import Run

_ACCURACY_COLUMN = re.compile(r"^(val_)?(?:(?:exit_?(\d+)|(ensemble))_)?accuracy$")


def _new_figure(size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)  # attaches the headless Agg canvas
    return figure


def _run_title(run: Run) -> str:
    # The run name on a line of its own: with the model and the method on
    # one line, long method labels ran off a single-column figure.
    return f"{run.name}\n{run.model} {run.method}"


def _scored_splits(runs: Sequence[Run]) -> str:
    """``"cifar10 (test)"``, or the data sets and splits of ``runs`` joined."""
    return "; ".join(dict.fromkeys(
        f"{run.metrics['dataset']} ({run.metrics['split']})" for run in runs))


def plot_figure2(runs: Sequence[Run], path: str) -> Figure:
    """Top-1 error of the deepest exit against training time per epoch.

    One point per run, annotated with the run name and coloured by method.
    The title names the data set and split of the errors; runs scored on
    several say so. Runs without timing information are listed under the
    plot instead.
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
    notes = []
    if untimed:
        notes.append("not shown (no timing): " + ", ".join(untimed))
    scored = _scored_splits(runs)
    if len({(run.metrics["dataset"], run.metrics["split"]) for run in runs}) > 1:
        notes.append(f"errors on different data: not comparable ({scored})")
    if notes:
        figure.supxlabel("\n".join(notes), fontsize=8)
    axes.set_xlabel("Training time per epoch (s)")
    axes.set_ylabel("Top-1 error (%), deepest exit")
    axes.set_title(f"Top-1 error vs training time per epoch\n{scored}", fontsize=10)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return figure


def plot_reliability(run: Run, path: str) -> Figure:
    """Reliability diagram of the run's deepest exit.

    Filled bars: accuracy per confidence bin; hatched outlines: mean
    confidence per bin; dashed diagonal: perfect calibration. Empty bins
    have no bar. The title gives the split scored and the ECE.
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
    axes.set_title(f"{_run_title(run)}\ndeepest exit, {run.metrics['split']} split, "
                   f"ECE = {run.deepest['ece']:.2f}%", fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=120)
    return figure


def training_eval_split(run: Run) -> str:
    """What the run scored at the end of its training epochs (the ``val_``
    columns of `history.csv`), from its `flags.json`.

    ``selfkd-train`` scores the held-out part of the training set when it
    was given ``--validation_fraction``, else the test split; with
    ``--eval_examples`` a stratified subset of it.

    Returns:
        E.g. ``"test split"``, ``"validation split"`` or ``"test split (1000
        examples)"``; ``"evaluation split"`` when unknown (no ``flags.json``,
        or one without ``validation_fraction``).

    Example:

    >>> training_eval_split(run)  # doctest: +SKIP
    'test split (1000 examples)'
    """
    if "validation_fraction" not in run.flags:
        return "evaluation split"
    split = "validation" if float(run.flags["validation_fraction"] or 0) > 0 else "test"
    examples = run.flags.get("eval_examples")
    return f"{split} split" + ("" if examples is None else f" ({examples} examples)")


def _accuracy_columns(history: dict[str, np.ndarray],
                      num_exits: int) -> list[tuple[str, str | None, str | None]]:
    """`(label, train column, evaluation column)` of each accuracy series.

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


def _plot_series(axes, epochs: np.ndarray, values: np.ndarray, style: str,
                 **kwargs) -> None:
    """Accuracy (%) at the epochs that have a value.

    Runs evaluate every ``--eval_every`` epochs and leave the other rows
    empty; plotting those gaps as NaN would draw no line at all, so the
    evaluated epochs are joined, and marked.
    """
    known = np.isfinite(values)
    marker = "o" if not known.all() or known.sum() == 1 else None
    axes.plot(epochs[known], 100 * values[known], style, marker=marker,
              markersize=3, **kwargs)


def plot_curves(run: Run, path: str) -> Figure | None:
    """Per-exit and ensemble accuracy (%) per epoch from `history.csv`.

    Solid lines: accuracy on the split the run scored while training
    (`training_eval_split`, named in the title), at the epochs it was
    scored; dashed lines of the same colour: accuracy on the training
    batches, when logged. Epochs are whole numbers on the axis.

    Returns:
        The figure; `None`, writing nothing, when the history has no
        accuracy column.
    """
    series = _accuracy_columns(run.history, run.num_exits)
    if not series:
        return None
    epochs = run.epoch_numbers()
    figure = _new_figure((7.0, 5.0))
    axes = figure.add_subplot()
    for index, (label, train, val) in enumerate(series):
        color = f"C{index % 10}"
        if val:
            _plot_series(axes, epochs, run.history[val], "-", color=color, label=label)
        if train:
            _plot_series(axes, epochs, run.history[train], "--", color=color,
                         label=f"{label} (train)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axes.set_xlabel("Epoch")
    axes.set_ylabel("Accuracy (%)")
    axes.set_title(f"{_run_title(run)}\nsolid: {training_eval_split(run)}; "
                   "dashed: training batches", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=120)
    return figure
