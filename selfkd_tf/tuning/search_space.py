"""The search space of `selfkd-tune` and the search's own settings.

`TuneSettings` holds what a search needs beyond a run's `TrainSettings`: the
tuner, its budget, the objective and the range of every dimension, and checks
them (`TuneSettings.validate`) before anything trains. `selfkd_tf.tuning.search`
runs the search.

Search space. Every dimension can be switched off (``search``) and has its
range set by a `TuneSettings` field; dimensions of methods that are off are
not searched, and any dimension not searched keeps its `TrainSettings` value:

| dimension      | method | default range            | sampling    |
|----------------|--------|--------------------------|-------------|
| ``pskd_alpha`` | pskd   | [0.1, 0.9]               | uniform     |
| ``byot_alpha`` | byot   | [0.05, 0.5]              | uniform     |
| ``byot_lambda``| byot   | [1e-8, 1e-4]             | log-uniform |
| ``temperature``| byot   | {1, 2, 3, 4, 5}          | choice      |
| ``lr``         |        | [0.01, 0.2]              | log-uniform |
| ``weight_decay``|       | [1e-4, 1e-3]             | log-uniform |
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Sequence

from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.models import applications

from selfkd_tf.errors import SettingsError

TUNERS = ("random", "bayesian", "hyperband")
DIMENSIONS = ("pskd_alpha", "byot_alpha", "byot_lambda", "temperature", "lr",
              "weight_decay")
"""The searchable `TrainSettings` fields, in the order they are reported."""

DEFAULT_VALIDATION_FRACTION = 0.1
"""`selfkd-tune`'s default share of the training set that scores the trials."""

# The method a dimension belongs to (None: every run has it).
_METHOD_OF = {"pskd_alpha": "pskd", "byot_alpha": "byot", "byot_lambda": "byot",
              "temperature": "byot", "lr": None, "weight_decay": None}
LOG_SAMPLED = frozenset({"byot_lambda", "lr", "weight_decay"})
"""Dimensions sampled log-uniformly: their ranges span orders of magnitude."""
# Mixing weights: the range must lie in [0, 1].
_UNIT_INTERVAL = frozenset({"pskd_alpha", "byot_alpha"})
_STRATEGIES = ("none", "mirrored")


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """The knobs of a search; the field names are ``selfkd-tune``'s flags.

    Args:
        tuner: ``"random"``, ``"bayesian"`` (needs scipy and scikit-learn)
            or ``"hyperband"``.
        max_trials: trials to run (random, Bayesian). With Hyperband, whose
            budget follows from ``epochs``, ``hyperband_factor`` and
            ``hyperband_iterations``, an optional cap (``None``: no cap).
        executions_per_trial: models trained per trial, from different
            initialisations; the trial's score is their mean.
        objective: the validation metric maximised: ``val_exit{i}_accuracy``
            for an exit ``i``, ``val_ensemble_accuracy``, or ``val_loss``
            (the deepest exit's cross-entropy, minimised). ``None``: the
            deepest exit's accuracy.
        tuner_dir: directory of the search; ``None``:
            ``tuning/<dataset>_<arch>_<methods>``.
        search: the dimensions searched, a subset of `DIMENSIONS`.
        pskd_alpha_range, byot_alpha_range, byot_lambda_range, lr_range,
            weight_decay_range: ``(low, high)`` of each dimension.
        temperature_choices: the temperatures tried.
        hyperband_factor: Hyperband's reduction factor (>= 2).
        hyperband_iterations: Hyperband's sweeps over all its brackets.

    Example:

    >>> TuneSettings(search=("pskd_alpha",)).searched(TrainSettings(methods=()))
    ()
    """

    tuner: str = "random"
    max_trials: int | None = 10
    executions_per_trial: int = 1
    objective: str | None = None
    tuner_dir: str | None = None
    search: tuple[str, ...] = DIMENSIONS
    pskd_alpha_range: tuple[float, float] = (0.1, 0.9)
    byot_alpha_range: tuple[float, float] = (0.05, 0.5)
    byot_lambda_range: tuple[float, float] = (1e-8, 1e-4)
    temperature_choices: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    lr_range: tuple[float, float] = (0.01, 0.2)
    weight_decay_range: tuple[float, float] = (1e-4, 1e-3)
    hyperband_factor: int = 3
    hyperband_iterations: int = 1

    def searched(self, settings: TrainSettings) -> tuple[str, ...]:
        """The dimensions searched for ``settings``: requested, method on."""
        return tuple(
            name for name in DIMENSIONS
            if name in self.search
            and (_METHOD_OF[name] is None or _METHOD_OF[name] in settings.methods)
        )

    def objective_name(self, num_exits: int) -> str:
        """``objective``, or the deepest of ``num_exits`` exits' validation accuracy."""
        return self.objective or f"val_exit{num_exits}_accuracy"

    def objective_direction(self) -> str:
        return "min" if self.objective == "val_loss" else "max"

    def check_objective(self, num_exits: int) -> None:
        """Raises `SettingsError` unless ``objective`` names a metric of a
        network of ``num_exits`` exits (known once it is built: a backbone
        of one's own has as many as its ``exits`` give)."""
        objectives = [f"val_exit{i}_accuracy" for i in range(1, num_exits + 1)]
        objectives += ["val_ensemble_accuracy", "val_loss"]
        if self.objective is not None and self.objective not in objectives:
            raise SettingsError(
                "objective", f"got {self.objective!r}; allowed: {', '.join(objectives)}")

    def validate(self, settings: TrainSettings) -> None:
        """Raises `SettingsError` naming the first invalid flag.

        ``settings`` are the fixed parts of every trial; they must already be
        valid (`TrainSettings.validate`).
        """
        if self.tuner not in TUNERS:
            raise SettingsError(
                "tuner", f"got {self.tuner!r}; allowed: {', '.join(TUNERS)}")
        if self.tuner == "bayesian":
            missing = [m for m in ("scipy", "sklearn") if importlib.util.find_spec(m) is None]
            if missing:
                raise SettingsError(
                    "tuner", f"bayesian needs {' and '.join(missing)}, which "
                    "are not installed (pip install scipy scikit-learn)")
        if self.max_trials is not None or self.tuner != "hyperband":
            _check_positive_int("max_trials", self.max_trials)
        _check_positive_int("executions_per_trial", self.executions_per_trial)
        if self.tuner == "hyperband":
            _check_positive_int("hyperband_factor", self.hyperband_factor, minimum=2)
            _check_positive_int("hyperband_iterations", self.hyperband_iterations)
        if not applications.is_foreign(settings.arch):
            self.check_objective(settings.num_stages)
        elif self.objective is not None and not re.fullmatch(
                r"val_exit[1-9][0-9]*_accuracy|val_ensemble_accuracy|val_loss", self.objective):
            raise SettingsError(
                "objective", f"got {self.objective!r}; allowed: val_exit<i>_accuracy, "
                "val_ensemble_accuracy, val_loss")
        unknown = [name for name in self.search if name not in DIMENSIONS]
        if unknown:
            raise SettingsError(
                "search", f"unknown {', '.join(unknown)}; allowed: {', '.join(DIMENSIONS)}")
        for name in DIMENSIONS:
            if name != "temperature":
                _check_range(name, getattr(self, f"{name}_range"))
        choices = self.temperature_choices
        if (not choices or len(set(choices)) != len(choices)
                or not all(_is_number(t) and t > 0 for t in choices)):
            raise SettingsError(
                "temperature_choices", f"got {_join(choices)!r}; allowed: "
                "distinct numbers > 0, e.g. 1,2,3,4,5")
        if not self.searched(settings):
            raise SettingsError(
                "search", f"nothing to search: {_join(self.search) or 'none'} with "
                f"--methods={_join(settings.methods)}; allowed: "
                f"{', '.join(n for n in DIMENSIONS if n in TuneSettings().searched(settings))}")
        if not 0 < settings.validation_fraction < 1:
            raise SettingsError(
                "validation_fraction", f"got {settings.validation_fraction}; allowed: "
                "(0, 1), the share of the training set that scores the trials "
                "(the test split is never used for selection)")
        if settings.distribute not in _STRATEGIES:
            raise SettingsError(
                "distribute", f"got {settings.distribute!r}; allowed for tuning: "
                f"{', '.join(_STRATEGIES)} (Keras Tuner runs each trial in one "
                "process; mirrored uses all local GPUs)")

    def to_json(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    def resolved_dir(self, settings: TrainSettings) -> str:
        """The absolute search directory."""
        name = os.path.basename(settings.default_model_dir())
        return os.path.abspath(self.tuner_dir or os.path.join("tuning", name))


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _join(values: Sequence) -> str:
    return ",".join(str(v) for v in values)


def _check_positive_int(flag: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(flag, f"got {value!r}; allowed: integers >= {minimum}")


def _check_range(name: str, bounds) -> None:
    flag = f"{name}_range"
    low_high = "numbers LOW,HIGH with LOW < HIGH"
    if name in LOG_SAMPLED:
        allowed = f"{low_high}, LOW > 0 (sampled log-uniformly)"
    elif name in _UNIT_INTERVAL:
        allowed = f"{low_high}, within [0, 1]"
    else:
        allowed = low_high
    if (len(bounds) != 2 or not all(_is_number(b) for b in bounds)
            or not bounds[0] < bounds[1]
            or (name in LOG_SAMPLED and bounds[0] <= 0)
            or (name in _UNIT_INTERVAL and not 0 <= bounds[0] < bounds[1] <= 1)):
        raise SettingsError(flag, f"got {_join(bounds)!r}; allowed: {allowed}")
