"""selfkd_tf: progressive self-knowledge distillation with mutual learning.

One multi-exit network teaches itself: PS-KD soft targets from its own
previous-epoch predictions, BYOT distillation from the deepest exit into the
shallow ones, and DMFL mutual learning between shallow and deep features.

>>> import selfkd_tf as skd
>>> train, test, info = skd.make_datasets("cifar100", epochs=300)
>>> backbone = skd.build_multi_exit_resnet("resnet18", info.num_classes)
>>> model = skd.SelfKDModel(backbone, num_train_examples=info.num_train)

The names below are imported on first use, so tools that need no
TensorFlow (``selfkd-report``) start without loading it. The Keras classes
a saved model refers to (`SelfKDModel`, its layers and metrics) are
registered as soon as both this package and Keras are imported, in either
order, so ``keras.saving.load_model("run/model.keras")`` works after
``import selfkd_tf``.
"""

import importlib

from selfkd_tf import registration

__version__ = "0.1.0"

_EXPORTS = {
    "SoftTargetRefresh": "selfkd_tf.callbacks",
    "DataError": "selfkd_tf.data",
    "DatasetInfo": "selfkd_tf.data",
    "load_arrays": "selfkd_tf.data",
    "make_datasets": "selfkd_tf.data",
    "SelfKDConfig": "selfkd_tf.losses",
    "byot_terms": "selfkd_tf.losses",
    "dmfl_loss": "selfkd_tf.losses",
    "pskd_alpha_at": "selfkd_tf.losses",
    "selfkd_loss": "selfkd_tf.losses",
    "soft_targets": "selfkd_tf.losses",
    "ARCHITECTURES": "selfkd_tf.models",
    "EXIT_HEADS": "selfkd_tf.models",
    "build_multi_exit_resnet": "selfkd_tf.models",
    "SelfKDModel": "selfkd_tf.training",
    "SGD": "selfkd_tf.optimizers",
    "learning_rate_schedule": "selfkd_tf.optimizers",
    "make_optimizer": "selfkd_tf.optimizers",
    "TrainSettings": "selfkd_tf.settings",
    "train": "selfkd_tf.experiment",
    "EarlyExitCascade": "selfkd_tf.cascade",
    "early_exit_curve": "selfkd_tf.early_exit",
    "measure_latency": "selfkd_tf.early_exit",
    "select_threshold": "selfkd_tf.early_exit",
    "exit_costs": "selfkd_tf.export",
    "export_saved_model": "selfkd_tf.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'selfkd_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


registration.register_on_keras_import()
