"""A trained run: its model, loaded safely, scored on a split of its own data.

`load_trained_model` reads a run directory or a ``.keras`` file (Keras safe
mode on by default) with the run's settings; `reading_run` holds a reader's
lock on the run meanwhile; `evaluation_data` rebuilds the split it is scored
on, normalised as the model was trained; `evaluate_trained` returns the
``metrics.json`` record (`selfkd_tf.evaluation.scoring.evaluate_model`),
`evaluate_cascade` the early-exit curve
(`selfkd_tf.serving.early_exit.early_exit_curve`) of that split, and
`fit_temperature_scaling` one temperature per exit, fitted and reported on
held-out data.

Example:

```python
trained = load_trained_model("runs/a")
record = evaluate_trained(trained, split="test")
print(format_metrics_table(record))
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import typing
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf import data as data_lib
from selfkd_tf.distillation.model import SelfKDModel
from selfkd_tf.data.splits import stratified_halves
from selfkd_tf.evaluation.scoring import (
    evaluate_model, metrics_record_of, predict_exit_probabilities)
from selfkd_tf.experiment.builders import build_datasets
from selfkd_tf.errors import SettingsError
from selfkd_tf.experiment.settings import (
    TrainSettings, as_settings_error, check_choice, read_settings)
from selfkd_tf.metrics import calibration
from selfkd_tf.models.costs import exit_costs
from selfkd_tf.rundir import lock as run_lock
from selfkd_tf.rundir.layout import MODEL_FILE, run_directory_of
from selfkd_tf.serving.early_exit import (
    DEFAULT_THRESHOLDS, check_thresholds, early_exit_curve, measure_latency)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained model and, when it sits in a run directory, that run.

    Attributes:
        model: the `SelfKDModel`.
        path: the ``.keras`` file it was loaded from.
        settings: the run's `TrainSettings` (its ``flags.json``), or None.
        run_dir: the run directory, or None for a lone ``.keras`` file.
    """

    model: SelfKDModel
    path: str
    settings: TrainSettings | None
    run_dir: str | None


@contextlib.contextmanager
def reading_run(path: str) -> typing.Iterator[None]:
    """Holds a reader's lock (`selfkd_tf.rundir.lock`) on ``path``'s run directory.

    Models are read, and results written beside them, only while no process
    trains the run: ``model.keras`` is replaced when a run is trained again.
    Other readers may hold it too.

    Raises:
        SettingsError (no flag): a process is training the run (the message
            names it), or the lock cannot be taken.

    Example:

    >>> with reading_run("runs/a"):  # doctest: +SKIP
    ...     record = evaluate_trained(load_trained_model("runs/a"))
    """
    run_dir = run_directory_of(path)
    with contextlib.ExitStack() as held:
        if run_dir is not None:
            with as_settings_error():
                held.enter_context(run_lock.locked(run_dir, shared=True))
        yield


UNSAFE_FLAG = "unsafe_deserialization"
"""The command-line flag that loads models with Keras safe mode off."""


def load_trained_model(path: str, safe_mode: bool = True) -> TrainedModel:
    """Loads a `SelfKDModel` from a ``.keras`` file or a run directory.

    A run directory provides its ``model.keras`` and ``flags.json``; a
    ``.keras`` file picks up the ``flags.json`` beside it, if any.

    Args:
        path: a run directory or a ``.keras`` file.
        safe_mode: Keras's safe mode. On (the default), a file holding
            Python code, such as a ``Lambda`` layer's function, is refused
            rather than run; turn it off only for files you trust.

    Raises:
        SettingsError (flag ``model``): nothing loadable at ``path``, a file
            refused by safe mode, or an unusable ``flags.json`` beside it.

    Example:

    >>> trained = load_trained_model("runs/cifar100_resnet18_pskd")  # doctest: +SKIP
    >>> trained.settings.arch, trained.model.num_exits  # doctest: +SKIP
    ('resnet18', 4)
    """
    run_dir = run_directory_of(path)
    if os.path.isdir(path):
        model_path = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(model_path):
            raise SettingsError(
                "model", f"{path} has no {MODEL_FILE} (has its training finished?)")
    elif os.path.isfile(path):
        model_path = path
    else:
        raise SettingsError("model", f"no such file or directory: {path}")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=safe_mode)
    # Whatever a damaged or foreign file makes Keras raise (zip, HDF5, JSON,
    # config errors) means the same to the caller: it cannot be loaded.
    except Exception as err:  # noqa: BLE001
        if "safe_mode=False" in str(err):  # Keras's wording for refused code
            raise SettingsError(
                "model", f"{model_path} holds Python code (a Lambda layer or "
                "function) that would run when it is loaded; refused by Keras "
                f"safe mode. Only if you trust the file, pass --{UNSAFE_FLAG} "
                "(safe_mode=False in Python)") from err
        raise SettingsError(
            "model", f"cannot load {model_path}: "
            f"{(str(err).strip() or type(err).__name__).splitlines()[0]}") from err
    if not isinstance(model, SelfKDModel):
        raise SettingsError(
            "model", f"{model_path} holds a {type(model).__name__}, not a SelfKDModel")
    try:
        settings = read_settings(run_dir) if run_dir else None
    except SettingsError as err:
        raise SettingsError("model", err.problem) from err
    return TrainedModel(model, model_path, settings, run_dir)


EVAL_SPLITS = ("test", "validation", "train")


def _eval_settings(trained: TrainedModel, dataset, data_dir, split, batch_size,
                   eval_examples) -> tuple[TrainSettings, str]:
    """The run's settings with the evaluation's data choices applied, and the split."""
    settings = trained.settings
    if settings is None:
        if not dataset:
            raise SettingsError(
                "dataset", f"required: {trained.path} is not in a run directory")
        settings = TrainSettings(dataset=dataset)
    split = split or ("validation" if settings.validation_fraction else "test")
    check_choice("split", split, EVAL_SPLITS)
    if split == "validation" and not settings.validation_fraction:
        raise SettingsError(
            "split", "got 'validation', but the run held out none "
            "(validation_fraction 0); allowed: test, train")
    # The training split is the one the run trained on, so the run's
    # validation carve-out (if any) is kept for it.
    keep_validation = split in ("validation", "train")
    return dataclasses.replace(
        settings, dataset=dataset or settings.dataset,
        data_dir=data_dir or settings.data_dir,
        batch_size=batch_size or settings.batch_size,
        eval_examples=eval_examples,
        validation_fraction=settings.validation_fraction if keep_validation else 0.0,
    ), split


def _renormalized(dataset: tf.data.Dataset, info, model: SelfKDModel) -> tf.data.Dataset:
    """Maps the pipeline's normalisation onto the one the model was trained with.

    They differ when the statistics come from other data (another dataset,
    or another subset of it); both are affine, so one multiply-add converts.

    Raises:
        SettingsError (flag ``model``): the model records no normalisation,
            so what its inputs should be is unknown (as `selfkd_tf.serving.saved_model`).
    """
    if model.input_mean is None or model.input_std is None:
        raise SettingsError(
            "model", "it records no input normalisation (input_mean, input_std), "
            "so its inputs are unknown; build the SelfKDModel with the "
            "input_mean and input_std of the data it trains on")
    mean, std = np.float32(info.mean), np.float32(info.std)
    model_mean, model_std = np.float32(model.input_mean), np.float32(model.input_std)
    if np.array_equal(mean, model_mean) and np.array_equal(std, model_std):
        return dataset
    scale, shift = std / model_std, (mean - model_mean) / model_std
    return dataset.map(lambda x, y: ({**x, "image": x["image"] * scale + shift}, y))


def evaluation_data(
    trained: TrainedModel,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    eval_examples: int | None = None,
) -> tuple[tf.data.Dataset, data_lib.DatasetInfo]:
    """The split a loaded model is evaluated on, normalised as it was trained.

    Args:
        trained: from `load_trained_model`.
        dataset, data_dir, batch_size: override the run's settings; a model
            outside a run directory needs ``dataset``.
        split: ``"test"``, ``"validation"`` (the part of the training set
            the run held out with ``validation_fraction``) or ``"train"``
            (the training examples the run used, unaugmented); default: the
            run's evaluation split.
        eval_examples: a stratified subset of this many examples; default:
            the whole split (whatever the run evaluated on while training).

    Returns:
        ``(dataset, info)``: batches as `selfkd_tf.data.make_datasets` yields
        them, with the images normalised as the model was trained, whatever
        data they come from; ``info.eval_split`` names the split.

    Raises:
        SettingsError: bad ``dataset``/``split``, or data the model cannot take.
    """
    model = trained.model
    settings, split = _eval_settings(
        trained, dataset, data_dir, split, batch_size, eval_examples)
    _, eval_ds, info = build_datasets(settings, eval_split=split)
    expected = tuple(model.backbone.input.shape[1:])
    if info.image_shape != expected or info.num_classes != model.num_classes:
        raise SettingsError(
            "dataset", f"{info.name} has {info.num_classes} classes of "
            f"{info.image_shape} images; the model takes {model.num_classes} "
            f"classes of {expected} images")
    return _renormalized(eval_ds, info, model), info


def _record_fields(trained: TrainedModel, info) -> dict:
    """What a metrics record says of a trained model and the data it scored."""
    model = trained.model
    return dict(
        dataset_name=info.name, split=info.eval_split,
        arch=trained.settings.arch if trained.settings else model.backbone.name,
        methods=model.selfkd_config.methods,
        epochs=trained.settings.epochs if trained.settings else None)


def evaluate_trained(trained: TrainedModel, temperatures: Sequence[float] | None = None,
                     **data_choices) -> dict:
    """Evaluates a loaded model; returns its ``metrics.json`` record.

    Args:
        trained: from `load_trained_model`.
        temperatures: one per exit, to score the temperature-scaled model
            (`fit_temperature_scaling`); the record lists them.
        **data_choices: ``dataset``, ``data_dir``, ``split``, ``batch_size``
            and ``eval_examples``, as for `evaluation_data`. The record's
            ``num_examples`` says how many were scored.

    Raises:
        SettingsError: bad ``dataset``/``split``, or data the model cannot take.
    """
    eval_ds, info = evaluation_data(trained, **data_choices)
    return evaluate_model(trained.model, eval_ds, temperatures=temperatures,
                          **_record_fields(trained, info))


TEMPERATURE_SPLITS = ("validation", "test")
"""The held-out splits a temperature may be fitted on."""


def fit_temperature_scaling(trained: TrainedModel, *, split: str | None = None,
                            seed: int = 0, **data_choices) -> dict:
    """Fits one temperature per exit on held-out data, and scores it on other held-out data.

    Temperature scaling (`selfkd_tf.metrics.calibration`) is fitted on data
    the model never trained on, and reported on data it was not fitted on:

    - ``split="validation"`` (the default when the run held one out): fitted
      on the whole validation split, reported on the test split;
    - ``split="test"``: fitted on one stratified half of the test split
      (`selfkd_tf.data.splits.stratified_halves` with ``seed``) and reported
      on the other half, as the early-exit study chooses its threshold.

    Args:
        trained: from `load_trained_model`.
        split: one of `TEMPERATURE_SPLITS`.
        seed: the draw of the halves of the test split.
        **data_choices: ``dataset``, ``data_dir``, ``batch_size``,
            ``eval_examples``, as for `evaluation_data`.

    Returns:
        The temperature record (written as ``temperatures_<split>.json``):
        ``temperatures`` (one per exit, shallowest first), ``fitted_on`` and
        ``reported_on`` (``split``, ``rows``, ``num_examples``), and the
        metrics records ``before`` and ``after`` temperature scaling on the
        reported rows; ``model``, ``dataset``.

    Raises:
        SettingsError: a split that is not held out (``train``), or
            ``validation`` for a run that held none out; bad data choices.
    """
    run_split = "validation" if trained.settings and trained.settings.validation_fraction \
        else "test"
    split = split or run_split
    if split not in TEMPERATURE_SPLITS:
        raise SettingsError(
            "split", f"got {split!r}: a temperature is fitted on held-out data; allowed: "
            f"{', '.join(TEMPERATURE_SPLITS)}")
    fit_ds, fit_info = evaluation_data(trained, split=split, **data_choices)
    fit_probs, fit_labels = predict_exit_probabilities(trained.model, fit_ds)
    if split == "validation":
        report_ds, report_info = evaluation_data(trained, split="test", **data_choices)
        report_probs, report_labels = predict_exit_probabilities(trained.model, report_ds)
        fit_rows = report_rows = "all"
    else:
        first, second = stratified_halves(fit_labels, seed)
        report_info = fit_info
        report_probs, report_labels = [p[second] for p in fit_probs], fit_labels[second]
        fit_probs, fit_labels = [p[first] for p in fit_probs], fit_labels[first]
        fit_rows, report_rows = (f"stratified half {k} of 2 (seed {seed})" for k in (1, 2))
    temperatures = calibration.fit_temperatures(fit_probs, fit_labels)
    fields = _record_fields(trained, report_info)
    return {
        "model": trained.path, "dataset": fit_info.name,
        "temperatures": temperatures,
        "fitted_on": {"split": split, "rows": fit_rows, "num_examples": len(fit_labels)},
        "reported_on": {"split": "test", "rows": report_rows,
                        "num_examples": len(report_labels)},
        "before": metrics_record_of(trained.model, report_probs, report_labels, **fields),
        "after": metrics_record_of(trained.model, report_probs, report_labels,
                                   temperatures=temperatures, **fields),
    }


def evaluate_cascade(
    trained: TrainedModel,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    latency_examples: int = 128,
    temperatures: Sequence[float] | None = None,
    **data_choices,
) -> dict:
    """The early-exit curve of a loaded model on one split.

    Args:
        trained: from `selfkd_tf.experiment.trained.load_trained_model`.
        thresholds: the thresholds to sweep.
        latency_examples: time the cascade on the split's first this many
            images (`measure_latency`); 0 measures FLOPs only.
        temperatures: one per exit: the exits' confidences are those of the
            temperature-scaled model (`fit_temperature_scaling`).
        **data_choices: ``dataset``, ``data_dir``, ``split``, ``batch_size``,
            ``eval_examples``, as for `selfkd_tf.experiment.trained.evaluation_data`.

    Returns:
        `early_exit_curve`'s dict, with ``model``, ``dataset`` and ``split``.

    Raises:
        SettingsError: bad data choices.
        ValueError: bad thresholds.
    """
    thresholds = check_thresholds(thresholds)
    model = trained.model
    eval_ds, info = evaluation_data(trained, **data_choices)
    exit_probs, labels = predict_exit_probabilities(model, eval_ds)
    if temperatures is not None:
        exit_probs = calibration.apply_temperatures(exit_probs, temperatures)
    latency = None
    if latency_examples:
        chunks, count = [], 0
        for x, _ in eval_ds:
            chunks.append(x["image"].numpy())
            count += len(chunks[-1])
            if count >= latency_examples:
                break
        images = np.concatenate(chunks)[:latency_examples]
        latency = measure_latency(model.backbone, images, thresholds)
    curve = early_exit_curve(exit_probs, labels, exit_costs(model.backbone),
                             thresholds, latency)
    return {"model": trained.path, "dataset": info.name, "split": info.eval_split,
            **({"temperatures": list(temperatures)} if temperatures is not None else {}),
            **curve}
