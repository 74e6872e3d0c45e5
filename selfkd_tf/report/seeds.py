"""Repeats of one recipe over seeds: grouping, mean and standard deviation.

A paper reports each recipe (architecture, methods, data, hyperparameters)
as the mean ± standard deviation of the scores of a few runs that differ
only in their seed. `group_seeds` finds those repeats among loaded runs
(`selfkd_tf.report.runs.Run`):

* Two runs are repeats of one recipe when their `flags.json` are equal once
  ``seed`` and the fields that do not change what a run computes
  (`selfkd_tf.rundir.layout.RESUME_SAFE_FIELDS`: ``model_dir``,
  ``data_dir``, ...) are left out. Any other difference (``lr``, an explicit
  ``subset_seed``, ``epochs``, ...) makes another recipe; a field present
  in one `flags.json` and absent from the other (an older run) counts as a
  difference.
* A run without `flags.json` is a recipe of its own.
* A mean ± std needs independent runs: two runs of one recipe with one seed
  (a run and a copy of its directory, say), or two runs whose records hold
  the very same scores, are refused (`RepeatedRunError`).
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
the training split without augmentation (``selfkd-eval --split=train``
writes ``RUN/metrics_train.json``), read by `read_train_metrics`, which
refuses a record that is not the run's own (`selfkd_tf.report.provenance`). The
generalisation gap of a run is its training accuracy minus its reported
(test) accuracy, both of the deepest exit, in percentage points; a group's
gap is the mean ± standard deviation of its runs' gaps (not the difference
of two means' spreads).

This module imports no TensorFlow; `selfkd_tf.report.tables` renders the groups
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

from selfkd_tf.report import provenance
from selfkd_tf.rundir.layout import RESUME_SAFE_FIELDS
from selfkd_tf.report.runs import Run
from selfkd_tf.rundir.reading import RunDirectoryError, read_metrics, read_temperatures

IGNORED_FIELDS = RESUME_SAFE_FIELDS | {"seed"}
"""Fields of `flags.json` in which repeats of one recipe may differ."""

TRAIN_SPLIT = "train"
"""The ``split`` a training-accuracy record must have."""

TRAIN_RECORD = "metrics_train.json"
"""The name ``selfkd-eval --split=train`` gives the training-split record."""

_SEED_SUFFIX = re.compile(r"[_-]?seed\d+$")
_SEPARATORS = "/_-"


class RepeatedRunError(RunDirectoryError):
    """One run counted twice in a mean ± std (see `check_repeats`)."""


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
        label: Name of the row, the recipe's: the runs' common name
            without its seed suffix, for one run as for several
            (``baseline`` for ``baseline_seed0``, ``baseline_seed1``); see
            `group_seeds`.
        temperature_records: Per run, its temperature-scaling record
            (`selfkd_tf.rundir.reading.read_temperatures`) or `None`; empty
            when none was read.
    """

    runs: tuple[Run, ...]
    train_metrics: tuple[dict[str, Any] | None, ...]
    label: str
    temperature_records: tuple[dict[str, Any] | None, ...] = ()

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

    def calibration(self, when: str, key: str, classifier: str = "deepest") -> Spread | None:
        """`spread` of a score before or after temperature scaling, over the
        runs with a temperature record; `None` when none has one.

        Args:
            when: ``"before"`` or ``"after"``.
            key: a score of the metrics record, e.g. ``"ece"``.
            classifier: ``"deepest"`` (the deepest exit) or ``"ensemble"``.
        """
        return _spread_of_known([
            None if record is None else float(
                record[when]["exits"][-1][key] if classifier == "deepest"
                else record[when]["ensemble"][key])
            for record in self.temperature_records])

    def deepest_temperature(self) -> Spread | None:
        """`spread` of the deepest exit's temperature over the runs with a
        temperature record; `None` when none has one."""
        return _spread_of_known([None if record is None else record["temperatures"][-1]
                                 for record in self.temperature_records])


def _spread_of_known(values: Sequence[float | None]) -> Spread | None:
    known = [v for v in values if v is not None]
    return spread(known) if known else None


def _stem(run: Run) -> str:
    """The run's name without its seed suffix: ``baseline`` for
    ``baseline_seed0``, ``a`` for ``a/seed1``; a run named ``seed0`` alone
    is named by its parent directory."""
    stem = _SEED_SUFFIX.sub("", run.name).rstrip(_SEPARATORS)
    return stem or os.path.basename(os.path.dirname(os.path.abspath(run.path))) or run.name


def _common_stem(runs: Sequence[Run]) -> str:
    """The runs' common `_stem`; runs named unlike each other (``pskd`` and
    ``pskd_rerun``) share the leading words of their stems, else the first
    run's stem stands for the recipe."""
    stems = list(dict.fromkeys(_stem(run) for run in runs))
    prefix = os.path.commonprefix(stems)
    if not all(stem[len(prefix):len(prefix) + 1] in ("", *_SEPARATORS) for stem in stems):
        # Cut back to whole words: "pskd" and "pskdx" share no word.
        prefix = prefix[:max(prefix.rfind(c) for c in _SEPARATORS) + 1]
    return prefix.rstrip(_SEPARATORS) or stems[0]


def _properties(runs: Sequence[Run]) -> dict[str, str]:
    """What may tell a group apart from another recipe of the same name, as
    label text: its recipe's flags (``lr=0.05``), numbers of scored examples
    and of exits."""
    run = runs[0]
    flags = json.loads(recipe(run.flags) or "{}")
    shown = {
        f"flag {key}": f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in flags.items()}
    return {**shown, "examples": f"{run.num_examples} examples",
            "exits": f"{run.num_exits} exits"}


def _labels(chosen: Sequence[Sequence[Run]]) -> list[str]:
    """Unique row labels of groups of runs (see `group_seeds`)."""
    labels = [_common_stem(runs) for runs in chosen]
    properties = [_properties(runs) for runs in chosen]
    for label in {label for label in labels if labels.count(label) > 1}:
        same = [i for i, other in enumerate(labels) if other == label]
        keys = dict.fromkeys(key for i in same for key in properties[i])
        differ = [key for key in keys
                  if len({properties[i].get(key) for i in same}) > 1]
        for i in same:
            told = [properties[i][key] for key in differ if key in properties[i]]
            labels[i] = f"{label} ({', '.join(told)})" if told else label
    # Still alike (runs without flags.json): their own names.
    return [label if labels.count(label) == 1 else ", ".join(run.name for run in runs)
            for label, runs in zip(labels, chosen)]


def _groups(runs: Sequence[Run]) -> list[list[int]]:
    """Indices of ``runs`` by recipe (`_comparison_key`), in order."""
    members: dict[tuple, list[int]] = {}
    for index, run in enumerate(runs):
        members.setdefault(_comparison_key(run), []).append(index)
    return list(members.values())


def check_repeats(runs: Sequence[Run]) -> None:
    """Refuses runs that would count one run twice in a mean ± std.

    Raises:
        RepeatedRunError: (one line naming both runs) two runs of one recipe
            have the same seed (one run reached twice, e.g. the run and a
            copy of its directory), or two runs report the very same scores
            (one record copied from one run into another).

    Example:

    >>> check_repeats(load_runs(["study/", "docs/results/runs/"]).runs)  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    RepeatedRunError: study/pskd_seed0 and docs/results/runs/pskd_seed0: ...
    """
    for indices in _groups(runs):
        first_of_seed: dict[Any, Run] = {}
        for run in (runs[i] for i in indices):
            seed = run.flags.get("seed")
            if seed is not None and seed in first_of_seed:
                raise RepeatedRunError(
                    f"{first_of_seed[seed].path} and {run.path} are runs of one recipe "
                    f"with one seed ({seed}): the same run twice (a copy of its "
                    "directory?); a mean ± std needs independent seeds: report one of them")
            first_of_seed.setdefault(seed, run)
    copy = provenance.first_copy([run.metrics for run in runs])
    if copy:
        first, second = (runs[i] for i in copy)
        raise RepeatedRunError(
            f"{first.path} and {second.path} report the very same scores: one "
            "run twice, or a record copied from one run directory into the "
            "other; report each run once, with its own record")


def group_seeds(runs: Sequence[Run],
                train_metrics: Sequence[dict[str, Any] | None] | None = None,
                temperature_records: Sequence[dict[str, Any] | None] | None = None,
                ) -> list[SeedGroup]:
    """Groups ``runs`` into repeats of one recipe (see the module doc).

    Args:
        runs: Loaded runs, e.g. `selfkd_tf.report.runs.FoundRuns.runs`.
        train_metrics: Per run, its training-split record or `None`, as
            `read_train_metrics` returns; default: none.
        temperature_records: Per run, its temperature record or `None`, as
            `read_temperature_records` returns; default: none.

    Returns:
        The groups in the order of their first run; runs keep their order.
        A group is labelled by its runs' common name without the seed
        suffix (`SeedGroup.label`). Labels are unique: groups whose names
        share a stem are told apart by what differs between them, e.g.
        ``pskd (lr=0.05)`` and ``pskd (lr=0.1)``, or ``base (100 examples)``
        and ``base (50 examples)`` (runs scored on other numbers of
        examples); runs without ``flags.json`` by their names.

    Raises:
        RepeatedRunError: a run would be counted twice (`check_repeats`).
        ValueError: ``train_metrics`` is not one entry per run.

    Example:

    >>> [g.label for g in group_seeds(runs)]  # doctest: +SKIP
    ['baseline', 'pskd', 'pskd_lr0.05']
    """
    if train_metrics is None:
        train_metrics = [None] * len(runs)
    if len(train_metrics) != len(runs):
        raise ValueError(f"{len(train_metrics)} training records for {len(runs)} runs")
    if temperature_records is None:
        temperature_records = [None] * len(runs)
    check_repeats(runs)
    members = _groups(runs)
    labels = _labels([[runs[i] for i in indices] for indices in members])
    return [
        SeedGroup(tuple(runs[i] for i in indices),
                  tuple(train_metrics[i] for i in indices), label,
                  tuple(temperature_records[i] for i in indices))
        for indices, label in zip(members, labels)
    ]


def _check_train_record(run: Run, record: dict[str, Any], path: str) -> None:
    """Raises `RunDirectoryError` unless ``record`` can give ``run``'s gap."""
    if record["split"] != TRAIN_SPLIT:
        # Never suggest writing the training split under this file's name:
        # it may be the record of another split (metrics_test.json).
        raise RunDirectoryError(
            f"{path}: split is {record['split']!r}, not {TRAIN_SPLIT!r}; "
            f"selfkd-eval --model={run.path} --split={TRAIN_SPLIT} writes the "
            f"training-split record as {os.path.join(run.path, TRAIN_RECORD)}")
    if record["dataset"] != run.metrics["dataset"]:
        raise RunDirectoryError(
            f"{path}: data set {record['dataset']}; the run's reported scores: "
            f"data set {run.metrics['dataset']}")
    provenance.check_record(run, record, path, reference=run.metrics)


def read_train_metrics(runs: Sequence[Run], filename: str
                       ) -> list[dict[str, Any] | None]:
    """Each run's training-split record ``<run dir>/<filename>``.

    Args:
        runs: Loaded runs; their reported scores must not be of the
            training split themselves.
        filename: The record's name in each run directory, e.g.
            `TRAIN_RECORD` (``selfkd-eval --split=train`` writes it); empty:
            no record (all `None`).

    Returns:
        Per run, the record, or `None` when the run directory has no such
        file.

    Raises:
        ValueError: ``filename`` is not a plain file name
            (`provenance.check_file_name`).
        RunDirectoryError: (one line, naming the file) a record is unreadable,
            lacks what the report reads, is not of the ``train`` split, is
            of another data set than the run's reported scores, is not of
            the run's model (`provenance.check_record`: methods, ...), or
            holds the very same scores as another run's (copied); a run's
            reported scores are of the training split; or no run has the
            file (a mistyped name).
    """
    if not filename:
        return [None] * len(runs)
    provenance.check_file_name(filename)
    records: list[dict[str, Any] | None] = []
    for run in runs:
        if run.metrics["split"] == TRAIN_SPLIT:
            raise RunDirectoryError(
                f"{run.path}: the reported scores are of the training split; "
                "the generalisation gap needs them on the test or validation split")
        path = os.path.join(run.path, filename)
        if not os.path.isfile(path):
            records.append(None)
            continue
        record = read_metrics(path)
        _check_train_record(run, record, path)
        records.append(record)
    if runs and all(record is None for record in records):
        raise RunDirectoryError(f"no run directory holds a {filename}")
    copy = provenance.first_copy(records)
    if copy:
        first, second = (os.path.join(runs[i].path, filename) for i in copy)
        raise RunDirectoryError(
            f"{second}: the very same scores as {first}: a record copied from "
            "one run directory into the other; give each run its own")
    return records


def read_temperature_records(runs: Sequence[Run], filename: str
                             ) -> list[dict[str, Any] | None]:
    """Each run's temperature-scaling record ``<run dir>/<filename>``.

    Args:
        runs: Loaded runs.
        filename: The record's name in each run directory, e.g.
            ``temperatures_test.json`` (``selfkd-eval --fit_temperature``
            writes it); empty: no record (all `None`).

    Returns:
        Per run, the record (`selfkd_tf.rundir.reading.read_temperatures`),
        or `None` when the run directory has no such file.

    Raises:
        ValueError: ``filename`` is not a plain file name.
        RunDirectoryError: (one line, naming the file) a record is unreadable
            or not of the run's model (`provenance.check_record`), scored
            another data set than the run's reported scores, or no run has
            the file (a mistyped name).
    """
    if not filename:
        return [None] * len(runs)
    provenance.check_file_name(filename)
    records: list[dict[str, Any] | None] = []
    for run in runs:
        path = os.path.join(run.path, filename)
        if not os.path.isfile(path):
            records.append(None)
            continue
        record = read_temperatures(path)
        for when in ("before", "after"):
            provenance.check_record(run, record[when], f"{path} ({when})")
        if record["before"]["dataset"] != run.metrics["dataset"]:
            raise RunDirectoryError(
                f"{path}: data set {record['before']['dataset']}; the run's reported "
                f"scores: data set {run.metrics['dataset']}")
        records.append(record)
    if runs and all(record is None for record in records):
        raise RunDirectoryError(f"no run directory holds a {filename}")
    return records
