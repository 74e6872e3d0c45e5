"""Repeats of one recipe over seeds: grouping, mean and standard deviation.

A paper reports each recipe (architecture, methods, data, hyperparameters)
as the mean ± standard deviation of the scores of a few runs that differ
only in their seed. `group_seeds` finds those repeats among loaded runs
(`selfkd_tf.runs.Run`):

* Two runs are repeats of one recipe when their `flags.json` are equal once
  ``seed`` and the fields that do not change what a run computes
  (`selfkd_tf.run_directory.RESUME_SAFE_FIELDS`: ``model_dir``,
  ``data_dir``, ...) are left out. Any other difference (``lr``, an explicit
  ``subset_seed``, ``epochs``, ...) makes another recipe; a field present
  in one `flags.json` and absent from the other (an older run) counts as a
  difference.
* A run without `flags.json` is a recipe of its own.
* Repeats must also be comparable: runs whose reported scores come from
  another data set, split or number of examples, or that have another
  number of exits, are kept apart as another group (the tables then show
  two rows and say under them that the numbers of examples differ).

For each group `SeedGroup` gives the number of runs ``n``, their seeds and,
for each score, the mean and the *sample* standard deviation (`spread`)

    mean = Σ x_i / n,    s = sqrt(Σ (x_i - mean)² / (n - 1)),

which is undefined for ``n = 1`` (`Spread.std` is then `None` and the value
is shown alone). Accuracies are ``100 - top1_err`` in percent.

Training accuracy comes from a second record per run directory, scored on
the training split without augmentation (``selfkd-eval --split=train
--out=RUN/metrics_train.json``), read by `read_train_metrics`. The
generalisation gap of a run is its training accuracy minus its reported
(test) accuracy, both of the deepest exit, in percentage points; a group's
gap is the mean ± standard deviation of its runs' gaps (not the difference
of two means' spreads).

This module imports no TensorFlow; `selfkd_tf.report` renders the groups
into ``summary.md``.

Example:

```python
found = runs.load_runs(["runs/"], metrics_file="metrics_test.json")
train = read_train_metrics(found.runs, "metrics_train.json")
for group in group_seeds(found.runs, train):
    print(group.label, group.seeds, group.score("top1_err").format(".2f"))
# baseline [0, 1, 2] 32.00 ± 2.00
```
"""

import dataclasses
import json
import os
import re
import statistics
from typing import Any, Sequence

from selfkd_tf.run_directory import RESUME_SAFE_FIELDS
from selfkd_tf.runs import Run, RunDataError, read_metrics

IGNORED_FIELDS = RESUME_SAFE_FIELDS | {"seed"}
"""Fields of `flags.json` in which repeats of one recipe may differ."""

TRAIN_SPLIT = "train"
"""The ``split`` a training-accuracy record must have."""

_SEED_SUFFIX = re.compile(r"[_-]?seed\d+$")


@dataclasses.dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of one score over ``n`` runs.

    Attributes:
        mean: The arithmetic mean.
        std: The sample standard deviation (``ddof=1``), `None` for
            ``n = 1``.
        n: The number of values.
    """

    mean: float
    std: float | None
    n: int

    def format(self, spec: str) -> str:
        """``"32.00 ± 2.00"`` with ``spec=".2f"``; the mean alone for ``n = 1``."""
        if self.std is None:
            return format(self.mean, spec)
        return f"{self.mean:{spec}} ± {self.std:{spec}}"


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of ``values``.

    ``mean = Σ x_i / n`` and ``s = sqrt(Σ (x_i - mean)² / (n - 1))``, the
    unbiased estimate of the variance under the square root (``ddof=1``, as
    `numpy.std(values, ddof=1)`); ``s`` is `None` for a single value.

    Raises:
        ValueError: ``values`` is empty.

    Example:

    >>> spread([30.0, 32.0, 34.0])
    Spread(mean=32.0, std=2.0, n=3)
    >>> spread([31.5])
    Spread(mean=31.5, std=None, n=1)
    """
    if not values:
        raise ValueError("spread of no values")
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else None
    return Spread(statistics.fmean(values), std, len(values))


def accuracy(entry: dict[str, Any]) -> float:
    """Top-1 accuracy (%) of an exit's (or the ensemble's) scores."""
    return 100.0 - float(entry["top1_err"])


def recipe(flags: dict[str, Any]) -> str | None:
    """What repeats of one recipe share: ``flags`` without `IGNORED_FIELDS`,
    as canonical JSON; `None` without flags (no recipe is known).

    Example:

    >>> recipe({"lr": 0.1, "seed": 1, "model_dir": "runs/a"})
    '{"lr": 0.1}'
    """
    if not flags:
        return None
    return json.dumps({k: v for k, v in flags.items() if k not in IGNORED_FIELDS},
                      sort_keys=True)


def _comparison_key(run: Run) -> tuple:
    """Runs with the same key are repeats of one recipe (see module doc)."""
    metrics = run.metrics
    # A run without flags is keyed by its own path: a group of one.
    what = recipe(run.flags) or ("run", os.path.realpath(run.path))
    return (what, metrics["dataset"], metrics["split"], run.num_examples, run.num_exits)


@dataclasses.dataclass(frozen=True)
class SeedGroup:
    """The runs of one recipe, with their training-split records.

    Attributes:
        runs: The repeats, in the order they were given.
        train_metrics: Per run, its training-split record (schema of
            `metrics.json`, ``split`` "train"), or `None` when it has none.
        label: Name of the row: the runs' common name without its seed
            suffix (``baseline`` for ``baseline_seed0``, ``baseline_seed1``),
            else the run names joined with ", ", or the name of a lone run.
    """

    runs: tuple[Run, ...]
    train_metrics: tuple[dict[str, Any] | None, ...]
    label: str

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        """The runs' ``seed`` flags, `None` for a run without flags."""
        return [run.flags.get("seed") for run in self.runs]

    def score(self, key: str) -> Spread:
        """`spread` of a score (e.g. ``"top1_err"``) of the deepest exit."""
        return spread([float(run.deepest[key]) for run in self.runs])

    def exit_accuracies(self) -> list[Spread]:
        """`spread` of the accuracy (%) of each exit, shallowest first."""
        per_run = [[accuracy(e) for e in run.metrics["exits"]] for run in self.runs]
        return [spread(values) for values in zip(*per_run)]

    def ensemble_accuracy(self) -> Spread:
        """`spread` of the accuracy (%) of the ensemble of the exits."""
        return spread([accuracy(run.metrics["ensemble"]) for run in self.runs])

    def train_accuracies(self) -> list[float | None]:
        """Per run, the deepest exit's accuracy (%) on the training split,
        `None` without a training-split record."""
        return [None if train is None else accuracy(train["exits"][-1])
                for train in self.train_metrics]

    def gaps(self) -> list[float | None]:
        """Per run, training minus reported accuracy (%) of the deepest exit,
        `None` without a training-split record.

        Example: training accuracy 99.10 and test accuracy 68.00 give a gap
        of 31.10 points.
        """
        return [None if train is None else train - accuracy(run.deepest)
                for run, train in zip(self.runs, self.train_accuracies())]

    def train_accuracy(self) -> Spread | None:
        """`spread` of `train_accuracies` over the runs that have one
        (`Spread.n` may be below `n`), `None` when none has."""
        return _spread_of_known(self.train_accuracies())

    def gap(self) -> Spread | None:
        """`spread` of `gaps` over the runs that have one, `None` when none has."""
        return _spread_of_known(self.gaps())


def _spread_of_known(values: Sequence[float | None]) -> Spread | None:
    known = [v for v in values if v is not None]
    return spread(known) if known else None


def _label(runs: Sequence[Run]) -> str:
    if len(runs) == 1:
        return runs[0].name
    stems = {_SEED_SUFFIX.sub("", run.name).rstrip("/_-") for run in runs}
    if len(stems) == 1 and "" not in stems:
        return stems.pop()
    return ", ".join(run.name for run in runs)


def group_seeds(runs: Sequence[Run],
                train_metrics: Sequence[dict[str, Any] | None] | None = None
                ) -> list[SeedGroup]:
    """Groups ``runs`` into repeats of one recipe (see the module doc).

    Args:
        runs: Loaded runs, e.g. `selfkd_tf.runs.FoundRuns.runs`.
        train_metrics: Per run, its training-split record or `None`, as
            `read_train_metrics` returns; default: none.

    Returns:
        The groups in the order of their first run; runs keep their order.
        Labels are unique: two groups whose names share a stem (runs kept
        apart because they scored different numbers of examples) are
        labelled by their run names.

    Example:

    >>> [g.label for g in group_seeds(runs)]  # doctest: +SKIP
    ['baseline', 'pskd', 'pskd_lr0.05_seed0']
    """
    if train_metrics is None:
        train_metrics = [None] * len(runs)
    if len(train_metrics) != len(runs):
        raise ValueError(f"{len(train_metrics)} training records for {len(runs)} runs")
    members: dict[tuple, list[int]] = {}
    for index, run in enumerate(runs):
        members.setdefault(_comparison_key(run), []).append(index)
    chosen = [[runs[i] for i in indices] for indices in members.values()]
    labels = [_label(group) for group in chosen]
    labels = [
        label if labels.count(label) == 1 else ", ".join(run.name for run in group)
        for label, group in zip(labels, chosen)
    ]
    return [
        SeedGroup(tuple(runs[i] for i in indices),
                  tuple(train_metrics[i] for i in indices), label)
        for indices, label in zip(members.values(), labels)
    ]


def read_train_metrics(runs: Sequence[Run], filename: str
                       ) -> list[dict[str, Any] | None]:
    """Each run's training-split record ``<run dir>/<filename>``.

    Args:
        runs: Loaded runs; their reported scores must not be of the
            training split themselves.
        filename: The record's name in each run directory, e.g.
            ``metrics_train.json`` (``selfkd-eval --split=train`` writes
            it); empty: no record (all `None`).

    Returns:
        Per run, the record, or `None` when the run directory has no such
        file.

    Raises:
        RunDataError: (one line, naming the file) a record is unreadable,
            lacks what the report reads, is not of the ``train`` split, or
            of another data set or number of exits than the run's reported
            scores; a run's reported scores are of the training split; or
            no run has the file (a mistyped name).
    """
    if not filename:
        return [None] * len(runs)
    records: list[dict[str, Any] | None] = []
    for run in runs:
        if run.metrics["split"] == TRAIN_SPLIT:
            raise RunDataError(
                f"{run.path}: the reported scores are of the training split; "
                "the generalisation gap needs them on the test or validation split")
        path = os.path.join(run.path, filename)
        if not os.path.isfile(path):
            records.append(None)
            continue
        record = read_metrics(path)
        if record["split"] != TRAIN_SPLIT:
            raise RunDataError(
                f"{path}: split is {record['split']!r}, not {TRAIN_SPLIT!r} "
                f"(selfkd-eval --model={run.path} --split=train --out={path} "
                "writes the training-split record)")
        reported = (run.metrics["dataset"], run.num_exits)
        scored = (record["dataset"], len(record["exits"]))
        if scored != reported:
            raise RunDataError(
                f"{path}: data set {scored[0]}, {scored[1]} exit(s); the run's "
                f"reported scores: data set {reported[0]}, {reported[1]} exit(s)")
        records.append(record)
    if runs and all(record is None for record in records):
        raise RunDataError(f"no run directory holds a {filename}")
    return records

