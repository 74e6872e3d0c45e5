"""Comparison tables and figures of training runs.

`selfkd_tf.report.runs.load_runs` finds and reads run directories; `write_report`
renders them into an output directory:

* `table1.md`: the deepest exit's top-1 / top-5 error, NLL, ECE, AURC and the
  training time of each run (layout of Table 1 of PS-KD), one table per
  dataset and split.
* `table2.md`: the accuracy of every exit and of the exits' ensemble.
* `summary.md`: Tables 1 and 2 over seeds, one row per recipe with the mean
  ± sample standard deviation of its runs (`selfkd_tf.report.seeds` groups
  runs that differ only in their seed), and, given training-split records
  (``train_metrics_file``), the training accuracy and the generalisation
  gap. Written when some recipe has two or more runs, or training-split
  records are read; otherwise it would repeat `table1.md`.
* `figure2.png`: top-1 error against training time per epoch.
* `reliability_<run>.png`: reliability diagram of the deepest exit.
* `curves_<run>.png`: per-exit accuracy along training, on the split the
  run scored while training.

The figures are drawn by `selfkd_tf.report.figures`.

Runs are grouped into one table per data set and split; under a table whose
runs scored different numbers of examples, trained at different image sizes
or have different numbers of exits, a note says they are not comparable
(`incomparable`). Runs that could not be reported are listed with the reason.
A run counted twice (`seeds.check_repeats`) and records that are not
their run's own (`selfkd_tf.report.provenance`) are refused.

Example:

```python
found = runs.load_runs(["runs/*"], "metrics_test.json")
provenance.check_reported(found.runs, "metrics_test.json")
write_report(found.runs, "report", skipped=found.skipped,
             train_metrics_file="metrics_train.json")
```
"""

import logging
import os
import shutil
import tempfile
from typing import Callable, Sequence, TypeVar

from selfkd_tf.report import seeds
from selfkd_tf.report.figures import plot_curves, plot_figure2, plot_reliability
from selfkd_tf.rundir.layout import RESUME_SAFE_FIELDS
from selfkd_tf.report.runs import Run, SkippedRun
from selfkd_tf.rundir.reading import RunDirectoryError
from selfkd_tf.report.seeds import SeedGroup, Spread

TABLE1_SCORES = (
    ("top1_err", "Top-1 err (%)", ".2f"),
    ("top5_err", "Top-5 err (%)", ".2f"),
    ("nll", "NLL", ".3f"),
    ("ece", "ECE (%)", ".2f"),
    ("aurc", "AURC (x1000)", ".2f"),
)
"""`(metrics.json key, column header, format)` of the Table 1 scores,
among the `selfkd_tf.metrics.scores.METRIC_KEYS` every record holds."""

_MISSING = "n/a"
_Item = TypeVar("_Item")

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


def _by_dataset(items: Sequence[_Item], run_of: Callable[[_Item], Run] = lambda run: run
                ) -> list[tuple[str, list[_Item]]]:
    """Runs (or groups of runs: ``run_of`` gives one) grouped by
    `dataset (split)`, groups and items in input order."""
    groups: dict[str, list[_Item]] = {}
    for item in items:
        metrics = run_of(item).metrics
        groups.setdefault(f"{metrics['dataset']} ({metrics['split']})", []).append(item)
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


def _classifier_columns(width: int) -> list[str]:
    """Headers of the exits of the deepest of ``width`` exits, and the ensemble."""
    return [*(f"Exit {i} (stage {i})" for i in range(1, width)),
            f"Exit {width} (deepest)", "Ensemble"]


def _classifier_cells(exits: Sequence[str], ensemble: str, width: int) -> list[str]:
    """Cells under `_classifier_columns(width)`, aligned by depth; a single
    exit has no ensemble."""
    return [*[""] * (width - len(exits)), *exits, ensemble if len(exits) > 1 else ""]


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
        header = ["Run", "Model", "Method", *_classifier_columns(width)]
        rows = []
        for run in group:
            accuracies = [
                f"{seeds.accuracy(e):.2f}" for e in run.metrics["exits"]
            ]
            ensemble = seeds.accuracy(run.metrics["ensemble"])
            rows.append([run.name, run.model, run.method,
                         *_classifier_cells(accuracies, f"{ensemble:.2f}", width)])
        sections += [f"## {title}", "", _markdown_table(header, rows, 3), "",
                     *_group_note(group)]
    sections += [
        "Classifiers are aligned by depth: runs with fewer exits leave the "
        "shallow columns blank. Ensemble: mean of the exits' probabilities.", "",
        *_report_notes(runs, skipped),
    ]
    return "\n".join(sections)


def _spread_cell(value: Spread | None, spec: str, n: int) -> str:
    """``value`` formatted; ``(n=k)`` when it covers k of the row's n runs."""
    if value is None:
        return _MISSING
    cell = value.format(spec)
    return cell if value.n == n else f"{cell} (n={value.n})"


def _summary_notes(train_metrics_file: str, missing: Sequence[str]) -> list[str]:
    """Markdown lines saying how `summary_markdown`'s cells are computed."""
    safe = ", ".join(sorted(RESUME_SAFE_FIELDS))
    lines = [
        "Recipe: the common name of its runs without the seed suffix. "
        "Each cell: mean ± sample standard deviation over the recipe's runs, "
        "s = √(Σ(x − x̄)² / (n − 1)); a cell without ± is the value of a "
        "single run; (n=k): over the k runs that have the value. A recipe's "
        "runs have the same flags.json except for seed and fields that do not "
        f"change the result ({safe}), and scored the same data set, split and "
        "number of examples; runs without flags.json are rows of their own.", ""]
    if train_metrics_file:
        lines += [
            f"Train acc: accuracy of the deepest exit on the training split "
            f"({train_metrics_file}). Gap: training minus reported accuracy of "
            "the deepest exit (the split in the heading), in percentage points, "
            "per run, then mean ± standard deviation over the runs.", ""]
        if missing:
            lines += [f"No {train_metrics_file} (n/a): {', '.join(missing)}.", ""]
    return lines


def _temperature_table(section: Sequence[SeedGroup], title: str) -> list[str]:
    """The temperature-scaling section of `summary_markdown`, if any run has a record."""
    with_records = [g for g in section if any(r is not None for r in g.temperature_records)]
    if not with_records:
        return []
    header = ["Recipe", "Model", "Method", "n", "T (deepest)",
              "NLL", "NLL, scaled", "ECE (%)", "ECE (%), scaled",
              "Ensemble ECE (%)", "Ensemble ECE (%), scaled"]
    rows = []
    for group in with_records:
        first = group.runs[0]
        cells = [_spread_cell(group.deepest_temperature(), ".3f", group.n)]
        for key, classifier, spec in (("nll", "deepest", ".3f"), ("ece", "deepest", ".2f"),
                                      ("ece", "ensemble", ".2f")):
            cells += [_spread_cell(group.calibration(when, key, classifier), spec, group.n)
                      for when in ("before", "after")]
        rows.append([group.label, first.model, first.method, str(group.n), *cells])
    record = next(r for g in with_records for r in g.temperature_records if r is not None)
    fitted, reported = record["fitted_on"], record["reported_on"]
    return [
        f"## Temperature scaling, {title}", "",
        _markdown_table(header, rows, 3), "",
        "One temperature per exit, fitted by NLL on held-out data (Guo et al., 2017), "
        f"here on the {fitted['split']} split's {fitted['rows']} ({fitted['num_examples']} "
        f"examples); every score on the {reported['split']} split's {reported['rows']} "
        f"({reported['num_examples']} examples), before and after scaling. The "
        "ensemble averages the scaled exits.", ""]


def summary_markdown(groups: Sequence[SeedGroup], skipped: Sequence[SkippedRun] = (),
                     train_metrics_file: str = "") -> str:
    """Tables 1 and 2 over seeds: one row per recipe (`SeedGroup`).

    Rows give the recipe's label, model, method, number of runs ``n`` and
    their seeds (``?`` without flags.json); cells are ``mean ± std`` over the
    runs (`seeds.Spread.format`; the value alone for ``n = 1``).
    Table 1 has the scores of `table1_markdown` and, with
    ``train_metrics_file`` (the groups' `SeedGroup.train_metrics` were read
    from it), ``Train acc (%)`` and ``Gap (points)``; a third table then
    lists each run's test and training accuracy and gap. Table 2 is
    aligned by depth as in `table2_markdown`. When the groups hold
    temperature records (`SeedGroup.temperature_records`), a table gives
    the deepest exit's temperature and NLL and ECE before and after scaling.
    Notes as in `table1_markdown`, and the definitions of the cells.
    """
    columns = ["Recipe", "Model", "Method", "n", "Seeds"]
    header1 = [*columns, *(title for _, title, _ in TABLE1_SCORES)]
    if train_metrics_file:
        header1 += ["Train acc (%)", "Gap (points)"]
    sections = ["# Summary: mean ± standard deviation over seeds", ""]
    for title, section in _by_dataset(groups, lambda group: group.runs[0]):
        width = max(group.runs[0].num_exits for group in section)
        split = section[0].runs[0].metrics["split"]
        rows1, rows2, per_run = [], [], []
        for group in section:
            first = group.runs[0]
            seed_list = ", ".join("?" if s is None else str(s) for s in group.seeds)
            cells = [first.model, first.method, str(group.n), seed_list]
            scores = [_spread_cell(group.score(key), fmt, group.n)
                      for key, _, fmt in TABLE1_SCORES]
            if train_metrics_file:
                scores += [_spread_cell(group.train_accuracy(), ".2f", group.n),
                           _spread_cell(group.gap(), ".2f", group.n)]
            rows1.append([group.label, *cells, *scores])
            exits = [_spread_cell(a, ".2f", group.n) for a in group.exit_accuracies()]
            ensemble = _spread_cell(group.ensemble_accuracy(), ".2f", group.n)
            rows2.append([group.label, *cells,
                          *_classifier_cells(exits, ensemble, width)])
            for run, train, gap in zip(group.runs, group.train_accuracies(), group.gaps()):
                per_run.append([
                    run.name, group.label, str(run.flags.get("seed", "?")),
                    f"{seeds.accuracy(run.deepest):.2f}",
                    *(_MISSING if v is None else f"{v:.2f}" for v in (train, gap))])
        sections += [
            f"## Table 1 over seeds: deepest classifier, {title}", "",
            _markdown_table(header1, rows1, 3), "",
            f"## Table 2 over seeds: accuracy (%) of each classifier, {title}", "",
            _markdown_table([*columns, *_classifier_columns(width)], rows2, 3), ""]
        if train_metrics_file:
            sections += [
                f"## Training accuracy and gap of each run, {title}", "",
                _markdown_table(["Run", "Recipe", "Seed", f"{split.capitalize()} acc (%)",
                                 "Train acc (%)", "Gap (points)"], per_run, 2), ""]
        sections += _temperature_table(section, title)
        sections += _group_note([run for group in section for run in group.runs])
    missing = [run.name for group in groups
               for run, train in zip(group.runs, group.train_metrics) if train is None]
    runs = [run for group in groups for run in group.runs]
    return "\n".join(sections + _summary_notes(train_metrics_file, missing)
                     + _report_notes(runs, skipped))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_report(runs: Sequence[Run], out_dir: str,
                 skipped: Sequence[SkippedRun] = (),
                 train_metrics_file: str = "",
                 temperature_file: str = "") -> list[str]:
    """Writes the tables and figures of `runs` into `out_dir`.

    The tables end with the `skipped` runs (e.g. `FoundRuns.skipped`) and
    the reason each was left out. `summary.md` (`summary_markdown`) is
    written when some recipe has two or more runs or ``train_metrics_file``
    is given: the name of each run's training-split record, e.g.
    ``metrics_train.json`` (see `seeds.read_train_metrics`), or
    ``temperature_file``: the name of each run's temperature-scaling record,
    e.g. ``temperatures_test.json`` (`seeds.read_temperature_records`).

    Everything is rendered into a temporary directory first and moved into
    `out_dir` (created if needed) only once complete, so a failure leaves
    `out_dir` untouched. Files of the same name in `out_dir` are replaced.
    A run whose history has no accuracy column gets no curves figure (a
    warning is logged).

    Returns:
        The paths written, sorted.

    Raises:
        RepeatedRunError: a run would be counted twice
            (`seeds.check_repeats`); nothing is written.
        RunDirectoryError: No run, or a training-split record cannot be used
            (see `seeds.read_train_metrics`); nothing is written.
        ValueError: ``train_metrics_file`` is not a plain file name.
    """
    if not runs:
        raise RunDirectoryError("no run to report")
    # Before the training records: a run reported twice is named as such,
    # not as a training record that another run holds too.
    seeds.check_repeats(runs)
    train_metrics = seeds.read_train_metrics(runs, train_metrics_file)
    temperature_records = seeds.read_temperature_records(runs, temperature_file)
    groups = seeds.group_seeds(runs, train_metrics, temperature_records)
    staging = tempfile.mkdtemp(prefix="selfkd-report-")
    try:
        _write_text(os.path.join(staging, "table1.md"), table1_markdown(runs, skipped))
        _write_text(os.path.join(staging, "table2.md"), table2_markdown(runs, skipped))
        if train_metrics_file or temperature_file or any(group.n > 1 for group in groups):
            _write_text(os.path.join(staging, "summary.md"),
                        summary_markdown(groups, skipped, train_metrics_file))
        plot_figure2(runs, os.path.join(staging, "figure2.png"))
        for run in runs:
            stem = run.file_stem
            plot_reliability(run, os.path.join(staging, f"reliability_{stem}.png"))
            if plot_curves(run, os.path.join(staging, f"curves_{stem}.png")) is None:
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
