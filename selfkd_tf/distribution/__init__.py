"""Training on several devices and machines: strategies, clusters, uneven replica shares."""

from selfkd_tf.distribution.strategy import PRECISIONS
from selfkd_tf.distribution.strategy import STRATEGIES
from selfkd_tf.distribution.strategy import make_strategy
from selfkd_tf.distribution.strategy import set_mixed_precision
