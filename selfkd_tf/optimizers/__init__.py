"""The paper's optimiser: SGD with PyTorch's momentum and its learning-rate schedules."""

from selfkd_tf.optimizers.schedules import LR_SCHEDULES
from selfkd_tf.optimizers.schedules import learning_rate_schedule
from selfkd_tf.optimizers.schedules import make_optimizer
from selfkd_tf.optimizers.sgd import SGD
from selfkd_tf.optimizers.sgd import convert_momentum
from selfkd_tf.optimizers.sgd import momentum_holds_rate
from selfkd_tf.optimizers.sgd import sgd_with_momentum
from selfkd_tf.optimizers.weight_decay import DECAY_EXCLUSIONS
from selfkd_tf.optimizers.weight_decay import decayed_variables
