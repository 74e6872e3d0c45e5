"""Loading a trained model and scoring it on a split of its data.

`load_trained_model` reads a run directory or a ``.keras`` file (Keras safe
mode on by default); `evaluation_data` rebuilds the split it is scored on,
normalised as the model was trained; `evaluate_trained` and
`evaluate_model` return the ``metrics.json`` record
(`selfkd_tf.metrics_record.build_metrics_record`).

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

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf import data as data_lib
from selfkd_tf import metrics as metrics_lib
from selfkd_tf import metrics_record
from selfkd_tf import run_lock
from selfkd_tf.builders import build_datasets
from selfkd_tf.export import count_parameters
from selfkd_tf.run_directory import FLAGS_FILE, MODEL_FILE
from selfkd_tf.settings import (
    SettingsError, TrainSettings, as_settings_error, check_choice, read_settings)
from selfkd_tf.training import SelfKDModel


def predict_exit_probabilities(
    model: SelfKDModel, dataset: tf.data.Dataset
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every exit's class probabilities on ``dataset``, and its labels.

    Returns:
        ``([P_1, ..., P_N], labels)``, ``P_i`` float32 ``[n, C]``.
    """

    @tf.function
    def probabilities(images):
        logits = model(images, training=False)["logits"]
        return [tf.nn.softmax(tf.cast(z, tf.float32)) for z in logits]

    batches, labels = [], []
    for x, y in dataset:
        images = x["image"] if isinstance(x, dict) else x
        batches.append([p.numpy() for p in probabilities(images)])
        labels.append(y.numpy())
    return [np.concatenate(exit_probs) for exit_probs in zip(*batches)], np.concatenate(labels)


def evaluate_model(
    model: SelfKDModel,
    dataset: tf.data.Dataset,
    *,
    dataset_name: str,
    split: str,
    arch: str,
    methods: typing.Sequence[str],
    train_time_s: float | None = None,
    epochs: int | None = None,
) -> dict:
    """The ``metrics.json`` record of ``model`` on ``dataset``.

    ``params`` counts the trainable weights of the whole multi-exit network.
    """
    exit_probs, labels = predict_exit_probabilities(model, dataset)
    return metrics_record.build_metrics_record(
        exit_probs, labels, dataset=dataset_name, split=split, arch=arch,
        methods=list(methods), params=count_parameters(model.backbone),
        train_time_s=train_time_s, epochs=epochs,
    )


def format_metrics_table(record: dict) -> str:
    """A plain-text table of a metrics record, one row per exit + ensemble.

    Example:

        exit        top1_err  top5_err     nll     ece    aurc   eaurc
        1              45.12     14.20   1.812    8.31  180.20   60.12
        ...
        ensemble       30.05      8.90   1.102    3.02   90.11   40.33
    """
    keys = metrics_lib.METRIC_KEYS
    rows = [(str(e["exit"]), e) for e in record["exits"]]
    rows.append(("ensemble", record["ensemble"]))
    lines = [f"{'exit':<10}" + "".join(f"{k:>10}" for k in keys)]
    for name, scores in rows:
        lines.append(f"{name:<10}" + "".join(f"{scores[k]:>10.3f}" for k in keys))
    return "\n".join(lines)


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


def run_directory_of(path: str) -> str | None:
    """The run directory of a model path: the directory itself, or the
    directory of a ``.keras`` file with a ``flags.json`` beside it; else None."""
    if os.path.isdir(path):
        return path
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and os.path.isfile(os.path.join(directory, FLAGS_FILE)):
        return directory
    return None


@contextlib.contextmanager
def reading_run(path: str) -> typing.Iterator[None]:
    """Holds a reader's lock (`selfkd_tf.run_lock`) on ``path``'s run directory.

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
            so what its inputs should be is unknown (as `selfkd_tf.export`).
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


def evaluate_trained(trained: TrainedModel, **data_choices) -> dict:
    """Evaluates a loaded model; returns its ``metrics.json`` record.

    Args:
        trained: from `load_trained_model`.
        **data_choices: ``dataset``, ``data_dir``, ``split``, ``batch_size``
            and ``eval_examples``, as for `evaluation_data`. The record's
            ``num_examples`` says how many were scored.

    Raises:
        SettingsError: bad ``dataset``/``split``, or data the model cannot take.
    """
    model = trained.model
    eval_ds, info = evaluation_data(trained, **data_choices)
    return evaluate_model(
        model, eval_ds, dataset_name=info.name,
        split=info.eval_split,
        arch=trained.settings.arch if trained.settings else model.backbone.name,
        methods=model.selfkd_config.methods,
        epochs=trained.settings.epochs if trained.settings else None,
    )
