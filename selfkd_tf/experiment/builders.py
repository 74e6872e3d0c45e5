"""A run's data, model and optimizer, built from its `TrainSettings`.

The one place models are built from settings: training
(`selfkd_tf.experiment.training.train`), evaluation
(`selfkd_tf.experiment.trained`), tuning (`selfkd_tf.tuning.search`) and the
benchmarks in ``tools/`` all call it, so they build the same things from the
same settings.

Example:

```python
seed_everything(settings)
train_ds, eval_ds, info = build_datasets(settings)
model = build_model(settings, info)
compile_model(model, settings, info.steps_per_epoch)
```
"""

from __future__ import annotations

import keras
import tensorflow as tf

from selfkd_tf import data as data_lib
from selfkd_tf.distribution import strategy as distribute_lib
from selfkd_tf import models
from selfkd_tf.models import applications, primitives
from selfkd_tf.errors import SettingsError
from selfkd_tf.optimizers import make_optimizer
from selfkd_tf.experiment.settings import TrainSettings, as_settings_error
from selfkd_tf.distillation.model import SelfKDModel


def build_datasets(
    settings: TrainSettings, initial_epoch: int = 0, eval_split: str | None = None,
    share: data_lib.WorkerShare | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, data_lib.DatasetInfo]:
    """The training and evaluation datasets of a run.

    The training dataset holds epochs ``initial_epoch .. epochs - 1`` back to
    back, `info.steps_per_epoch` batches each, so `fit` needs
    ``steps_per_epoch=info.steps_per_epoch``. ``eval_split`` and ``share``
    (one worker's part) are as in `selfkd_tf.data.make_datasets`.

    Raises:
        SettingsError: the data cannot be read or a data setting is invalid.
    """
    with as_settings_error():
        return data_lib.make_datasets(
            settings.dataset, data_dir=settings.data_dir,
            batch_size=settings.batch_size,
            augmentation=settings.effective_augmentation(), cache=settings.cache,
            normalization=data_normalization(settings),
            validation_fraction=settings.validation_fraction,
            train_examples=settings.train_examples,
            eval_examples=settings.eval_examples, seed=settings.seed,
            subset_seed=settings.subset_seed,
            epochs=settings.epochs, initial_epoch=initial_epoch,
            image_size=settings.image_size, eval_split=eval_split, share=share,
        )


def data_normalization(settings: TrainSettings) -> str | tuple:
    """The ``normalization`` `selfkd_tf.data.make_datasets` applies for the run.

    ``"auto"``: what the backbone family expects (`selfkd_tf.models.applications`),
    otherwise ``"dataset"``.

    Raises:
        SettingsError: ``dataset`` or ``imagenet`` asked of a family that
            rescales 0..255 pixels itself, which would normalise twice.
    """
    family = None
    if applications.is_foreign(settings.arch):
        with as_settings_error():
            family = applications.input_normalization(settings.arch)
    if settings.normalization == "auto":
        return (family.mean, family.std) if family else "dataset"
    if family and all(abs(std * 255.0 - 1.0) < 1e-6 for std in family.std):
        raise SettingsError(
            "normalization", f"{settings.arch} rescales 0..255 pixels itself; "
            f"--normalization={settings.normalization} would normalise them twice: leave "
            "it auto")
    return settings.normalization


def build_backbone(settings: TrainSettings, num_classes: int,
                   image_shape: tuple[int, int, int]) -> keras.Model:
    """The run's multi-exit network for ``num_classes`` classes of ``image_shape`` images.

    A built-in ResNet, or a backbone of the user's (`selfkd_tf.models.applications`)
    with exits attached (`selfkd_tf.models.attach_exits`). Either gets this
    library's convolutions and the run's batch-norm momentum and
    synchronisation (`selfkd_tf.models.convert_layers`).

    Raises:
        SettingsError: the architecture's settings cannot build it.
    """
    with as_settings_error():
        if not applications.is_foreign(settings.arch):
            backbone = models.build_multi_exit_resnet(
                settings.arch, num_classes, input_shape=image_shape,
                num_stages=settings.num_stages, exit_head=settings.exit_head,
                width_multiplier=settings.width_multiplier,
                sync_batchnorm=settings.sync_batchnorm, stem=settings.stem,
            )
            if settings.batchnorm_momentum == primitives.BN_MOMENTUM:
                return backbone
            return models.convert_layers(backbone,
                                         batchnorm_momentum=settings.batchnorm_momentum,
                                         sync_batchnorm=settings.sync_batchnorm)
        trunk = applications.build_foreign_backbone(
            settings.arch, image_shape, settings.backbone_weights)
        backbone = models.attach_exits(
            trunk, num_classes, exits=parse_exits(settings.exits),
            exit_head=settings.exit_head or FOREIGN_EXIT_HEAD, image_shape=image_shape,
            sync_batchnorm=settings.sync_batchnorm)
        return models.convert_layers(backbone, batchnorm_momentum=settings.batchnorm_momentum,
                                     sync_batchnorm=settings.sync_batchnorm)


FOREIGN_EXIT_HEAD = "pooled"
"""The exit head of a backbone of the user's when ``--exit_head`` is left
out: the cheap one (a bottleneck head costs millions of weights per exit on
a 2048-wide network)."""


def parse_exits(text: str) -> str | int | list[str]:
    """``--exits`` as `selfkd_tf.models.attach_exits` takes it: ``"auto"``,
    a number, or a list of references."""
    text = text.strip()
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    return [reference.strip() for reference in text.split(",")]


def build_model(settings: TrainSettings, info: data_lib.DatasetInfo) -> SelfKDModel:
    """An uncompiled `SelfKDModel` for the data described by ``info``.

    Sets Keras's global dtype policy from ``settings.mixed_precision`` first.
    Call it inside the distribution strategy's scope.

    Raises:
        SettingsError: a setting the model refuses.
    """
    with as_settings_error():
        distribute_lib.set_mixed_precision(settings.mixed_precision)
    backbone = build_backbone(settings, info.num_classes, info.image_shape)
    with as_settings_error():
        return SelfKDModel(
            backbone, num_train_examples=info.num_train,
            config=settings.selfkd_config(), weight_decay=settings.weight_decay,
            weight_decay_exclude=settings.weight_decay_exclude,
            table_dtype=settings.table_dtype, table_top_k=settings.table_top_k,
            input_mean=info.mean,
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


def seed_everything(settings: TrainSettings) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras; optionally deterministic ops."""
    keras.utils.set_random_seed(settings.seed)
    if settings.deterministic:
        tf.config.experimental.enable_op_determinism()
