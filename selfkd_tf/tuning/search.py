"""Hyperparameter search for self-distillation, with Keras Tuner.

Comparisons between methods are only fair once each has close-to-optimal
hyperparameters; PS-KD's authors chose ``a_T`` by random search. This module
makes that search a first-class step:

- `SelfKDHyperModel` is a `keras_tuner.HyperModel`: it builds and compiles
  the `SelfKDModel` of a trial with `selfkd_tf.experiment.builders.build_model` and
  `compile_model`, and its `fit` trains it with the PS-KD table refresh;
- `selfkd_tf.tuning.search_space.TuneSettings` holds the search's own knobs (the
  tuner, its budget, the objective and the range of every dimension of the
  search space);
- `tune` validates everything, runs (or resumes) the search in a directory
  and writes the winner's hyperparameters.

Selection data. Trials are scored on a validation split carved from the
training set (``TrainSettings.validation_fraction``, stratified and fixed by
``seed``), never on the test split. Every trial sees the same split, the
same batch order and the same augmentation; the network's initialisation
differs between trials and between the executions of a trial.

Schedules. The learning-rate schedule and PS-KD's ``a_t = a_T (t + 1) / T``
always span ``TrainSettings.epochs``, the full length of a run, whatever the
number of epochs a trial trains: a trial is the first epochs of a full run.
With random and Bayesian search every trial trains all ``epochs``. Hyperband
(whose ``max_epochs`` is ``epochs``) trains most trials for fewer epochs, so
their scores are those of a full run stopped early, and the trials it
continues resume from their predecessor's checkpoint (weights, PS-KD tables
and optimizer state) at the epoch the predecessor reached: the optimizer's
step counter, which drives the learning-rate schedule, is set to that epoch's
first step, and ``a_t`` follows the epoch number.

Directory (``tuner_dir``):

- ``search.json``: the settings of the search; rerunning `tune` on the
  directory resumes the search (completed trials are kept, an interrupted
  trial is run again) provided the settings match;
- ``trials/``: Keras Tuner's state, one ``trial_<id>/`` per trial with the
  weights of its best epoch;
- ``best_hyperparameters.json``: the winner, written at the end.

Trials are numbered from 1, as Keras Tuner's log numbers them ("Search:
Running Trial #8"); Keras Tuner's ids, and so the directory names, count
from 0: trial 8 is ``trials/trial_07`` (`TrialSummary.number`).

Example:

```python
settings = TrainSettings(dataset="cifar100", methods=("pskd",), epochs=200,
                         validation_fraction=0.1)
result = tune(settings, TuneSettings(max_trials=20, search=("pskd_alpha", "lr")))
best = result.trials[0]
best.hyperparameters  # {'pskd_alpha': 0.71..., 'lr': 0.083...}
experiment.train(result.retrain)  # the winner, on the whole training set
```
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import keras
import keras_tuner
import tensorflow as tf

from selfkd_tf.distillation import pskd
from selfkd_tf.experiment import callbacks as callbacks_lib
from selfkd_tf import data as data_lib
from selfkd_tf.distribution import strategy as distribute
from selfkd_tf import files
from selfkd_tf.distillation.model import SelfKDModel
from selfkd_tf.models.multi_exit import check_multi_exit
from selfkd_tf.experiment.builders import build_datasets, build_model, compile_model, seed_everything
from selfkd_tf.rundir.layout import RESUME_SAFE_FIELDS
from selfkd_tf.tuning.search_space import LOG_SAMPLED, TuneSettings
from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.errors import SettingsError

SEARCH_FILE = "search.json"
PROJECT_NAME = "trials"
BEST_HYPERPARAMETERS_FILE = "best_hyperparameters.json"
RETRAIN_DIR = "best_run"

_RESUME_SAFE_FIELDS = RESUME_SAFE_FIELDS | {"max_trials", "tuner_dir"}
"""Settings a resumed search may change: the budget and where things are."""


class SelfKDHyperModel(keras_tuner.HyperModel):
    """The `SelfKDModel`s of a search space, trained on a validation split.

    Args:
        settings: the fixed parts of every trial (data, architecture,
            methods, schedule, ...); each trial overrides the searched
            fields. ``validation_fraction`` must be positive: the carved-out
            split scores the trials.
        tune_settings: the search space.

    `build` returns a compiled model whose learning-rate schedule spans
    ``settings.epochs``; `fit` builds the trial's datasets itself, so the
    tuner's ``search`` takes no data, and wires a fresh
    `selfkd_tf.distillation.pskd.SoftTargetRefresh` whose ``a_t`` schedule spans
    ``settings.epochs`` too. Each trial's model, and with it the PS-KD
    table, is built afresh, so no state carries over from one trial to the
    next (Hyperband's continued trials deliberately start from their
    predecessor's checkpoint).

    Example:

    ```python
    hypermodel = SelfKDHyperModel(settings, TuneSettings(search=("pskd_alpha",)))
    tuner = keras_tuner.RandomSearch(hypermodel, "val_exit4_accuracy", max_trials=10)
    tuner.search()
    ```
    """

    def __init__(self, settings: TrainSettings, tune_settings: TuneSettings):
        super().__init__(name="selfkd")
        self.settings = settings
        self.tune_settings = tune_settings
        self.dimensions = tune_settings.searched(settings)
        self._info = None
        self._datasets_key = None
        self._datasets = None
        self._num_exits = None

    @property
    def num_exits(self) -> int:
        """The networks' exits (a first build counts those of a backbone of one's own)."""
        if self._num_exits is None:
            self._num_exits = check_multi_exit(build_model(self.settings, self.info).backbone)[0]
            keras.backend.clear_session()
        return self._num_exits

    @property
    def info(self) -> data_lib.DatasetInfo:
        """The training data's description (reads the data on first use)."""
        if self._info is None:
            self.datasets(self.settings.epochs)
        return self._info

    def datasets(
        self, epochs: int, initial_epoch: int = 0
    ) -> tuple[tf.data.Dataset, tf.data.Dataset, data_lib.DatasetInfo]:
        """Training epochs ``initial_epoch .. epochs - 1`` and the validation split.

        The last pair built is kept: random and Bayesian trials all train the
        same epochs, so the data are read once.

        Raises:
            SettingsError: the data cannot be read.
        """
        key = (epochs, initial_epoch)
        if key != self._datasets_key:
            self._datasets = None  # frees the previous copy before reading
            self._datasets = build_datasets(
                dataclasses.replace(self.settings, epochs=epochs), initial_epoch)
            self._datasets_key = key
            self._info = self._datasets[2]
        return self._datasets

    def declare_hyperparameters(self, hp: keras_tuner.HyperParameters) -> None:
        self.sample(hp)

    def sample(self, hp: keras_tuner.HyperParameters) -> dict[str, float]:
        """Declares the searched dimensions in ``hp``; returns their values."""
        space = self.tune_settings
        values = {}
        for name in self.dimensions:
            if name == "temperature":
                values[name] = hp.Choice(name, [float(t) for t in space.temperature_choices])
            else:
                low, high = getattr(space, f"{name}_range")
                values[name] = hp.Float(
                    name, low, high, sampling="log" if name in LOG_SAMPLED else "linear")
        return values

    def trial_settings(self, hp: keras_tuner.HyperParameters) -> TrainSettings:
        """The `TrainSettings` of the trial ``hp`` describes."""
        return dataclasses.replace(self.settings, **self.sample(hp))

    def build(self, hp: keras_tuner.HyperParameters) -> SelfKDModel:
        """A compiled `SelfKDModel` with the values ``hp`` holds."""
        settings = self.trial_settings(hp)
        model = build_model(settings, self.info)
        compile_model(model, settings, self.info.steps_per_epoch)
        # Hyperband continues a trial by loading its predecessor's checkpoint
        # into a fresh model, which Keras only does into a built model; with
        # the optimizer built too, momentum and the step counter come back.
        model.build((None, *self.info.image_shape))
        model.optimizer.build(model.trainable_variables)
        return model

    def fit(
        self,
        hp: keras_tuner.HyperParameters,
        model: SelfKDModel,
        *,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        epochs: int | None = None,
        initial_epoch: int = 0,
        verbose: int | str = "auto",
    ) -> keras.callbacks.History:
        """Trains epochs ``initial_epoch .. epochs - 1`` of the trial.

        Args:
            hp: the trial's hyperparameters.
            model: the model `build` returned.
            callbacks: the tuner's callbacks (and the user's).
            epochs: the epoch to stop at; default ``settings.epochs``
                (Hyperband passes fewer).
            initial_epoch: the first epoch; Hyperband passes the epoch a
                continued trial's predecessor reached.
            verbose: prints one summary line per epoch when truthy.
        """
        del hp  # already applied by `build`
        epochs = epochs or self.settings.epochs
        train, validation, info = self.datasets(epochs, initial_epoch)
        if initial_epoch:
            # The predecessor's checkpoint is its best epoch, not necessarily
            # its last: align the schedule with the epoch training resumes at.
            model.optimizer.iterations.assign(initial_epoch * info.steps_per_epoch)
        refresh = pskd.SoftTargetRefresh(epochs=self.settings.epochs)
        summary = [callbacks_lib.EpochSummary()] if verbose else []
        return model.fit(
            train, validation_data=validation, epochs=epochs,
            initial_epoch=initial_epoch, steps_per_epoch=info.steps_per_epoch,
            callbacks=[refresh, keras.callbacks.TerminateOnNaN(), *summary, *callbacks],
            shuffle=False,  # the training dataset orders each epoch itself
            verbose=0,
        )


def make_tuner(
    hypermodel: SelfKDHyperModel,
    directory: str,
    strategy: tf.distribute.Strategy | None = None,
    overwrite: bool = False,
) -> keras_tuner.Tuner:
    """The Keras Tuner tuner ``hypermodel.tune_settings`` describes.

    Its project lives in ``directory/trials``; an existing project is
    resumed unless ``overwrite``. The oracle is seeded with the run's seed.
    """
    settings, options = hypermodel.settings, hypermodel.tune_settings
    common = dict(
        hypermodel=hypermodel,
        objective=keras_tuner.Objective(
            options.objective_name(hypermodel.num_exits), options.objective_direction()),
        seed=settings.seed,
        executions_per_trial=options.executions_per_trial,
        distribution_strategy=strategy,
        directory=directory,
        project_name=PROJECT_NAME,
        overwrite=overwrite,
    )
    if options.tuner == "random":
        return keras_tuner.RandomSearch(max_trials=options.max_trials, **common)
    if options.tuner == "bayesian":
        return keras_tuner.BayesianOptimization(max_trials=options.max_trials, **common)
    tuner = keras_tuner.Hyperband(
        max_epochs=settings.epochs, factor=options.hyperband_factor,
        hyperband_iterations=options.hyperband_iterations, **common)
    # The Hyperband oracle takes no max_trials argument, but the base oracle
    # stops creating trials once it holds that many.
    tuner.oracle.max_trials = options.max_trials
    return tuner


@dataclasses.dataclass(frozen=True)
class TrialSummary:
    """A completed trial.

    Attributes:
        trial_id: Keras Tuner's id, numbered from 0 (the ``trials/trial_<id>``
            directory); `number` is the 1-based number its log shows.
        score: the objective's best value over the trial's epochs.
        best_epoch: the 1-based epoch of that value.
        epochs: the epochs the trial trained up to.
        hyperparameters: the searched dimensions' values.
    """

    trial_id: str
    score: float
    best_epoch: int
    epochs: int
    hyperparameters: dict[str, float]

    @property
    def number(self) -> int:
        """The trial's 1-based number, as Keras Tuner's log gives it
        ("Search: Running Trial #3", "Trial 3 Complete"): trial ``"02"``
        is trial 3."""
        return int(self.trial_id) + 1

    @property
    def directory(self) -> str:
        """The trial's directory, relative to the search directory."""
        return os.path.join(PROJECT_NAME, f"trial_{self.trial_id}")


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `tune` found.

    Attributes:
        tuner_dir: the search directory.
        objective: the objective's name.
        direction: ``"max"`` or ``"min"``.
        trials: the completed trials, best first.
        retrain: settings that retrain the best trial on the whole training
            set and evaluate it on the test split; ``None`` without trials.
        train_examples: the training examples every trial trained on.
        validation_examples: the held-out examples that scored the trials.
        validation_fraction: the share of the training set held out.
    """

    tuner_dir: str
    objective: str
    direction: str
    trials: tuple[TrialSummary, ...]
    retrain: TrainSettings | None
    train_examples: int
    validation_examples: int
    validation_fraction: float

    def retraining_note(self) -> str:
        """What the trials trained and were scored on, and what `retrain` uses.

        Example:

            Trials trained on 45000 examples of the training set and were
            scored on 5000 held-out ones (--validation_fraction=0.1). This
            run retrains trial 8 on the whole training set, the held-out
            part included (--validation_fraction=0), and evaluates it on
            the test split.
        """
        retrain = self.retrain
        train = ("the whole training set, the held-out part included "
                 "(--validation_fraction=0)")
        if retrain.train_examples is not None:
            train = (f"at most {retrain.train_examples} examples "
                     f"(--train_examples) drawn from {train}")
        test = "the test split"
        if retrain.eval_examples is not None:
            test += f" (at most {retrain.eval_examples} examples, --eval_examples)"
        return (
            f"Trials trained on {self.train_examples} examples of the training "
            f"set and were scored on {self.validation_examples} held-out ones "
            f"(--validation_fraction={self.validation_fraction:g}). This run "
            f"retrains trial {self.trials[0].number} on {train}, and evaluates "
            f"it on {test}.")


def retrain_settings(
    settings: TrainSettings, best: TrialSummary, tuner_dir: str
) -> TrainSettings:
    """``settings`` with ``best``'s values, for a run on the whole training set.

    No validation split is held out (so the run evaluates on the test
    split); the run directory is ``settings.model_dir`` or
    ``tuner_dir/best_run``.
    """
    return dataclasses.replace(
        settings, **best.hyperparameters, validation_fraction=0.0, overwrite=False,
        model_dir=settings.model_dir or os.path.join(tuner_dir, RETRAIN_DIR),
    )


def tune(
    settings: TrainSettings,
    tune_settings: TuneSettings,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 1,
) -> SearchResult:
    """Runs, or resumes, the search in ``tune_settings.tuner_dir``.

    Nothing is written before the settings, the data and the model have been
    checked. A directory holding a search with other settings is refused
    (``settings.overwrite`` starts it afresh); the budget (``max_trials``)
    may change. At the end the best trial is written to
    ``best_hyperparameters.json``.

    Args:
        settings: the fixed parts of every trial.
        tune_settings: the search.
        callbacks: extra Keras callbacks for every trial's `fit`; they are
            deep-copied for each execution.
        verbose: 0 for silence; otherwise Keras Tuner's trial reports and
            one line per epoch.

    Returns:
        A `SearchResult`.

    Raises:
        SettingsError: invalid settings or unreadable data, or a directory
            holding another search.
    """
    settings.validate()
    tune_settings.validate(settings)
    seed_everything(settings)
    strategy = distribute.make_strategy(settings.distribute)
    hypermodel = SelfKDHyperModel(settings, tune_settings)
    # A first build proves the data and the model before anything is written,
    # and counts the exits the objective names.
    tune_settings.check_objective(hypermodel.num_exits)

    tuner_dir = tune_settings.resolved_dir(settings)
    record = {**settings.to_json(), **tune_settings.to_json(), "tuner_dir": tuner_dir}
    search_path = os.path.join(tuner_dir, SEARCH_FILE)
    if not settings.overwrite:
        # The fixed values of the searched fields are never used.
        _check_resumable(tuner_dir, record, ignored=hypermodel.dimensions)
    best_path = os.path.join(tuner_dir, BEST_HYPERPARAMETERS_FILE)
    if settings.overwrite and os.path.exists(best_path):
        os.remove(best_path)
    os.makedirs(tuner_dir, exist_ok=True)
    files.write_atomically(search_path, json.dumps(record, indent=2) + "\n")

    tuner = make_tuner(hypermodel, tuner_dir, strategy, overwrite=settings.overwrite)
    if verbose:
        tuner.search_space_summary()
    tuner.search(callbacks=list(callbacks), verbose=verbose)

    objective = tune_settings.objective_name(hypermodel.num_exits)
    trials = tuple(
        _summary(trial, hypermodel.dimensions, settings.epochs)
        for trial in tuner.oracle.get_best_trials(len(tuner.oracle.trials))
        # The oracle pads its ranking with trials that did not complete.
        if trial.status == "COMPLETED" and math.isfinite(trial.score)
    )
    result = SearchResult(
        tuner_dir=tuner_dir, objective=objective,
        direction=tune_settings.objective_direction(), trials=trials,
        retrain=retrain_settings(settings, trials[0], tuner_dir) if trials else None,
        train_examples=hypermodel.info.num_train,
        validation_examples=hypermodel.info.num_eval,
        validation_fraction=settings.validation_fraction,
    )
    if trials:
        files.write_atomically(
            best_path,
            json.dumps(best_hyperparameters_record(result), indent=2) + "\n")
    return result


def best_hyperparameters_record(result: SearchResult) -> dict:
    """The content of ``best_hyperparameters.json``.

    Example:

        {"objective": "val_exit4_accuracy", "direction": "max",
         "score": 0.7412, "trial": 8, "trial_id": "07",
         "trial_dir": "trials/trial_07", "best_epoch": 200, "epochs": 200,
         "hyperparameters": {"pskd_alpha": 0.71, "lr": 0.083},
         "retrain_settings": {...TrainSettings.to_json()...}}
    """
    best = result.trials[0]
    return {
        "objective": result.objective,
        "direction": result.direction,
        "score": best.score,
        "trial": best.number,
        "trial_id": best.trial_id,
        "trial_dir": best.directory,
        "best_epoch": best.best_epoch,
        "epochs": best.epochs,
        "hyperparameters": best.hyperparameters,
        "retrain_settings": result.retrain.to_json(),
    }


def _summary(trial, dimensions: Sequence[str], epochs: int) -> TrialSummary:
    values = trial.hyperparameters.values
    return TrialSummary(
        trial_id=trial.trial_id,
        score=float(trial.score),
        best_epoch=int(trial.best_step) + 1,
        epochs=int(values.get("tuner/epochs", epochs)),
        hyperparameters={name: values[name] for name in dimensions},
    )


def _check_resumable(tuner_dir: str, record: dict, ignored: Sequence[str]) -> None:
    """Raises `SettingsError` unless ``tuner_dir`` is new or holds this search."""
    search_path = os.path.join(tuner_dir, SEARCH_FILE)
    if not os.path.isfile(search_path):
        if os.path.exists(os.path.join(tuner_dir, PROJECT_NAME)):
            raise SettingsError(
                "tuner_dir", f"{tuner_dir} holds a {PROJECT_NAME}/ directory but no "
                f"{SEARCH_FILE}; choose another --tuner_dir or pass --overwrite")
        return
    try:
        with open(search_path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError) as err:
        raise SettingsError("tuner_dir", f"unreadable {search_path}: {err}") from err
    changed = [
        f"--{key}: {previous.get(key)!r} -> {value!r}"
        for key, value in record.items()
        if key not in _RESUME_SAFE_FIELDS and key not in ignored
        and previous.get(key) != value
    ]
    if changed:
        raise SettingsError(
            "tuner_dir", f"{tuner_dir} holds a search with other settings "
            f"({', '.join(changed)}); rerun with its settings to resume it, choose "
            "another --tuner_dir, or pass --overwrite to start it afresh")
