"""Runs the paper's Table 1/2 protocol: all 8 method combinations, one recipe.

Every row trains with the same flagfile and number of epochs, each in its
own run directory under ``--out``: all 8 rows with ``--seed``, and the
``--spread_rows`` again with each of the ``--spread_seeds``. Finished runs
are skipped and interrupted ones resume, so the script can simply be
started again.

After training, each run is scored with ``selfkd-eval`` on the whole test
split (``metrics_test.json``) and on its own training examples, unaugmented
(``metrics_train.json``), whatever subset it evaluated on while training.
At the end the report tool writes the tables and figures from the test
scores into ``--out/report``.

Examples (the two CPU studies of docs/results.md):

    python tools/study.py --run_flagfile=configs/study_cifar10.flags \
        --dataset=folder:/data/cifar10-jpeg --out=runs/study --parallel=2
    python tools/study.py --run_flagfile=configs/study_cifar10_small.flags \
        --dataset=folder:/data/cifar10-jpeg --out=runs/small --parallel=2 \
        --spread_rows=baseline,pskd,byot,pskd_byot_dmfl --spread_seeds=1,2

With ``--parallel=N`` the script trains N runs at once and gives each
process an equal share of the CPU cores (``TF_NUM_INTRAOP_THREADS``): small
networks use one core poorly, so on a CPU two single-threaded runs finish
sooner than two runs one after the other. Each run's output goes to
``train.log`` in its directory. ``--dry_run`` lists the runs still to train
with their commands.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

from absl import app
from absl import flags

_FLAGFILE = flags.DEFINE_string("run_flagfile", "configs/study_cifar10.flags",
                                "selfkd-train flagfile with the shared recipe.")
_OUT = flags.DEFINE_string("out", "runs/study", "Parent directory of the runs.")
_DATASET = flags.DEFINE_string("dataset", None, "Overrides the flagfile's --dataset.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every row.")
_SPREAD_ROWS = flags.DEFINE_list(
    "spread_rows", ["baseline", "pskd_byot_dmfl"],
    "Rows trained again with each of --spread_seeds, to measure the "
    "run-to-run spread; they train first.")
_SPREAD_SEEDS = flags.DEFINE_list(
    "spread_seeds", ["1"], "Further seeds of the --spread_rows.")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (labels below).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the runs still to train, with their commands, "
    "and stop.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Runs trained at once, sharing the CPU cores equally.",
    lower_bound=1)

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
)
EVALUATIONS = (("test", "metrics_test.json"), ("train", "metrics_train.json"))


def planned_runs(seed: int, spread_rows: list[str],
                 spread_seeds: list[int]) -> list[tuple[str, str, int]]:
    """``(run name, methods, seed)`` for every run of the study.

    The spread rows come first, so a study cut short still holds the
    comparison that matters most; the further seeds come last.

    Raises:
        ValueError: an unknown row label, or a further seed equal to ``seed``.
    """
    unknown = sorted(set(spread_rows) - {label for label, _ in ROWS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; allowed: "
                         f"{', '.join(label for label, _ in ROWS)}")
    if seed in spread_seeds or len(set(spread_seeds)) != len(spread_seeds):
        raise ValueError(f"--spread_seeds {spread_seeds} repeat a seed "
                         f"(--seed is {seed})")
    first = [row for row in ROWS if row[0] in spread_rows]
    ordered = first + [row for row in ROWS if row[0] not in spread_rows]
    runs = [(f"{label}_seed{seed}", methods, seed) for label, methods in ordered]
    for further in spread_seeds:
        runs += [(f"{label}_seed{further}", methods, further)
                 for label, methods in first]
    return runs


def _run_dir(name: str) -> str:
    return os.path.join(_OUT.value, name)


def _finished(name: str) -> bool:
    return all(os.path.exists(os.path.join(_run_dir(name), file))
               for _, file in EVALUATIONS)


def _eval_commands(name: str) -> list[list[str]]:
    return [
        [sys.executable, "-m", "selfkd_tf.cli.evaluate",
         f"--model={_run_dir(name)}", f"--split={split}",
         f"--out={os.path.join(_run_dir(name), file)}"]
        for split, file in EVALUATIONS
    ]


def _train_command(name: str, methods: str, seed: int) -> list[str]:
    command = [
        sys.executable, "-m", "selfkd_tf.cli.train",
        f"--flagfile={_FLAGFILE.value}", f"--methods={methods}",
        f"--seed={seed}", f"--model_dir={_run_dir(name)}",
    ]
    if _DATASET.value:
        command.append(f"--dataset={_DATASET.value}")
    return command


def _train(name: str, methods: str, seed: int, threads: int) -> None:
    """Trains (or resumes) one run, then scores it on the test and training splits."""
    run_dir = _run_dir(name)
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads),
               TF_NUM_INTEROP_THREADS=str(threads))
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        for command in [_train_command(name, methods, seed), *_eval_commands(name)]:
            # One write per line: runs in parallel threads must not interleave.
            sys.stdout.write(" ".join(command) + "\n")
            sys.stdout.flush()
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, check=False)
            if result.returncode:
                break
    status = "finished" if result.returncode == 0 else f"FAILED ({result.returncode})"
    sys.stdout.write(f"{name}: {status}, log in {run_dir}/train.log\n")
    sys.stdout.flush()
    if result.returncode:
        raise RuntimeError(f"{name} failed")


def main(argv):
    del argv
    try:
        plan = planned_runs(_SEED.value, _SPREAD_ROWS.value,
                            [int(seed) for seed in _SPREAD_SEEDS.value])
    except ValueError as error:
        sys.exit(f"study: {error}")
    pending = []
    for name, methods, seed in plan:
        if _ONLY.value and name.rsplit("_seed", 1)[0] not in _ONLY.value:
            continue
        if _finished(name):
            print(f"{name}: done, skipped")
            continue
        pending.append((name, methods, seed))
    if _DRY_RUN.value:
        for name, methods, seed in pending:
            print(f"{name}: " + " ".join(_train_command(name, methods, seed)))
        return
    threads = max(1, (os.cpu_count() or 1) // _PARALLEL.value)
    with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
        futures = [pool.submit(_train, *run, threads) for run in pending]
    failed = [run[0] for run, future in zip(pending, futures) if future.exception()]
    if failed:
        sys.exit(f"study: runs failed: {', '.join(failed)}")
    subprocess.run(
        [sys.executable, "-m", "selfkd_tf.cli.report", f"--runs={_OUT.value}",
         f"--metrics_file={EVALUATIONS[0][1]}",
         f"--train_metrics_file={EVALUATIONS[1][1]}",
         f"--out={os.path.join(_OUT.value, 'report')}"],
        check=True,
    )


if __name__ == "__main__":
    app.run(main)
