r"""Runs the paper's Table 1/2 protocol: all 8 method combinations, one recipe.

Every row trains with the same flagfile and number of epochs, each in its
own run directory under --out: all 8 rows with --seed, and the
--spread_rows again with each of the --spread_seeds. Rerunning the same
command resumes: interrupted runs continue from their last checkpoint, and
runs already scored are only checked (``selfkd-train`` refuses a run whose
recorded settings differ from the recipe's, and the study stops there).

After training, each run is scored with ``selfkd-eval`` on the whole test
split (``metrics_test.json``) and on its own training examples, unaugmented
(``metrics_train.json``), whatever subset it evaluated on while training,
and temperature-scaled (``temperatures_test.json``: one temperature per
exit fitted on a stratified half of the test split, scored on the other);
a record that is missing or unreadable is scored again. At the end
``selfkd-report`` writes the tables and figures into --out/report.

Examples (the two CPU studies of docs/results.md):

    python tools/study.py --run_flagfile=configs/study_cifar10.flags \
        --dataset=folder:/data/cifar10-jpeg --out=/data/runs/study --parallel=2
    python tools/study.py --run_flagfile=configs/study_cifar10_small.flags \
        --dataset=folder:/data/cifar10-jpeg --out=/data/runs/small \
        --spread_rows=baseline,pskd,byot,pskd_byot_dmfl --spread_seeds=1,2

Rows: baseline, byot, dmfl, pskd, pskd_byot, pskd_dmfl, byot_dmfl,
pskd_byot_dmfl (the paper's, trained by default), and the controls ls
(label smoothing) and ds (deep supervision), trained when --only names
them. With --parallel=N the script trains N runs at once and
gives each process an equal share of the CPU cores
(``TF_NUM_INTRAOP_THREADS``): small networks use one core poorly, so on a
CPU two single-threaded runs finish sooner than two runs one after the
other. Each run's output goes to ``train.log`` in its directory; a run that
fails is named with the last line of its log. --dry_run lists the runs
still to train, with their commands.

Ctrl-C (or SIGTERM) stops the runs in progress as Ctrl-C stops
``selfkd-train`` (each says where in its log and on one line here) and ends
with one line, exit status 130. Exit status 2:
bad flags, or a run refused its input (nothing more is started); 1: a run
failed otherwise.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

from absl import flags

from selfkd_tf import files
from selfkd_tf.cli import program

PROGRAM = "study.py"
MAX_SEED = 2**32 - 1
"""Largest seed `selfkd-train` takes."""

_FLAGFILE = flags.DEFINE_string("run_flagfile", "configs/study_cifar10.flags",
                                "selfkd-train flagfile with the shared recipe.")
_OUT = flags.DEFINE_string("out", None, "Parent directory of the runs (required).")
_DATASET = flags.DEFINE_string("dataset", None, "Overrides the flagfile's --dataset.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every row.", lower_bound=0,
                             upper_bound=MAX_SEED)
_SPREAD_ROWS = flags.DEFINE_list(
    "spread_rows", ["baseline", "pskd_byot_dmfl"],
    "Rows trained again with each of --spread_seeds, to measure the "
    "run-to-run spread. Their --seed runs train first, their further seeds "
    "after every other row.")
_SPREAD_SEEDS = flags.DEFINE_list(
    "spread_seeds", ["1"], "Further seeds of the --spread_rows (integers, "
    "none equal to --seed).")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (the paper's 8 when "
                          "empty; the row names are listed above).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the runs still to train, with their commands, "
    "and stop.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Runs trained at once, sharing the CPU cores equally.",
    lower_bound=1)
flags.mark_flag_as_required("out")

# (label, --methods) in the order of the paper's Table 1.
ROWS = (
    ("baseline", ""),
    ("byot", "byot"),
    ("dmfl", "dmfl"),
    ("pskd", "pskd"),
    ("pskd_byot", "pskd,byot"),
    ("pskd_dmfl", "pskd,dmfl"),
    ("byot_dmfl", "byot,dmfl"),
    ("pskd_byot_dmfl", "pskd,byot,dmfl"),
    # The controls: label smoothing and deep supervision.
    ("ls", "ls"),
    ("ds", "ds"),
)
PAPER_ROWS = tuple(label for label, _ in ROWS[:8])
"""The rows trained when --only names none: the paper's 8 combinations."""
EVALUATIONS = (
    ("test", "metrics_test.json", ()),
    ("train", "metrics_train.json", ()),
    # One temperature per exit fitted on a stratified half of the test split,
    # scored on the other half.
    ("test", "temperatures_test.json", ("--fit_temperature",)),
)
LOG_FILE = "train.log"


def planned_runs(seed: int, spread_rows: list[str], spread_seeds: list[int],
                 rows: list[str] | None = None) -> list[tuple[str, str, int]]:
    """``(run name, methods, seed)`` for every run of the study.

    ``rows`` (default `PAPER_ROWS`) train with ``seed``, the ``spread_rows``
    among them also with each of the ``spread_seeds``. The spread rows come
    first, so a study cut short still holds the comparison that matters
    most; the further seeds come last.

    Raises:
        ValueError: an unknown row label, or a further seed equal to ``seed``.
    """
    rows = list(rows or PAPER_ROWS)
    _check_rows("--only", rows)
    _check_rows("--spread_rows", spread_rows)
    if seed in spread_seeds or len(set(spread_seeds)) != len(spread_seeds):
        raise ValueError(f"--spread_seeds {spread_seeds} repeat a seed "
                         f"(--seed is {seed})")
    chosen = [row for row in ROWS if row[0] in rows]
    first = [row for row in chosen if row[0] in spread_rows]
    ordered = first + [row for row in chosen if row[0] not in spread_rows]
    runs = [(f"{label}_seed{seed}", methods, seed) for label, methods in ordered]
    for further in spread_seeds:
        runs += [(f"{label}_seed{further}", methods, further)
                 for label, methods in first]
    return runs


def _check_rows(flag: str, rows: list[str]) -> None:
    unknown = sorted(set(rows) - {label for label, _ in ROWS})
    if unknown:
        raise ValueError(f"{flag}: unknown rows {unknown}; allowed: "
                         f"{', '.join(label for label, _ in ROWS)}")


def _seeds(values: list[str]) -> list[int]:
    seeds = []
    for value in values:
        try:
            seed = int(value)
        except ValueError:
            raise ValueError(f"--spread_seeds: {value!r} is not an integer") from None
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"--spread_seeds: {seed} is outside 0..{MAX_SEED}")
        seeds.append(seed)
    return seeds


def _checked_plan() -> list[tuple[str, str, int]]:
    """The runs to do, after the flags are checked; one-line exit 2 otherwise."""
    try:
        plan = planned_runs(_SEED.value, _SPREAD_ROWS.value, _seeds(_SPREAD_SEEDS.value),
                            _ONLY.value)
        program.check_flagfiles([f"--flagfile={_FLAGFILE.value}"])
        if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
            raise ValueError(f"--out: {_OUT.value} is not a directory")
        files.check_creatable(os.path.join(_OUT.value, "run"))
    except program.FlagfileError as error:
        program.fail(PROGRAM, f"--run_flagfile: {error}")
    except ValueError as error:
        program.fail(PROGRAM, error)
    return plan


def _run_dir(name: str) -> str:
    return os.path.join(_OUT.value, name)


def _scored(name: str, split: str, file: str) -> bool:
    """Whether the run holds a readable record of ``split`` (a temperature
    record: fitted on ``split``)."""
    try:
        with open(os.path.join(_run_dir(name), file)) as f:
            record = json.load(f)
        return (record.get("split") or record.get("fitted_on", {}).get("split")) == split
    except (OSError, ValueError, AttributeError):
        return False


def _done(name: str) -> bool:
    return all(_scored(name, split, file) for split, file, _ in EVALUATIONS)


def _command(script: str) -> str:
    """The installed console script, which also ends Ctrl-C during start-up
    with one line (`selfkd_tf.cli.launch`)."""
    return os.path.join(os.path.dirname(sys.executable), script)


def _eval_commands(name: str) -> list[list[str]]:
    return [
        [_command("selfkd-eval"),
         f"--model={_run_dir(name)}", f"--split={split}",
         f"--out={os.path.join(_run_dir(name), file)}", *extra]
        for split, file, extra in EVALUATIONS if not _scored(name, split, file)
    ]


def _train_command(name: str, methods: str, seed: int) -> list[str]:
    command = [
        _command("selfkd-train"),
        f"--flagfile={_FLAGFILE.value}", f"--methods={methods}",
        f"--seed={seed}", f"--model_dir={_run_dir(name)}",
    ]
    if _DATASET.value:
        command.append(f"--dataset={_DATASET.value}")
    return command


class _Children:
    """The running child processes, so that an interrupt can stop them all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def call(self, command: list[str], log, env: dict) -> int | None:
        """Runs ``command`` to its end: its exit status; None once stopping."""
        with self._lock:
            if self.stopping.is_set():
                return None
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
            self._running.add(child)
        try:
            return child.wait()
        finally:
            with self._lock:
                self._running.discard(child)

    def stop(self, grace_s: float) -> None:
        """Starts nothing more; interrupts the running children and waits.

        The children are sent SIGTERM, which the commands take as Ctrl-C
        (even when this process was started with SIGINT ignored, as
        background jobs of a script are).

        Args:
            grace_s: how long the children may take to end on their own
                first (a terminal's Ctrl-C reaches them too; a second signal
                would cut their own clean stop short).
        """
        with self._lock:
            self.stopping.set()
            running = list(self._running)
        for child in running:
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGTERM)
        for child in running:
            try:
                child.wait(timeout=300)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


_CHILDREN = _Children()
# Exit statuses of a command stopped by Ctrl-C or SIGTERM: its own, or the
# signal's when it came before the command could handle it.
_STOPPED = (program.INTERRUPTED, program.TERMINATED, -signal.SIGINT, -signal.SIGTERM)


def _last_line(path: str, offset: int) -> str:
    """The last line ``path`` holds after byte ``offset``."""
    with open(path, "rb") as log:
        log.seek(max(offset, os.path.getsize(path) - 4000))
        text = log.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _train(name: str, methods: str, seed: int, threads: int) -> int | None:
    """Trains (or resumes, or checks) one run, then scores it where it is not.

    Returns:
        The exit status of the first command that failed, 0 when all
        succeeded, None when the study was stopping before the run began. A
        run directory this call created for a run that refused its input is
        removed again.
    """
    if _CHILDREN.stopping.is_set():
        return None
    run_dir = _run_dir(name)
    created = not os.path.exists(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, LOG_FILE)
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads),
               TF_NUM_INTEROP_THREADS=str(threads))
    output = 0  # where the output of the last command begins in the log
    with open(log_path, "a") as log:
        def call(command: list[str]) -> int:
            nonlocal output
            log.write(" ".join(command) + "\n")
            log.flush()
            output = log.tell()
            status = _CHILDREN.call(command, log, env)
            if status is None:
                log.write("(not started: the study is stopping)\n")
                return program.INTERRUPTED
            return status

        status = call(_train_command(name, methods, seed))
        # Built after training: the evaluations score what is still missing.
        for command in [] if status else _eval_commands(name):
            if status := call(command):
                break
    reason = _last_line(log_path, output)
    if status == program.USAGE_ERROR:
        _CHILDREN.stopping.set()  # the other runs share the recipe and data
        if created and os.listdir(run_dir) == [LOG_FILE]:
            shutil.rmtree(run_dir)
    if status == 0:
        outcome = "finished"
    elif status in _STOPPED:
        outcome = f"stopped: {reason}"
    else:
        code = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        outcome = f"FAILED ({code}): {reason}"
    sys.stdout.write(f"{name}: {outcome}\n")
    sys.stdout.flush()
    return status


def main(argv):
    del argv
    plan = _checked_plan()
    if _DRY_RUN.value:
        for name, methods, seed in plan:
            print(f"{name}: done, checked only" if _done(name) else
                  f"{name}: " + " ".join(_train_command(name, methods, seed)))
        return
    threads = max(1, (os.cpu_count() or 1) // _PARALLEL.value)
    pool = concurrent.futures.ThreadPoolExecutor(_PARALLEL.value)
    try:
        futures = [pool.submit(_train, *run, threads) for run in plan]
        # A signal may reach a worker thread, whose handler then runs only
        # when the main thread next wakes: wake it twice a second.
        while concurrent.futures.wait(futures, timeout=0.5).not_done:
            pass
        statuses = [future.result() for future in futures]
    except KeyboardInterrupt:
        # program.run raises it for SIGTERM too. SIGTERM came to this process
        # only, so its children are still running; Ctrl-C reached them too.
        terminated = program.interrupt_status() == program.TERMINATED
        _CHILDREN.stop(grace_s=0 if terminated else 5)
        pool.shutdown(cancel_futures=True)
        program.fail(PROGRAM, "interrupted; rerun the same command to resume (each "
                     "run from its last checkpoint)", status=program.INTERRUPTED)
    pool.shutdown()
    failed = [run[0] for run, status in zip(plan, statuses) if status]
    if failed:
        refused = program.USAGE_ERROR in statuses
        not_started = [run[0] for run, status in zip(plan, statuses) if status is None]
        program.fail(PROGRAM, f"runs failed: {', '.join(failed)}" + (
            f"; not started: {', '.join(not_started)}" if not_started else ""),
            status=program.USAGE_ERROR if refused else 1)
    report = subprocess.run(
        [sys.executable, "-m", "selfkd_tf.cli.report", f"--runs={_OUT.value}",
         f"--metrics_file={EVALUATIONS[0][1]}",
         f"--train_metrics_file={EVALUATIONS[1][1]}",
         f"--temperature_file={EVALUATIONS[2][1]}",
         f"--out={os.path.join(_OUT.value, 'report')}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    if report.returncode:
        lines = report.stderr.strip().splitlines() or ["(no output)"]
        program.fail(PROGRAM, f"the report failed: {lines[-1]}", status=report.returncode)
    print(f"report: {os.path.join(_OUT.value, 'report')}")


if __name__ == "__main__":
    program.run(main, PROGRAM)
