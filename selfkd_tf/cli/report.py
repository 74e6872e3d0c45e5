"""``selfkd-report``: comparison tables and figures of training runs.

Usage:

    selfkd-report --runs=runs/resnet18_baseline,runs/resnet18_pskd --out=report
    selfkd-report --runs='runs/cifar100_*' --out=report
    selfkd-report --runs=runs --out=report --metrics_file=metrics_test.json
    selfkd-report --runs=study --out=report --metrics_file=metrics_test.json --train_metrics_file=metrics_train.json

Writes `table1.md`, `table2.md`, `figure2.png` and, per run,
`reliability_<run>.png` and `curves_<run>.png` (see `selfkd_tf.report.tables`).
When some recipe was run with several seeds, or with
``--train_metrics_file``, `summary.md` adds one row per recipe with the
mean ± sample standard deviation over its seeds and, with
``--train_metrics_file``, the training accuracy and the generalisation gap
(see `selfkd_tf.report.seeds`).

Directories under ``--runs`` are searched through symbolic links. Runs that
cannot be reported yet (training not finished, no ``--metrics_file``) or at
all (unreadable files) are skipped: each is named with the reason on stderr
and at the end of the tables. A table whose runs are not comparable (other
numbers of scored examples, image sizes or numbers of exits) says so.

``--metrics_file`` and ``--train_metrics_file`` name a file inside each run
directory, never a path. A record that is not its run's own is refused: its
architecture, methods or epochs differ from the run's flags.json, or a
training record's (with its parameter count and number of exits) from the
run's reported scores, or two runs hold the very same scores (see
`selfkd_tf.report.provenance`). So is a run counted twice: two runs of one recipe
with one seed, e.g. a run and a copy of its directory.

Exit status: 0 when the report is written (also with skipped runs); 2 when a
``--runs`` entry matches no run directory, when no run can be reported, for
a bad flag (a path as a record's name), for a run counted twice, for a
reported record that is not its run's own, or for an unusable
``--train_metrics_file`` record (of another split, data set or model, a copy
of another run's, or in no run directory); 1 when ``--out`` cannot be
written (one error line each, nothing written).
"""

import logging
import sys

from absl import flags

from selfkd_tf.report import provenance

from selfkd_tf.report import tables
from selfkd_tf.report import runs as runs_lib
from selfkd_tf.rundir.reading import RunDirectoryError
from selfkd_tf.cli import program
from selfkd_tf.report.seeds import RepeatedRunError

PROGRAM = "selfkd-report"
FLAGS = flags.FLAGS

flags.DEFINE_list(
    "runs", None,
    "Comma-separated run specifications. Each is a run directory (holding "
    "metrics.json and optionally flags.json and history.csv), a parent "
    "directory searched recursively for runs (following symbolic links), or "
    "a quoted glob pattern such as 'runs/*'. Runs are named by the shortest "
    "distinguishing suffix of their path.")
flags.DEFINE_string(
    "out", None,
    "Output directory, created if missing; files of the same name are "
    "replaced.")
flags.DEFINE_string(
    "metrics_file", "metrics.json",
    "The scores of each run to report, named by a file name inside each run "
    "directory (not a path): metrics.json (written at the end of training, on "
    "the run's evaluation split) or a record that selfkd-eval wrote into the "
    "run directory, e.g. metrics_test.json for the whole test split.")
flags.DEFINE_string(
    "train_metrics_file", "",
    "The file name, inside each run directory (not a path), of the run's "
    "scores on its own training split, unaugmented: the record that "
    "selfkd-eval --split=train wrote into the run directory, "
    "metrics_train.json. summary.md then adds the training accuracy and the "
    "generalisation gap (training minus reported accuracy, deepest exit). "
    "Runs without the file show n/a; a record of another split or of "
    "another run is refused. "
    "Empty: no training accuracy.")
flags.DEFINE_string(
    "temperature_file", "",
    "The file name, inside each run directory (not a path), of the run's "
    "temperature-scaling record, temperatures_<split>.json, written by "
    "selfkd-eval --fit_temperature. summary.md then adds the deepest exit's "
    "temperature and its NLL and ECE (and the ensemble's ECE) before and after "
    "temperature scaling. Empty: none.")
flags.mark_flags_as_required(["runs", "out"])


def _file_name(name: str) -> bool:
    """absl validator: a record's name inside each run directory."""
    problem = provenance.file_name_problem(name)
    if problem:
        raise flags.ValidationError(problem)
    return True


flags.register_validator("metrics_file", _file_name)
flags.register_validator("train_metrics_file", lambda name: not name or _file_name(name))
flags.register_validator("temperature_file", lambda name: not name or _file_name(name))


def _warnings_on_one_line() -> None:
    """The report's warnings as ``selfkd-report: ...``, not absl's log format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROGRAM}: %(message)s"))
    logger = logging.getLogger(tables.__name__)
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: list[str]) -> int:
    del argv  # program.run rejects positional arguments
    _warnings_on_one_line()
    try:
        found = runs_lib.load_runs(FLAGS.runs, FLAGS.metrics_file)
    except RunDirectoryError as err:
        program.fail(PROGRAM, err)
    try:
        provenance.check_reported(found.runs, FLAGS.metrics_file)
    except RunDirectoryError as err:
        program.fail(PROGRAM, f"--metrics_file: {err}")
    for skipped in found.skipped:
        print(f"{PROGRAM}: skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    if not found.runs:
        program.fail(PROGRAM, f"no run to report: all {len(found.skipped)} "
                     "run directories were skipped (see above)")
    try:
        written = tables.write_report(found.runs, FLAGS.out, found.skipped,
                                      FLAGS.train_metrics_file, FLAGS.temperature_file)
    except RepeatedRunError as err:
        program.fail(PROGRAM, f"--runs: {err}")
    except RunDirectoryError as err:
        temperatures = FLAGS.temperature_file and FLAGS.temperature_file in str(err)
        program.fail(PROGRAM, f"--{'temperature_file' if temperatures else 'train_metrics_file'}"
                     f": {err}")
    except OSError as err:
        program.fail(PROGRAM, f"--out: cannot write {FLAGS.out}: {err}", status=1)
    for path in written:
        print(path)
    return 0


def run() -> None:
    program.run(main, PROGRAM)


if __name__ == "__main__":
    run()
