"""One training run, from settings to a run directory.

`train(settings)` is the whole recipe as a plain function: build the data,
the model and the optimizer, `fit` with a few callbacks, save and evaluate.
Every knob is a field of `TrainSettings`, whose field names are also the
``selfkd-train`` flag names (`selfkd_tf.cli.flags`).

A run directory (``settings.model_dir``) holds:

- ``flags.json``: the resolved settings (`TrainSettings.to_json`);
- ``data.json``: what the run trains on (`run_directory.DataFingerprint`),
  so that a resumed run refuses data that changed;
- ``history.csv``: one row per epoch (`selfkd_tf.callbacks.HistoryCSV`),
  epochs numbered from 1 as on the console, with an ``epoch_time_s`` column;
- ``tensorboard/``: TensorBoard scalars of every logged value (loss terms,
  per-exit accuracies, ``lr``, ``alpha_t``, ``epoch_time_s``) at step = the
  1-based epoch;
- ``checkpoints/``: crash-safe training state (`selfkd_tf.checkpointing`);
- ``model.keras``: the trained `SelfKDModel`;
- ``metrics.json``: every exit and the ensemble evaluated on the evaluation
  split (`selfkd_tf.metrics.build_metrics_record`).

Running `train` again on an existing directory resumes it from its last
checkpoint, or returns its metrics when it has finished; settings that would
change the result (`RESUME_SAFE_FIELDS` lists those that would not) and the
data must match, unless ``overwrite`` starts the run afresh. The directory's
files are read as untrusted (`selfkd_tf.run_directory`): anything malformed,
or a link through which training would write elsewhere, is refused in one
line before anything is written.

Example:

```python
settings = TrainSettings(dataset="npz:/data/tiny.npz", arch="resnet18",
                         width_multiplier=0.25, epochs=10, model_dir="runs/tiny")
record = train(settings)
record["exits"][-1]["top1_err"]  # the deepest exit's test error, in percent
```
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
import typing

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf import callbacks as callbacks_lib
from selfkd_tf import checkpointing
from selfkd_tf import cluster
from selfkd_tf import data as data_lib
from selfkd_tf import distribute as distribute_lib
from selfkd_tf import losses
from selfkd_tf import metrics as metrics_lib
from selfkd_tf import run_directory
from selfkd_tf.export import count_parameters
from selfkd_tf.files import write_atomically
from selfkd_tf.models import ARCHITECTURES, EXIT_HEADS, build_multi_exit_resnet
from selfkd_tf.models.resnet import NUM_STAGES_CHOICES as NUM_STAGES
from selfkd_tf.optimizers import LR_SCHEDULES, make_optimizer
from selfkd_tf.training import SelfKDModel

FLAGS_FILE = "flags.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.keras"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
DATA_FILE = run_directory.DATA_FILE
RUN_FILES = (FLAGS_FILE, DATA_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE,
             TENSORBOARD_DIR, CHECKPOINT_DIR)
"""Everything `train` writes in a run directory (and ``overwrite`` removes)."""

RESUME_SAFE_FIELDS = frozenset({
    "data_dir", "model_dir", "overwrite", "save_every_steps", "distribute",
    "jit_compile", "deterministic", "eval_every",
})
"""Settings a resumed run may change: where things are and how fast they
run, not what is computed. Any other difference refuses to resume."""

TABLE_DTYPES = ("float32", "float16")


class SettingsError(ValueError):
    """A setting cannot be used; `flag` names it (``None`` if no single one).

    ``str(error)`` is one line, ``"<flag>: <problem>"``.
    """

    def __init__(self, flag: str | None, problem: str):
        self.flag = flag
        self.problem = problem
        super().__init__(f"{flag}: {problem}" if flag else problem)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the checkpoints on disk are whole.

    ``str(error)`` is one line: where training stopped and how to resume.
    """


def _setting(default, help: str):  # noqa: A002 - the absl keyword
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run; the field names are the flag names.

    `validate` checks what can be checked without data; the dataset knobs
    (``dataset``, ``normalization``, ``image_size``, ...) are checked when
    `build_datasets` reads the data.

    Example:

    >>> s = TrainSettings(dataset="npz:/tmp/x.npz", methods=("pskd",), epochs=5)
    >>> TrainSettings.from_json(s.to_json()) == s
    True
    """

    # Data.
    dataset: str = _setting(
        "cifar100", "digits (embedded, no download), cifar10, cifar100 (TFDS), "
        "cifar:PATH (python pickles), folder:PATH (PATH/{train,test}/<class>/*.jpg) "
        "or npz:PATH.")
    data_dir: str | None = _setting(None, "TFDS data directory (cifar10, cifar100).")
    normalization: str = _setting(
        "dataset", "dataset (published CIFAR or training-split statistics) "
        "or imagenet.")
    augment: bool = _setting(True, "Random crop (padding 4) and horizontal flip.")
    image_size: int | None = _setting(None, "Resize every image to this size.")
    train_examples: int | None = _setting(
        None, "Use a stratified subset of this many training examples.")
    eval_examples: int | None = _setting(
        None, "Use a stratified subset of this many evaluation examples.")
    subset_seed: int | None = _setting(
        None, "Seed of the validation split and of the train_examples/"
        "eval_examples subsets; default: --seed. Fix it to compare seeds on "
        "one subset.")
    validation_fraction: float = _setting(
        0.0, "Hold out this fraction of the training set and evaluate on it "
        "instead of the test split.")
    # Model.
    arch: str = _setting("resnet18", f"One of {', '.join(ARCHITECTURES)}.")
    exit_head: str | None = _setting(
        None, f"One of {', '.join(EXIT_HEADS)}; default: attention for "
        "resnext50_32x4d, bottleneck otherwise.")
    num_stages: int = _setting(
        4, "Backbone stages kept, one exit after each (Table 4 ablation): "
        f"{', '.join(map(str, NUM_STAGES))}.")
    width_multiplier: float = _setting(1.0, "Scales every channel count.")
    sync_batchnorm: bool = _setting(
        False, "Synchronise batch-norm statistics across replicas.")
    # Objective.
    methods: tuple[str, ...] = _setting(
        losses.METHODS, f"Comma list of {', '.join(losses.METHODS)}; "
        "empty for the baseline.")
    pskd_alpha: float = _setting(0.8, "PS-KD: final weight a_T of the self-teacher.")
    pskd_teacher: str = _setting(
        "deepest", f"PS-KD teacher: {', '.join(losses.PSKD_TEACHERS)}.")
    byot_alpha: float = _setting(0.1, "BYOT: weight of the distillation term.")
    byot_lambda: float = _setting(1e-6, "BYOT: weight of the feature hint term.")
    temperature: float = _setting(3.0, "BYOT: softening temperature.")
    byot_exits: tuple[int, ...] | None = _setting(
        None, "BYOT: comma list of the shallow exits distilled, 1-based "
        "(Table 3 ablation); default: all shallow exits.")
    dmfl_gradient: str = _setting(
        "mutual", f"DMFL gradient: {', '.join(losses.DMFL_GRADIENTS)}.")
    # Optimisation.
    epochs: int = _setting(300, "Training epochs.")
    batch_size: int = _setting(128, "Global batch size.")
    lr: float = _setting(0.1, "Initial learning rate.")
    momentum: float = _setting(0.9, "SGD momentum.")
    nesterov: bool = _setting(True, "Nesterov momentum.")
    weight_decay: float = _setting(5e-4, "Coupled L2 weight decay.")
    lr_schedule: str = _setting(
        "multistep", f"{', '.join(LR_SCHEDULES)} (multistep: x0.1 at 50% "
        "and 75% of the epochs).")
    seed: int = _setting(0, "Seed of the initialisation, the split, the "
                         "order and the augmentation.")
    deterministic: bool = _setting(
        False, "Deterministic ops: bitwise reproducible, slower.")
    # Execution.
    distribute: str = _setting(
        "none", f"Distribution strategy: {', '.join(distribute_lib.STRATEGIES)}.")
    mixed_precision: str = _setting(
        "none", f"Mixed precision: {', '.join(distribute_lib.PRECISIONS)}.")
    jit_compile: bool = _setting(False, "XLA-compile the training step.")
    table_dtype: str = _setting(
        "float32", f"Storage of the PS-KD table: {', '.join(TABLE_DTYPES)}.")
    # Run directory.
    model_dir: str | None = _setting(
        None, "Run directory; default: runs/<dataset>_<arch>_<methods>. "
        "An existing run is resumed.")
    eval_every: int = _setting(
        1, "Evaluate on the evaluation split after the first epoch, every "
        "this many epochs and after the last.")
    save_every_steps: int = _setting(
        0, "Also checkpoint every this many steps (0: only at epoch ends).")
    overwrite: bool = _setting(
        False, "Delete the run in --model_dir and start afresh.")

    def selfkd_config(self) -> losses.SelfKDConfig:
        """The objective's configuration."""
        return losses.SelfKDConfig(
            methods=tuple(self.methods), pskd_alpha=self.pskd_alpha,
            pskd_teacher=self.pskd_teacher, byot_alpha=self.byot_alpha,
            byot_lambda=self.byot_lambda, temperature=self.temperature,
            byot_exits=self.byot_exits, dmfl_gradient=self.dmfl_gradient,
        )

    def validate(self) -> None:
        """Raises `SettingsError` naming the first invalid flag.

        Example:

        >>> try:
        ...     TrainSettings(arch="resnet19").validate()
        ... except SettingsError as error:
        ...     print(error.flag)
        arch
        """
        if not self.dataset:
            raise SettingsError(
                "dataset", "missing; allowed: digits, cifar10, cifar100, cifar:PATH, "
                "folder:PATH, npz:PATH")
        _check_choice("arch", self.arch, ARCHITECTURES)
        if self.exit_head is not None:
            _check_choice("exit_head", self.exit_head, EXIT_HEADS)
        _check_choice("num_stages", self.num_stages, NUM_STAGES)
        if not self.width_multiplier > 0:
            raise SettingsError(
                "width_multiplier", f"got {self.width_multiplier}; allowed: > 0")
        with _as_settings_error():
            self.selfkd_config().shallow_byot_exits(self.num_stages)
        _check_at_least("epochs", self.epochs, 1)
        _check_at_least("batch_size", self.batch_size, 1)
        if not self.lr > 0:
            raise SettingsError("lr", f"got {self.lr}; allowed: > 0")
        if not 0 <= self.momentum < 1:
            raise SettingsError("momentum", f"got {self.momentum}; allowed: [0, 1)")
        if not self.weight_decay >= 0:
            raise SettingsError(
                "weight_decay", f"got {self.weight_decay}; allowed: >= 0")
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_at_least("seed", self.seed, 0)
        _check_choice("distribute", self.distribute, distribute_lib.STRATEGIES)
        _check_choice("mixed_precision", self.mixed_precision, distribute_lib.PRECISIONS)
        _check_choice("table_dtype", self.table_dtype, TABLE_DTYPES)
        if self.subset_seed is not None:
            _check_at_least("subset_seed", self.subset_seed, 0)
        _check_at_least("eval_every", self.eval_every, 1)
        _check_at_least("save_every_steps", self.save_every_steps, 0)

    def default_model_dir(self) -> str:
        """``runs/<dataset>_<arch>_<methods>``, e.g. ``runs/cifar100_resnet18_pskd+byot``."""
        kind, _, path = self.dataset.partition(":")
        name = os.path.basename(os.path.normpath(path)) if path else kind
        methods = "+".join(self.methods) or "baseline"
        return os.path.join("runs", f"{name}_{self.arch}_{methods}")

    def to_json(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_json(cls, d: dict) -> "TrainSettings":
        """Inverse of `to_json`; absent keys take their defaults."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SettingsError(None, f"unknown settings {unknown}")
        values = dict(d)
        for key in ("methods", "byot_exits"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def _check_choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise SettingsError(
            flag, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _check_at_least(flag: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(flag, f"got {value!r}; allowed: integers >= {minimum}")


_FLAG_NAMES = frozenset(f.name for f in dataclasses.fields(TrainSettings))
# "`arch` must be ...", "epochs: ...", "batch_size must be ..." all name a flag.
_NAMED_FLAG = re.compile(r"^`?(\w+)`?:?\s+(.*)$", re.DOTALL)


@contextlib.contextmanager
def _as_settings_error():
    """Re-raises a library `ValueError` met at start-up as a `SettingsError`.

    The message is reduced to its first line and attributed to the flag it
    starts with; data errors that name no flag are about ``dataset``.
    """
    try:
        yield
    except SettingsError:
        raise
    except ValueError as error:
        message = (str(error).strip() or type(error).__name__).splitlines()[0]
        match = _NAMED_FLAG.match(message)
        if match and match.group(1) in _FLAG_NAMES:
            raise SettingsError(match.group(1), match.group(2)) from error
        flag = "dataset" if isinstance(error, data_lib.DataError) else None
        raise SettingsError(flag, message) from error


# -- building blocks ----------------------------------------------------------


def build_datasets(
    settings: TrainSettings, initial_epoch: int = 0, eval_split: str | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, data_lib.DatasetInfo]:
    """The training and evaluation datasets of a run.

    The training dataset holds epochs ``initial_epoch .. epochs - 1`` back to
    back, `info.steps_per_epoch` batches each, so `fit` needs
    ``steps_per_epoch=info.steps_per_epoch``. ``eval_split`` is as in
    `selfkd_tf.data.make_datasets`.

    Raises:
        SettingsError: the data cannot be read or a data setting is invalid.
    """
    with _as_settings_error():
        return data_lib.make_datasets(
            settings.dataset, data_dir=settings.data_dir,
            batch_size=settings.batch_size, augment=settings.augment,
            normalization=settings.normalization,
            validation_fraction=settings.validation_fraction,
            train_examples=settings.train_examples,
            eval_examples=settings.eval_examples, seed=settings.seed,
            subset_seed=settings.subset_seed,
            epochs=settings.epochs, initial_epoch=initial_epoch,
            image_size=settings.image_size, eval_split=eval_split,
        )


def build_model(settings: TrainSettings, info: data_lib.DatasetInfo) -> SelfKDModel:
    """An uncompiled `SelfKDModel` for the data described by ``info``.

    Sets Keras's global dtype policy from ``settings.mixed_precision`` first.
    Call it inside the distribution strategy's scope.
    """
    with _as_settings_error():
        distribute_lib.set_mixed_precision(settings.mixed_precision)
        backbone = build_multi_exit_resnet(
            settings.arch, info.num_classes, input_shape=info.image_shape,
            num_stages=settings.num_stages, exit_head=settings.exit_head,
            width_multiplier=settings.width_multiplier,
            sync_batchnorm=settings.sync_batchnorm,
        )
        return SelfKDModel(
            backbone, num_train_examples=info.num_train,
            config=settings.selfkd_config(), weight_decay=settings.weight_decay,
            table_dtype=settings.table_dtype, input_mean=info.mean,
            input_std=info.std, name="selfkd",
        )


def compile_model(model: SelfKDModel, settings: TrainSettings, steps_per_epoch: int) -> None:
    """Compiles ``model`` with the run's SGD and learning-rate schedule."""
    model.compile(
        optimizer=make_optimizer(
            settings.lr, settings.momentum, nesterov=settings.nesterov,
            schedule=settings.lr_schedule, epochs=settings.epochs,
            steps_per_epoch=steps_per_epoch,
        ),
        jit_compile=settings.jit_compile,
    )


# -- evaluation ---------------------------------------------------------------


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
    return metrics_lib.build_metrics_record(
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
    if os.path.isdir(path):
        run_dir, model_path = path, os.path.join(path, MODEL_FILE)
        if not os.path.isfile(model_path):
            raise SettingsError(
                "model", f"{path} has no {MODEL_FILE} (has its training finished?)")
    elif os.path.isfile(path):
        model_path = path
        run_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(os.path.join(run_dir, FLAGS_FILE)):
            run_dir = None
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
        settings = _read_settings(run_dir) if run_dir else None
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
    _check_choice("split", split, EVAL_SPLITS)
    if split == "validation" and not settings.validation_fraction:
        raise SettingsError(
            "split", f"got 'validation', but the run held out none "
            "(validation_fraction 0); allowed: test")
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


# -- run directory ------------------------------------------------------------


def _read_settings(run_dir: str) -> TrainSettings | None:
    """The settings in ``run_dir``'s ``flags.json``; None if there is none.

    Raises:
        SettingsError (flag ``model_dir``): the file is unreadable, not JSON,
            not a settings record, or holds values of the wrong type or
            outside their allowed values.
    """
    path = os.path.join(run_dir, FLAGS_FILE)
    if not os.path.lexists(path):
        return None
    try:
        value = run_directory.read_json(path)
        if not isinstance(value, dict):
            raise SettingsError(None, "not a JSON object")
        settings = TrainSettings.from_json(value)
        hints = typing.get_type_hints(TrainSettings)
        wrong = [f"{k}={v!r}" for k, v in dataclasses.asdict(settings).items()
                 if not run_directory.fits_type(v, hints[k])]
        if wrong:
            raise SettingsError(None, f"values of the wrong type: {', '.join(wrong)}")
        settings.validate()
    except run_directory.RunDirectoryError as err:
        raise SettingsError("model_dir", str(err)) from err
    except (SettingsError, TypeError) as err:
        raise SettingsError("model_dir", f"unusable {path}: {err}") from err
    return settings


def _read_metrics(path: str) -> dict:
    """A finished run's ``metrics.json`` record, checked for what is printed."""
    try:
        return run_directory.read_metrics(path, metrics_lib.METRIC_KEYS)
    except run_directory.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; move it away to evaluate the run again, or "
            "pass --overwrite to train it afresh") from err


def _check_run_directory(run_dir: str) -> None:
    """Refuses run files through which training would write outside ``run_dir``."""
    try:
        run_directory.check_contained(run_dir, RUN_FILES, appended=(HISTORY_FILE,))
    except run_directory.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; remove it, choose another --model_dir or pass "
            "--overwrite to start afresh") from err


def _check_same_data(run_dir: str, info: data_lib.DatasetInfo) -> None:
    """Refuses to resume a run on data other than its ``data.json`` records."""
    path = os.path.join(run_dir, DATA_FILE)
    if not os.path.lexists(path):
        return  # Older runs: the checkpoint's shapes are compared instead.
    try:
        saved = run_directory.DataFingerprint.from_json(run_directory.read_json(path), path)
    except run_directory.RunDirectoryError as err:
        raise SettingsError("model_dir", str(err)) from err
    differences = saved.differences(run_directory.DataFingerprint.from_info(info))
    if differences:
        raise SettingsError(
            "model_dir", f"{run_dir} holds a run trained on other data "
            f"({'; '.join(differences)}); rerun on the same data to resume it, "
            "choose another --model_dir, or pass --overwrite to start it afresh")


def _resume_error(run_dir: str, err: checkpointing.CheckpointError) -> SettingsError:
    return SettingsError(
        "model_dir", f"cannot resume {run_dir}: {err}; rerun with the data "
        "and settings it was trained with, choose another --model_dir, or pass "
        "--overwrite to start it afresh")


def _check_resumable(previous: TrainSettings, settings: TrainSettings) -> None:
    """Raises `SettingsError` when ``settings`` would change the run's result."""
    old, new = previous.to_json(), settings.to_json()
    changed = [k for k in new if k not in RESUME_SAFE_FIELDS and old[k] != new[k]]
    if changed:
        differences = ", ".join(f"--{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        raise SettingsError(
            "model_dir",
            f"{settings.model_dir} holds a run with other settings ({differences}); "
            "rerun with its settings to resume it, choose another --model_dir, "
            "or pass --overwrite to start it afresh")


def _computed_settings(settings: TrainSettings) -> dict:
    """The settings that change what a run computes (all but `RESUME_SAFE_FIELDS`)."""
    return {k: v for k, v in settings.to_json().items() if k not in RESUME_SAFE_FIELDS}


def _remove_run_files(run_dir: str) -> None:
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        # A symbolic link is removed, never followed.
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _truncate_history(path: str, first_epoch: int) -> None:
    """Drops the rows of 0-based epochs ``>= first_epoch``, which are trained again.

    The ``epoch`` column numbers epochs from 1 (`callbacks_lib.HistoryCSV`).

    A killed run may have logged an epoch whose checkpoint it did not write,
    or half a row.

    Raises:
        SettingsError: the file is not a history (`run_directory.read_history`).
    """
    try:
        rows = run_directory.read_history(path)
    except run_directory.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; move it away to resume without it") from err
    if rows is None:
        if os.path.lexists(path):
            os.remove(path)
        return
    column = rows[0].index("epoch")
    kept = [
        row for row in rows[1:]
        if len(row) == len(rows[0]) and row[column].isdigit()
        and int(row[column]) <= first_epoch
    ]
    if not kept:
        os.remove(path)
        return
    text = io.StringIO()
    csv.writer(text).writerows([rows[0], *kept])
    write_atomically(path, text.getvalue())


def _save_model(model: SelfKDModel, path: str) -> None:
    # Keras insists on the .keras suffix, so the temporary name keeps it; a
    # fresh name (not one a planted link could anticipate) and no Ctrl-C
    # half-way leave either the old file or the new one.
    fd, temporary = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=".", suffix=f"-{MODEL_FILE}")
    os.close(fd)
    try:
        with checkpointing.uninterrupted():
            model.save(temporary)
            os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


# -- training -----------------------------------------------------------------


def _resolved(settings: TrainSettings) -> TrainSettings:
    """Validated, with absolute paths and the default ``model_dir`` filled in."""
    settings.validate()
    kind, colon, path = settings.dataset.partition(":")
    dataset = f"{kind}:{os.path.abspath(os.path.expanduser(path))}" if colon else kind
    model_dir = settings.model_dir or settings.default_model_dir()
    return dataclasses.replace(
        settings, dataset=dataset, model_dir=os.path.abspath(model_dir))


def seed_everything(settings: TrainSettings) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras; optionally deterministic ops."""
    keras.utils.set_random_seed(settings.seed)
    if settings.deterministic:
        tf.config.experimental.enable_op_determinism()


def _callbacks(settings: TrainSettings, saver: checkpointing.CheckpointCallback) -> list:
    # Order matters at epoch end. SoftTargetRefresh comes first (fit moves
    # it there), so the table is refreshed before anything is saved; its
    # schedule length is explicit because a resumed run fits in segments.
    # The timer adds epoch_time_s to the logs the loggers write. The
    # checkpoint comes last, after the CSV row, so a kill in between makes
    # the resumed run log that epoch again (the stale row is dropped by
    # _truncate_history) rather than never.
    run_dir = settings.model_dir
    return [
        callbacks_lib.SoftTargetRefresh(epochs=settings.epochs),
        callbacks_lib.EpochTimer(),
        # Given here rather than added by fit, so it finishes the epoch's bar
        # before EpochSummary prints.
        keras.callbacks.ProgbarLogger(),
        callbacks_lib.HistoryCSV(os.path.join(run_dir, HISTORY_FILE), append=True),
        callbacks_lib.EpochTensorBoard(
            os.path.join(run_dir, TENSORBOARD_DIR), write_graph=False,
            profile_batch=0),
        callbacks_lib.EpochSummary(),
        keras.callbacks.TerminateOnNaN(),
        saver,
    ]


class _StopAfterEpoch(keras.callbacks.Callback):
    """Ends `fit` after ``epoch``: the resumed epoch is a segment of its own."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True


def _fit(model, settings, train_ds, eval_ds, steps, start, callbacks, saver) -> None:
    """Trains from checkpoint position ``start`` to the last epoch.

    A run resumed mid-epoch first finishes that epoch alone, skipping the
    batches already trained on (the data of an epoch is a pure function of
    the seed and the epoch), then trains the remaining epochs. Both segments
    are fits over all ``settings.epochs``, so callbacks see the true epoch
    count.
    """
    segments = []
    if start.step:
        segments.append((train_ds.skip(start.step), start.epoch, steps - start.step,
                         [_StopAfterEpoch(start.epoch)]))
        train_ds = train_ds.skip(steps)
    first = start.epoch + 1 if start.step else start.epoch
    if first < settings.epochs:
        segments.append((train_ds, first, steps, []))
    for data, initial_epoch, steps_per_epoch, extra in segments:
        model.fit(
            data, validation_data=eval_ds, initial_epoch=initial_epoch,
            epochs=settings.epochs, steps_per_epoch=steps_per_epoch,
            validation_freq=evaluation_epochs(settings.epochs, settings.eval_every),
            callbacks=callbacks + extra, verbose=1, shuffle=False,
        )
        if saver.diverged_at is not None:
            return


def evaluation_epochs(epochs: int, every: int) -> list[int]:
    """1-based epochs after which `fit` evaluates: the first, every ``every``-th
    and the last.

    The first is included because `keras.callbacks.CSVLogger` fixes its
    columns at the first epoch's end; without it the ``val_`` columns would
    be missing from ``history.csv``.

    >>> evaluation_epochs(10, 4)
    [1, 4, 8, 10]
    """
    return sorted({1, epochs, *range(every, epochs + 1, every)})


def _divergence_message(saver: checkpointing.CheckpointCallback, directory: str) -> str:
    epoch, step = saver.diverged_at
    last = saver.last_saved
    if last is None:
        kept = "no checkpoint had been written"
    elif last.step:
        kept = f"the last good checkpoint (epoch {last.epoch + 1}, step {last.step}) is kept in {directory}"
    else:
        kept = f"the last good checkpoint (end of epoch {last.epoch}) is kept in {directory}"
    return (f"the loss became NaN or infinite at epoch {epoch + 1}, step {step}; "
            f"training stopped and {kept}")


def _interruption_message(saver: checkpointing.CheckpointCallback) -> str:
    now, last = saver.position, saver.last_saved
    if last is None:
        since = "from the start: no checkpoint had been written"
    elif last.step:
        since = f"from the checkpoint at epoch {last.epoch + 1}, step {last.step}"
    else:
        since = f"from the checkpoint at the end of epoch {last.epoch}"
    return (f"interrupted at epoch {now.epoch + 1} step {now.step}; rerun the "
            f"same command to resume ({since})")


def train(settings: TrainSettings) -> dict:
    """Runs, resumes or (when finished) reads the run in ``settings.model_dir``.

    Nothing is written before the settings, the data, the model and the run
    directory (its files, and for a resumed run its data record and
    checkpoint) have been checked, so an invalid setting leaves no trace.

    Returns:
        The ``metrics.json`` record.

    Raises:
        SettingsError: invalid settings, unreadable data, or a run directory
            holding a run with other settings or other data, or unreadable
            or hostile files (and no ``overwrite``).
        TrainingDivergedError: the loss became NaN or infinite.
        TrainingInterrupted: Ctrl-C during training; the checkpoints are
            whole, and running `train` again resumes from the latest.
    """
    settings = _resolved(settings)
    run_dir = settings.model_dir
    if not settings.overwrite:
        _check_run_directory(run_dir)
    previous = None if settings.overwrite else _read_settings(run_dir)
    if previous is None and not settings.overwrite and any(
            os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES):
        raise SettingsError(
            "model_dir", f"{run_dir} holds run files but no {FLAGS_FILE}; choose "
            "another --model_dir or pass --overwrite to start afresh")
    if previous is not None:
        _check_resumable(previous, settings)
        metrics_path = os.path.join(run_dir, METRICS_FILE)
        if os.path.lexists(metrics_path):
            record = _read_metrics(metrics_path)
            print(f"{run_dir} has finished; its metrics are in {metrics_path}.")
            return record
    checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
    try:
        resumed = checkpointing.read_position(checkpoint_dir) if previous else None
    except checkpointing.CheckpointError as err:
        raise _resume_error(run_dir, err) from err
    start = resumed or checkpointing.Position()

    seed_everything(settings)
    with _as_settings_error():
        strategy = distribute_lib.make_strategy(settings.distribute)
        cluster.check_workers_agree(strategy, _computed_settings(settings), start)
    train_ds, eval_ds, info = build_datasets(
        settings, initial_epoch=min(start.epoch, settings.epochs - 1))
    with strategy.scope():
        model = build_model(settings, info)
        compile_model(model, settings, info.steps_per_epoch)
        model.optimizer.build(model.trainable_variables)
    if resumed:
        _check_same_data(run_dir, info)
        try:
            checkpointing.TrainingCheckpoint(model, checkpoint_dir).restore_latest()
        except checkpointing.CheckpointError as err:
            raise _resume_error(run_dir, err) from err

    # Reads come from run_dir; this worker's writes go to out_dir (run_dir
    # on the chief, a throw-away folder on the other workers of a cluster).
    out_dir = cluster.worker_directory(run_dir, strategy)
    if settings.overwrite:
        _remove_run_files(out_dir)
    # Checks history.csv before anything else is written.
    _truncate_history(os.path.join(out_dir, HISTORY_FILE), start.epoch)
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, FLAGS_FILE),
                      json.dumps(settings.to_json(), indent=2) + "\n")
    write_atomically(os.path.join(out_dir, DATA_FILE), json.dumps(
        run_directory.DataFingerprint.from_info(info).to_json(), indent=2) + "\n")
    checkpoint = checkpointing.TrainingCheckpoint(
        model, os.path.join(out_dir, CHECKPOINT_DIR))
    if resumed:
        print(f"Resuming {run_dir} at epoch {start.epoch + 1}, step {start.step} "
              f"of {info.steps_per_epoch}." if start.epoch < settings.epochs else
              f"{run_dir} has finished training; saving and evaluating it.")

    saver = checkpointing.CheckpointCallback(
        checkpoint, steps_per_epoch=info.steps_per_epoch,
        save_every_steps=settings.save_every_steps, start=start)
    try:
        _fit(model, settings, train_ds, eval_ds, info.steps_per_epoch, start,
             _callbacks(dataclasses.replace(settings, model_dir=out_dir), saver), saver)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interruption_message(saver)) from None
    if saver.diverged_at is not None:
        raise TrainingDivergedError(_divergence_message(saver, checkpoint_dir))

    _save_model(model, os.path.join(out_dir, MODEL_FILE))
    record = evaluate_model(
        model, eval_ds, dataset_name=info.name, split=info.eval_split,
        arch=settings.arch, methods=settings.methods,
        train_time_s=saver.train_time_s(), epochs=settings.epochs,
    )
    metrics_lib.write_metrics_json(record, os.path.join(out_dir, METRICS_FILE))
    return record
