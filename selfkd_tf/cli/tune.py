"""``selfkd-tune``: search the hyperparameters of a self-distilling classifier.

Usage:

    selfkd-tune --flagfile=configs/tune_cifar100_pskd.flags --tuner=random \
        --max_trials=20 --tuner_dir=tuning/cifar100_pskd
    selfkd-tune --flagfile=configs/smoke.flags --dataset=npz:/data/tiny.npz \
        --methods=pskd --search=pskd_alpha,lr --max_trials=4 --tuner_dir=/tmp/tune
    selfkd-train --flagfile=/tmp/tune/best.flags  # retrain the winner

Every ``selfkd-train`` flag sets the fixed parts of the trials (the searched
ones are overridden per trial); the flags below set the search. Trials are
scored on a held-out split of the training set (``--validation_fraction``,
default 0.1 here, stratified and fixed by ``--seed``); the test split is
never used for selection. ``--epochs`` is the length of a full run: the
learning-rate and ``a_t`` schedules span it in every trial, and with
``--tuner=hyperband`` it is the most epochs one trial trains
(see `selfkd_tf.tuning.search`).

Rerunning the same command resumes the search in ``--tuner_dir``: completed
trials are kept and an interrupted one runs again. ``--overwrite`` starts it
afresh. One search at a time runs in a directory: another process searching
it is refused (exit status 2). A range or choice reaching a value that
``selfkd-train`` refuses (``--lr_range=0.01,1e39``) is refused before any
trial.

At the end the command prints the best trials and writes, in
``--tuner_dir``, ``best_hyperparameters.json`` and ``best.flags``, a
flagfile for ``selfkd-train`` that retrains the winner on the whole training
set, the held-out part included (``--validation_fraction=0``; a
``--train_examples`` cap still applies), evaluates it on the test split, and
writes it into ``--model_dir`` (default ``<tuner_dir>/best_run``); its
comment says so with the numbers of examples. Trials are numbered from 1 in
Keras Tuner's log, the table and ``best.flags``; trial 1 lives in
``trials/trial_0`` (the table's last column).

Exit status: 0 on success; 2 for invalid flags or data (one error line,
nothing written); 1 when no trial completed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import textwrap

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages
from absl import flags

from selfkd_tf import files
from selfkd_tf.rundir import lock as run_lock
from selfkd_tf.tuning import search_space
from selfkd_tf.tuning import search
from selfkd_tf.cli import flags as train_flags
from selfkd_tf.cli import program
from selfkd_tf.experiment.settings import TrainSettings, as_settings_error
from selfkd_tf.errors import SettingsError

PROGRAM = "selfkd-tune"
FLAGFILE = "best.flags"

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(train_flags)  # --help lists them
_DEFAULTS = search_space.TuneSettings()


def _numbers(values) -> list[str]:
    return [repr(float(v)) for v in values]


flags.DEFINE_enum("tuner", _DEFAULTS.tuner, search_space.TUNERS,
                  "Search algorithm (bayesian needs scipy and scikit-learn).")
flags.DEFINE_integer(
    "max_trials", _DEFAULTS.max_trials,
    "Trials to run. With --tuner=hyperband the budget follows from --epochs, "
    "--hyperband_factor and --hyperband_iterations; this flag then caps it "
    "only when given.")
flags.DEFINE_integer("executions_per_trial", _DEFAULTS.executions_per_trial,
                     "Models trained per trial, from different initialisations; "
                     "the trial scores their mean.")
flags.DEFINE_string(
    "objective", None,
    "Validation metric to maximise: val_exit<i>_accuracy, val_ensemble_accuracy "
    "or val_loss (minimised); default: the deepest exit's accuracy.")
flags.DEFINE_string("tuner_dir", None,
                    "Search directory, resumed when it exists; default: "
                    "tuning/<dataset>_<arch>_<methods>.")
flags.DEFINE_list("search", list(search_space.DIMENSIONS),
                  "Dimensions searched; those of methods that are off are skipped, "
                  "the others keep their flag's value.")
flags.DEFINE_list("pskd_alpha_range", _numbers(_DEFAULTS.pskd_alpha_range),
                  "LOW,HIGH of --pskd_alpha (uniform).")
flags.DEFINE_list("byot_alpha_range", _numbers(_DEFAULTS.byot_alpha_range),
                  "LOW,HIGH of --byot_alpha (uniform).")
flags.DEFINE_list("byot_lambda_range", _numbers(_DEFAULTS.byot_lambda_range),
                  "LOW,HIGH of --byot_lambda (log-uniform).")
flags.DEFINE_list("temperature_choices", _numbers(_DEFAULTS.temperature_choices),
                  "Values of --temperature tried.")
flags.DEFINE_list("lr_range", _numbers(_DEFAULTS.lr_range),
                  "LOW,HIGH of --lr (log-uniform).")
flags.DEFINE_list("weight_decay_range", _numbers(_DEFAULTS.weight_decay_range),
                  "LOW,HIGH of --weight_decay (log-uniform).")
flags.DEFINE_integer("hyperband_factor", _DEFAULTS.hyperband_factor,
                     "Hyperband: keep 1/factor of the trials at every round.")
flags.DEFINE_integer("hyperband_iterations", _DEFAULTS.hyperband_iterations,
                     "Hyperband: sweeps over all its brackets.")
flags.DEFINE_integer("num_best", 5, "Best trials printed at the end.")


def tune_settings_from_flags() -> search_space.TuneSettings:
    """The `TuneSettings` the parsed flags describe (not yet validated).

    Raises:
        SettingsError: a range or choice list holds something other than
            numbers.
    """
    values = {}
    for name in ("pskd_alpha_range", "byot_alpha_range", "byot_lambda_range",
                 "temperature_choices", "lr_range", "weight_decay_range"):
        try:
            values[name] = tuple(float(v) for v in FLAGS[name].value)
        except ValueError:
            raise SettingsError(
                name, f"got {','.join(FLAGS[name].value)!r}; allowed: numbers, "
                "e.g. 0.1,0.9") from None
    hyperband = FLAGS.tuner == "hyperband"
    return search_space.TuneSettings(
        tuner=FLAGS.tuner,
        # Hyperband's own budget applies unless a cap is asked for.
        max_trials=None if hyperband and not FLAGS["max_trials"].present else FLAGS.max_trials,
        executions_per_trial=FLAGS.executions_per_trial,
        objective=FLAGS.objective,
        tuner_dir=FLAGS.tuner_dir,
        search=tuple(FLAGS.search),
        hyperband_factor=FLAGS.hyperband_factor,
        hyperband_iterations=FLAGS.hyperband_iterations,
        **values,
    )


def check_search_values(settings: TrainSettings, tune_settings: search_space.TuneSettings) -> None:
    """Refuses a searched range or choice that reaches a value ``selfkd-train``
    refuses (``--lr_range=0.01,1e39``: trials that train to NaN).

    A setting's allowed values form an interval, so a range's two ends stand
    for every value sampled between them. ``settings`` and ``tune_settings``
    must be valid already.

    Raises:
        SettingsError: naming the range or choice flag and the value.
    """
    for name in tune_settings.searched(settings):
        flag = "temperature_choices" if name == "temperature" else f"{name}_range"
        for value in getattr(tune_settings, flag):
            try:
                dataclasses.replace(settings, **{name: value}).validate()
            except SettingsError as err:
                raise SettingsError(
                    flag, f"includes --{name}={value:g}, which selfkd-train "
                    f"refuses ({err.problem})") from None


def flagfile_text(settings: TrainSettings, comment: str = "") -> str:
    """A ``selfkd-train`` flagfile setting every field of ``settings``.

    Each value is written by its flag's own serializer, so the file reads
    back to ``settings``; ``None`` fields are left to their default (None).

    Example:

    >>> print(flagfile_text(TrainSettings(methods=("pskd",))))  # doctest: +SKIP
    --dataset=cifar100
    ...
    --methods=pskd
    """
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    for name, value in settings.to_json().items():
        flag = copy.deepcopy(FLAGS[name])  # leaves the parsed flags untouched
        flag.value = value
        if serialized := flag.serialize():
            lines.append(serialized)
    return "\n".join(lines) + "\n"


def _trials_table(result: search.SearchResult, count: int) -> str:
    names = list(result.trials[0].hyperparameters)
    header = ["rank", "trial", result.objective, "epoch", *names, "directory"]
    rows = [
        [str(rank), str(trial.number), f"{trial.score:.4f}",
         f"{trial.best_epoch}/{trial.epochs}",
         *(f"{trial.hyperparameters[n]:.4g}" for n in names), trial.directory]
        for rank, trial in enumerate(result.trials[:count], start=1)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths))
        for row in [header, *rows]
    )


def main(argv: list[str]) -> int:
    del argv  # program.run rejects positional arguments
    with contextlib.ExitStack() as held:
        if FLAGS.num_best < 1:
            raise SettingsError(
                "num_best", f"got {FLAGS.num_best}; allowed: integers >= 1")
        settings = train_flags.settings_from_flags()
        tune_settings = tune_settings_from_flags()
        settings.validate()
        tune_settings.validate(settings)
        check_search_values(settings, tune_settings)
        # One search per directory at a time, as one run per run directory.
        with as_settings_error():
            held.enter_context(run_lock.locked(
                tune_settings.resolved_dir(settings), activity="tuned"))
        result = search.tune(settings, tune_settings)
        return _report(result)


def _report(result: search.SearchResult) -> int:
    """Prints the best trials and writes ``best.flags``; the exit status."""
    if not result.trials:
        program.fail(PROGRAM, f"no trial completed; see {result.tuner_dir}/"
                     f"{search.PROJECT_NAME}/trial_*/trial.json", status=1)

    best = result.trials[0]
    direction = "higher" if result.direction == "max" else "lower"
    print(f"\nBest trials of {result.tuner_dir} ({result.objective}, {direction} is better):")
    print(_trials_table(result, FLAGS.num_best))
    flagfile = os.path.join(result.tuner_dir, FLAGFILE)
    note = textwrap.fill(result.retraining_note(), width=76)
    comment = (
        f"Written by {PROGRAM}: trial {best.number} of {result.tuner_dir}\n"
        f"({best.directory}), {result.objective} {best.score:.4f}.\n"
        f"{note}\n"
        f"  selfkd-train --flagfile={flagfile}"
    )
    files.write_atomically(flagfile, flagfile_text(result.retrain, comment))
    print(f"\nWrote {os.path.join(result.tuner_dir, search.BEST_HYPERPARAMETERS_FILE)}"
          f" and {flagfile}.\n{note}\nRetrain trial {best.number} with:\n"
          f"  selfkd-train --flagfile={flagfile}")
    return 0


def run() -> None:
    # Selection needs a split the test set does not provide. Set here, not
    # at import, so that importing this module leaves selfkd-train's
    # defaults alone.
    FLAGS.set_default("validation_fraction", search_space.DEFAULT_VALIDATION_FRACTION)
    program.run(main, PROGRAM)


if __name__ == "__main__":
    run()
