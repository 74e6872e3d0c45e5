"""`TrainSettings`: every knob of a training run, and `SettingsError`.

The field names of `TrainSettings` are the ``selfkd-train`` flag names
(`selfkd_tf.cli.flags`); a run directory keeps the resolved settings in its
``flags.json`` (`read_settings`). Problems with a setting, wherever they are
found (here, while reading data, or in a library call at start-up), are a
`SettingsError` with a one-line message that names the flag.

Example:

```python
settings = TrainSettings(dataset="digits", width_multiplier=0.25, epochs=10)
settings.validate()
read_settings("runs/a")  # None when runs/a has no flags.json
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import typing

import numpy as np

from selfkd_tf import data as data_lib
from selfkd_tf.distillation.config import (
    CONTROLS, DMFL_GRADIENTS, METHODS, PSKD_TEACHERS, SelfKDConfig)
from selfkd_tf.optimizers.weight_decay import DECAY_EXCLUSIONS
from selfkd_tf.distillation.pskd import TABLE_DTYPES
from selfkd_tf.distribution import strategy as distribute_lib
from selfkd_tf.errors import SettingsError
from selfkd_tf.models import ARCHITECTURES, EXIT_HEADS, applications
from selfkd_tf.models.resnet import NUM_STAGES_CHOICES as NUM_STAGES
from selfkd_tf.models.resnet import STEMS
from selfkd_tf.optimizers import LR_SCHEDULES
from selfkd_tf.rundir import reading
from selfkd_tf.rundir.layout import FLAGS_FILE


MAX_SEED = 2**32 - 1
"""Largest ``seed`` and ``subset_seed``: `keras.utils.set_random_seed` seeds
NumPy's global generator, which takes 32 bits."""
MAX_EPOCHS = 1_000_000
"""Largest ``epochs``: the paper trains 300; the epochs to evaluate after
are listed in memory (2^31 epochs ran out of it)."""
MAX_BATCH_SIZE = 2**31 - 1
"""Largest ``batch_size``: a batch larger than the split holds the whole
split; TensorFlow indexes batches with 64-bit integers, which 2^63 overflowed."""
MAX_IMAGE_SIZE = 4096
"""Largest ``image_size``: a batch of images this size is 50 MB an image."""
MAX_WIDTH_MULTIPLIER = 16.0
"""Largest ``width_multiplier``: 16 makes ResNet-18's widest stage 8,192
channels (600 million weights in one of its convolutions)."""
TEMPERATURES = (0.01, 100.0)
"""Lowest and highest ``temperature``. Distillation softens with 1 to 20;
far outside, float32 loses the distillation term (``--temperature=1e30``
trained to NaN; for a tiny one, ``T^2 KL`` underflows to 0)."""
_FLOAT32 = np.finfo(np.float32)


def _setting(default, help: str):  # noqa: A002 - the absl keyword
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run; the field names are the flag names.

    `validate` checks what can be checked without data; the dataset knobs
    (``dataset``, ``normalization``, ``image_size``, ...) are checked when
    `selfkd_tf.experiment.builders.build_datasets` reads the data.

    Example:

    >>> s = TrainSettings(dataset="npz:/tmp/x.npz", methods=("pskd",), epochs=5)
    >>> TrainSettings.from_json(s.to_json()) == s
    True
    """

    # Data.
    dataset: str = _setting(
        "cifar100", "digits (embedded, no download), cifar10, cifar100 (TFDS), "
        "imagenet2012 (TFDS, its files downloaded by hand), cifar:PATH (python "
        "pickles), folder:PATH (PATH/{train,test}/<class>/*.jpg) or npz:PATH.")
    data_dir: str | None = _setting(
        None, "TFDS data directory (cifar10, cifar100, imagenet2012).")
    normalization: str = _setting(
        "auto", "auto (what a keras.applications or keras-hub backbone expects, "
        "otherwise dataset), dataset (published CIFAR or training-split statistics) "
        "or imagenet.")
    augment: bool = _setting(
        True, "Augment the training images; --noaugment is --augmentation=none.")
    augmentation: str = _setting(
        "cifar", "cifar (random crop of the image padded by 4, horizontal flip), "
        "imagenet (random-resized crop, flip, colour jitter, lighting; evaluation: "
        "resize and centre crop; images of any size) or none.")
    image_size: int | None = _setting(
        None, "Resize every image to this size (augmentation=imagenet: crop to "
        "it; default 224).")
    cache: str = _setting(
        "auto", "auto (decode folder:/TFDS images once into memory when they take "
        "at most 256 MB, else read them from their files as training goes), "
        "memory or none.")
    train_examples: int | None = _setting(
        None, "Use a stratified subset of at most this many training examples "
        "(all of them when the split holds fewer: a line says so, and "
        "flags.json records the number used).")
    eval_examples: int | None = _setting(
        None, "Use a stratified subset of at most this many evaluation "
        "examples, likewise.")
    subset_seed: int | None = _setting(
        None, "Seed of the validation split and of the train_examples/"
        "eval_examples subsets; default: --seed. Fix it to compare seeds on "
        "one subset.")
    validation_fraction: float = _setting(
        0.0, "Hold out this fraction of the training set and evaluate on it "
        "instead of the test split.")
    # Model.
    arch: str = _setting(
        "resnet18", f"One of {', '.join(ARCHITECTURES)}; keras.applications.<Name> "
        "(e.g. keras.applications.MobileNetV3Small); kerashub:<preset directory>; or "
        "a saved functional backbone, PATH.keras.")
    exits: str = _setting(
        "auto", "Where the exits attach to a keras.applications, kerashub or .keras "
        "backbone: auto (one per stage, up to 4 exits), a number of exits (the deepest "
        "included), or a comma list of the references --list_stages prints, shallowest "
        "first. The ResNets have one exit per stage (--num_stages).")
    exit_head: str | None = _setting(
        None, f"One of {', '.join(EXIT_HEADS)}; default: attention for "
        "resnext50_32x4d, pooled for keras.applications, kerashub and .keras "
        "backbones, bottleneck otherwise.")
    backbone_weights: str = _setting(
        "none", "Initial weights of a keras.applications, kerashub or .keras backbone: "
        "none (random), imagenet (keras.applications; a download), preset (the "
        "kerashub preset's own) or PATH of a .weights.h5/.h5 file.")
    batchnorm_momentum: float = _setting(
        0.9, "Momentum of every batch norm, in Keras's convention (the running "
        "average's weight; PyTorch's 0.1 is 0.9). keras.applications families use "
        "0.99 to 0.999, whose statistics lag behind the weights in short runs.")
    stem: str = _setting(
        "auto", "cifar (3x3 convolution), imagenet (7x7 stride-2 convolution and "
        "max-pooling) or auto (imagenet for images of at least 128 pixels).")
    num_stages: int = _setting(
        4, "Backbone stages kept, one exit after each (Table 4 ablation): "
        f"{', '.join(map(str, NUM_STAGES))}.")
    width_multiplier: float = _setting(1.0, "Scales every channel count.")
    sync_batchnorm: bool = _setting(
        False, "Synchronise batch-norm statistics across replicas.")
    # Objective.
    methods: tuple[str, ...] = _setting(
        METHODS, f"Comma list of the methods {', '.join(METHODS)} and the controls "
        f"{', '.join(CONTROLS)} (label smoothing, deep supervision); empty for "
        "the baseline. ls is refused with pskd, ds with byot.")
    pskd_alpha: float = _setting(0.8, "PS-KD: final weight a_T of the self-teacher.")
    pskd_teacher: str = _setting(
        "deepest", f"PS-KD teacher: {', '.join(PSKD_TEACHERS)}.")
    label_smoothing: float = _setting(
        0.1, "ls: eps of the smoothed label (1 - eps) onehot + eps / classes, in [0, 1).")
    byot_alpha: float = _setting(
        0.1, "BYOT: weight a of the distillation term (ds: its cross-entropies "
        "weigh 1 - a, as BYOT's).")
    byot_lambda: float = _setting(1e-6, "BYOT: weight of the feature hint term.")
    temperature: float = _setting(
        3.0, f"BYOT: softening temperature, in [{TEMPERATURES[0]:g}, {TEMPERATURES[1]:g}].")
    byot_exits: tuple[int, ...] | None = _setting(
        None, "BYOT: comma list of the shallow exits distilled, 1-based "
        "(Table 3 ablation); default: all shallow exits.")
    dmfl_gradient: str = _setting(
        "mutual", f"DMFL gradient: {', '.join(DMFL_GRADIENTS)}.")
    # Optimisation.
    epochs: int = _setting(300, "Training epochs.")
    batch_size: int = _setting(128, "Global batch size.")
    lr: float = _setting(0.1, "Initial learning rate.")
    momentum: float = _setting(0.9, "SGD momentum.")
    nesterov: bool = _setting(True, "Nesterov momentum.")
    weight_decay: float = _setting(5e-4, "Coupled L2 weight decay.")
    weight_decay_exclude: tuple[str, ...] = _setting(
        (), f"Comma list of weights the decay leaves out: {', '.join(DECAY_EXCLUSIONS)} "
        "(ConvNeXt and ViT recipes leave out all three); default: decay every "
        "trainable weight, as the paper.")
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
    table_top_k: int | None = _setting(
        None, "PS-KD table: keep each sample's K largest probabilities and their "
        "classes (the rest of the mass spread over the other classes); default: all "
        "classes.")
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

    def effective_augmentation(self) -> str:
        """``augmentation``, or ``"none"`` under ``--noaugment``."""
        return self.augmentation if self.augment else "none"

    def selfkd_config(self) -> SelfKDConfig:
        """The objective's configuration."""
        return SelfKDConfig(
            methods=tuple(self.methods), pskd_alpha=self.pskd_alpha,
            pskd_teacher=self.pskd_teacher, label_smoothing=self.label_smoothing,
            byot_alpha=self.byot_alpha,
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
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float):
                check_float32(field.name, value)
        if not self.dataset:
            raise SettingsError(
                "dataset", "missing; allowed: digits, cifar10, cifar100, cifar:PATH, "
                "folder:PATH, npz:PATH")
        if applications.is_foreign(self.arch):
            with as_settings_error():
                applications.check_arch(self.arch)
            # The ResNets' own shape flags would be ignored silently.
            for name, default, instead in (("width_multiplier", 1.0, "the backbone's own"),
                                           ("num_stages", 4, "--exits"),
                                           ("stem", "auto", "the backbone's own")):
                if getattr(self, name) != default:
                    raise SettingsError(
                        name, f"got {getattr(self, name)}; it shapes the ResNets only; "
                        f"for {self.arch} use {instead}")
        else:
            check_choice("arch", self.arch, ARCHITECTURES)
            if self.exits != "auto":
                raise SettingsError(
                    "exits", f"got {self.exits!r}; the ResNets have one exit per stage "
                    "(--num_stages); --exits applies to keras.applications, kerashub and "
                    ".keras backbones")
            if self.backbone_weights != applications.WEIGHTS_NONE:
                raise SettingsError(
                    "backbone_weights", f"got {self.backbone_weights!r}; the ResNets "
                    "start from random weights (resume a run to continue one)")
        if not self.exits:
            raise SettingsError("exits", "empty; allowed: auto, a number or references")
        if not 0 <= self.batchnorm_momentum < 1:
            raise SettingsError(
                "batchnorm_momentum", f"got {self.batchnorm_momentum}; allowed: [0, 1)")
        for exclusion in self.weight_decay_exclude:
            check_choice("weight_decay_exclude", exclusion, DECAY_EXCLUSIONS)
        check_choice("stem", self.stem, STEMS)
        check_choice("augmentation", self.augmentation, data_lib.AUGMENTATIONS)
        if not self.augment and self.augmentation not in ("cifar", "none"):
            raise SettingsError(
                "augment", f"--noaugment contradicts --augmentation={self.augmentation}; "
                "give one of them")
        check_choice("cache", self.cache, data_lib.CACHE_MODES)
        if self.exit_head is not None:
            check_choice("exit_head", self.exit_head, EXIT_HEADS)
        check_choice("num_stages", self.num_stages, NUM_STAGES)
        if not 0 < self.width_multiplier <= MAX_WIDTH_MULTIPLIER:
            raise SettingsError(
                "width_multiplier", f"got {self.width_multiplier}; allowed: "
                f"(0, {MAX_WIDTH_MULTIPLIER:g}]")
        if self.image_size is not None:
            _check_integer("image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        for name in ("train_examples", "eval_examples"):
            if getattr(self, name) is not None:
                _check_integer(name, getattr(self, name), 1)
        low, high = TEMPERATURES
        if not low <= self.temperature <= high:
            raise SettingsError(
                "temperature", f"got {self.temperature}; allowed: [{low:g}, {high:g}]")
        if not applications.is_foreign(self.arch):
            # A backbone of one's own has its exits counted once it is built.
            with as_settings_error():
                self.selfkd_config().shallow_byot_exits(self.num_stages)
        _check_integer("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_integer("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if not self.lr > 0:
            raise SettingsError("lr", f"got {self.lr}; allowed: > 0")
        if not 0 <= self.momentum < 1:
            raise SettingsError("momentum", f"got {self.momentum}; allowed: [0, 1)")
        if not self.weight_decay >= 0:
            raise SettingsError(
                "weight_decay", f"got {self.weight_decay}; allowed: >= 0")
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_integer("seed", self.seed, 0, MAX_SEED)
        check_choice("distribute", self.distribute, distribute_lib.STRATEGIES)
        check_choice("mixed_precision", self.mixed_precision, distribute_lib.PRECISIONS)
        check_choice("table_dtype", self.table_dtype, TABLE_DTYPES)
        if self.table_top_k is not None:
            _check_integer("table_top_k", self.table_top_k, 1)
            if "pskd" not in self.methods:
                raise SettingsError(
                    "table_top_k", f"shapes PS-KD's table; --methods={','.join(self.methods)} "
                    "keeps none")
        if self.subset_seed is not None:
            _check_integer("subset_seed", self.subset_seed, 0, MAX_SEED)
        _check_integer("eval_every", self.eval_every, 1)
        _check_integer("save_every_steps", self.save_every_steps, 0)

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
        """Inverse of `to_json`; absent keys take their defaults, but for
        ``stem``: runs written before it existed used the CIFAR stem."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SettingsError(None, f"unknown settings {unknown}")
        values = {"stem": "cifar", **d}
        for key in ("methods", "byot_exits", "weight_decay_exclude"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def check_choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise SettingsError(
            flag, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _check_integer(flag: str, value, minimum: int, maximum: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        allowed = (f"integers >= {minimum}" if maximum is None
                   else f"integers in [{minimum}, {maximum}]")
        raise SettingsError(flag, f"got {value!r}; allowed: {allowed}")


def check_float32(flag: str, value: float) -> None:
    """Refuses a number that float32, in which training computes, cannot hold.

    Infinity passes every range check (inf > 0) and trains to NaN; beyond
    float32's largest number a setting becomes infinite, and a nonzero one
    below its smallest becomes 0 (``--lr=1e-46`` would freeze the weights).

    Raises:
        SettingsError: ``value`` is NaN or infinite, or float32 holds it as
            infinity, or as 0 when it is not 0.

    Example:

    >>> check_float32("lr", 1e-46)
    Traceback (most recent call last):
    ...
    selfkd_tf.errors.SettingsError: lr: got 1e-46, which float32 holds as 0; allowed: 0 or a magnitude of at least 1.401e-45
    """
    with np.errstate(over="ignore"):
        held = np.float32(value)
    if not math.isfinite(value) or np.isinf(held):
        raise SettingsError(
            flag, f"got {value}; allowed: finite numbers within float32's "
            f"range (magnitude at most {_FLOAT32.max:.4g})")
    if value and not held:
        raise SettingsError(
            flag, f"got {value}, which float32 holds as 0; allowed: 0 or a "
            f"magnitude of at least {_FLOAT32.smallest_subnormal:.4g}")


_FLAG_NAMES = frozenset(f.name for f in dataclasses.fields(TrainSettings))
# "`arch` must be ...", "epochs: ...", "batch_size must be ..." all name a flag.
_NAMED_FLAG = re.compile(r"^`?(\w+)`?:?\s+(.*)$", re.DOTALL)


@contextlib.contextmanager
def as_settings_error():
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


def read_settings(run_dir: str) -> TrainSettings | None:
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
        value = reading.read_json(path)
        if not isinstance(value, dict):
            raise SettingsError(None, "not a JSON object")
        settings = TrainSettings.from_json(value)
        hints = typing.get_type_hints(TrainSettings)
        wrong = [f"{k}={v!r}" for k, v in dataclasses.asdict(settings).items()
                 if not reading.fits_type(v, hints[k])]
        if wrong:
            raise SettingsError(None, f"values of the wrong type: {', '.join(wrong)}")
        settings.validate()
    except reading.RunDirectoryError as err:
        raise SettingsError("model_dir", str(err)) from err
    except (SettingsError, TypeError) as err:
        raise SettingsError("model_dir", f"unusable {path}: {err}") from err
    return settings
