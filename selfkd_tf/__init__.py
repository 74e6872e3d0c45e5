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

Layout: one concept, one subpackage. A part imports only parts of lower
layers:

| layer | part | what it holds |
| --- | --- | --- |
| 0 | errors | `SettingsError`, the error a command answers in one line |
| 0 | files | atomic writes, writable paths, path containment |
| 0 | registration | registering the Keras classes when Keras is imported |
| 1 | metrics | the paper's metrics (numpy) and the ``metrics.json`` record |
| 2 | rundir | run directories: file names, safe reading, the lock |
| 2 | models | backbones, exit heads, the multi-exit contract, costs |
| 2 | data | data sources, splits and tf.data pipelines |
| 2 | optimizers | SGD with PyTorch's momentum, learning-rate schedules |
| 2 | distribution | strategies, clusters, uneven replica shares |
| 3 | report | tables, figures and seed summaries of finished runs |
| 4 | distillation | the algorithm: objective, PS-KD soft targets, `SelfKDModel` |
| 5 | evaluation | scoring a model: probabilities, records, streaming metrics |
| 5 | serving | SavedModel exports and early-exit cascades |
| 6 | experiment | one run: settings, builders, training, resuming, trained runs |
| 7 | tuning | hyperparameter search |
| 8 | cli | the ``selfkd-*`` commands |

Rules: no import cycles; ``metrics``, ``rundir`` and ``report`` never
import TensorFlow; the distillation core never imports the experiment layer
(nor serving, tuning or the commands). A subpackage's ``__init__`` only
re-exports.
"""

import importlib

from selfkd_tf import registration

__version__ = "0.1.0"

_EXPORTS = {
    # models: backbones, the multi-exit contract, costs
    "ARCHITECTURES": "selfkd_tf.models",
    "EXIT_HEADS": "selfkd_tf.models",
    "as_multi_exit": "selfkd_tf.models",
    "attach_exits": "selfkd_tf.models",
    "build_multi_exit_resnet": "selfkd_tf.models",
    "check_multi_exit": "selfkd_tf.models",
    "convert_layers": "selfkd_tf.models",
    "count_flops": "selfkd_tf.models",
    "count_parameters": "selfkd_tf.models",
    "exit_costs": "selfkd_tf.models",
    "find_stages": "selfkd_tf.models",
    # metrics (numpy)
    "apply_temperature": "selfkd_tf.metrics",
    "fit_temperature": "selfkd_tf.metrics",
    # data
    "DataError": "selfkd_tf.data",
    "DatasetInfo": "selfkd_tf.data",
    "load_arrays": "selfkd_tf.data",
    "make_datasets": "selfkd_tf.data",
    # distillation: the algorithm
    "SelfKDConfig": "selfkd_tf.distillation",
    "SelfKDModel": "selfkd_tf.distillation",
    "SoftTargetRefresh": "selfkd_tf.distillation",
    "byot_terms": "selfkd_tf.distillation",
    "dmfl_loss": "selfkd_tf.distillation",
    "pskd_alpha_at": "selfkd_tf.distillation",
    "selfkd_loss": "selfkd_tf.distillation",
    "soft_targets": "selfkd_tf.distillation",
    # optimizers
    "SGD": "selfkd_tf.optimizers",
    "decayed_variables": "selfkd_tf.optimizers",
    "learning_rate_schedule": "selfkd_tf.optimizers",
    "make_optimizer": "selfkd_tf.optimizers",
    # evaluation
    "evaluate_model": "selfkd_tf.evaluation",
    "predict_exit_probabilities": "selfkd_tf.evaluation",
    # experiment: one run from settings
    "TrainSettings": "selfkd_tf.experiment",
    "load_trained_model": "selfkd_tf.experiment",
    "train": "selfkd_tf.experiment",
    # serving
    "EarlyExitCascade": "selfkd_tf.serving",
    "early_exit_curve": "selfkd_tf.serving",
    "export_saved_model": "selfkd_tf.serving",
    "measure_latency": "selfkd_tf.serving",
    "select_threshold": "selfkd_tf.serving",
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
