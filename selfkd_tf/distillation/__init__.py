"""The self-distillation algorithm: its objective, PS-KD's soft targets and `SelfKDModel`."""

from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distillation.losses import byot_terms
from selfkd_tf.distillation.losses import dmfl_loss
from selfkd_tf.distillation.losses import selfkd_loss
from selfkd_tf.distillation.model import SelfKDModel
from selfkd_tf.distillation.pskd import SoftTargetRefresh
from selfkd_tf.distillation.pskd import SoftTargetTable
from selfkd_tf.distillation.pskd import pskd_alpha_at
from selfkd_tf.distillation.pskd import soft_targets
from selfkd_tf.distillation.pskd import teacher_probabilities
