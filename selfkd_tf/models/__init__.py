"""Multi-exit image classifiers: backbones, exit heads, the multi-exit contract, costs."""

from selfkd_tf.models.conversion import convert_layers
from selfkd_tf.models.conversion import upgrade_layers
from selfkd_tf.models.costs import ExitCosts
from selfkd_tf.models.costs import count_flops
from selfkd_tf.models.costs import count_parameters
from selfkd_tf.models.costs import exit_costs
from selfkd_tf.models.exit_heads import EXIT_HEADS
from selfkd_tf.models.multi_exit import ExitSegments
from selfkd_tf.models.multi_exit import as_multi_exit
from selfkd_tf.models.multi_exit import attach_exits
from selfkd_tf.models.multi_exit import check_multi_exit
from selfkd_tf.models.multi_exit import exit_model
from selfkd_tf.models.multi_exit import exit_segments
from selfkd_tf.models.resnet import ARCHITECTURES
from selfkd_tf.models.resnet import build_multi_exit_resnet
from selfkd_tf.models.stages import Stage
from selfkd_tf.models.stages import find_stages
