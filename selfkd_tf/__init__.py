"""selfkd_tf: progressive self-knowledge distillation with mutual learning.

One multi-exit network teaches itself: PS-KD soft targets from its own
previous-epoch predictions, BYOT distillation from the deepest exit into the
shallow ones, and DMFL mutual learning between shallow and deep features.

>>> import selfkd_tf as skd
>>> train, test, info = skd.make_datasets("cifar100", epochs=300)
>>> backbone = skd.build_multi_exit_resnet("resnet18", info.num_classes)
>>> model = skd.SelfKDModel(backbone, num_train_examples=info.num_train)
"""

from selfkd_tf.callbacks import SoftTargetRefresh
from selfkd_tf.data import DataError, DatasetInfo, load_arrays, make_datasets
from selfkd_tf.losses import (
    SelfKDConfig,
    byot_terms,
    dmfl_loss,
    pskd_alpha_at,
    selfkd_loss,
    soft_targets,
)
from selfkd_tf.models import ARCHITECTURES, EXIT_HEADS, build_multi_exit_resnet
from selfkd_tf.training import SelfKDModel, learning_rate_schedule, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "EXIT_HEADS",
    "DataError",
    "DatasetInfo",
    "SelfKDConfig",
    "SelfKDModel",
    "SoftTargetRefresh",
    "build_multi_exit_resnet",
    "byot_terms",
    "dmfl_loss",
    "learning_rate_schedule",
    "load_arrays",
    "make_datasets",
    "make_optimizer",
    "pskd_alpha_at",
    "selfkd_loss",
    "soft_targets",
]
