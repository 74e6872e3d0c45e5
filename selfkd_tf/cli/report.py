"""Builds the comparison tables and figures of training runs.

Writes `table1.md`, `table2.md`, `figure2.png` and, per run,
`reliability_<run>.png` and `curves_<run>.png` (see `selfkd_tf.report`).

Usage:

    selfkd-report --runs=runs/resnet18_baseline,runs/resnet18_pskd --out=report
    selfkd-report --runs='runs/cifar100_*' --out=report
    selfkd-report --runs=runs --out=report

On a missing or unusable run the command prints one error line naming the
directory, writes nothing and exits with status 1.
"""

import sys

from absl import app, flags

from selfkd_tf import report

FLAGS = flags.FLAGS

flags.DEFINE_list(
    "runs", None,
    "Comma-separated run specifications. Each is a run directory (holding "
    "metrics.json and optionally flags.json and history.csv), a parent "
    "directory searched recursively for runs, or a quoted glob pattern such "
    "as 'runs/*'. Runs are named by the shortest distinguishing suffix of "
    "their path.")
flags.DEFINE_string(
    "out", None,
    "Output directory, created if missing; files of the same name are "
    "replaced.")
flags.DEFINE_string(
    "metrics_file", "metrics.json",
    "The scores of each run to report: metrics.json (written at the end of "
    "training, on the run's evaluation split) or a record that selfkd-eval "
    "wrote into the run directory, e.g. metrics_test.json for the whole test "
    "split.")
flags.mark_flags_as_required(["runs", "out"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        runs = report.load_runs(FLAGS.runs, FLAGS.metrics_file)
        written = report.write_report(runs, FLAGS.out)
    except (ValueError, OSError) as err:
        # One line, whatever the message (e.g. a JSON error) contains.
        print(f"selfkd-report: error: {' '.join(str(err).split())}",
              file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
