"""Runs the paper's Table 1/2 protocol: all 8 method combinations, one recipe.

Every row trains with the same flagfile, seed and number of epochs, each in
its own run directory under ``--out``; finished runs are skipped and
interrupted ones resume, so the script can simply be started again. At the
end the report tool writes the tables and figures.

Example (the CPU study of docs/results.md):

    python tools/study.py --run_flagfile=configs/study_cifar10.flags \
        --out=runs/study --extra_seeds=1
"""

from __future__ import annotations

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
_EXTRA_SEEDS = flags.DEFINE_integer(
    "extra_seeds", 1,
    "Further seeds (seed+1, ...) for the baseline and the full method, to show "
    "the run-to-run spread.")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (labels below).")

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
SPREAD_ROWS = ("baseline", "pskd_byot_dmfl")


def planned_runs(seed: int, extra_seeds: int) -> list[tuple[str, str, int]]:
    """``(run name, methods, seed)`` for every run of the study."""
    runs = [(f"{label}_seed{seed}", methods, seed) for label, methods in ROWS]
    for offset in range(1, extra_seeds + 1):
        runs += [
            (f"{label}_seed{seed + offset}", methods, seed + offset)
            for label, methods in ROWS
            if label in SPREAD_ROWS
        ]
    return runs


def main(argv):
    del argv
    for name, methods, seed in planned_runs(_SEED.value, _EXTRA_SEEDS.value):
        if _ONLY.value and name.rsplit("_seed", 1)[0] not in _ONLY.value:
            continue
        run_dir = os.path.join(_OUT.value, name)
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            print(f"{name}: done, skipped")
            continue
        command = [
            sys.executable, "-m", "selfkd_tf.cli.train",
            f"--flagfile={_FLAGFILE.value}", f"--methods={methods}",
            f"--seed={seed}", f"--model_dir={run_dir}",
        ]
        if _DATASET.value:
            command.append(f"--dataset={_DATASET.value}")
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    subprocess.run(
        [sys.executable, "-m", "selfkd_tf.cli.report", f"--runs={_OUT.value}",
         f"--out={os.path.join(_OUT.value, 'report')}"],
        check=True,
    )


if __name__ == "__main__":
    app.run(main)
