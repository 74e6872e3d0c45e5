"""Multi-exit image classifiers for self-knowledge distillation."""

from selfkd_tf.models.exit_heads import EXIT_HEADS
from selfkd_tf.models.primitives import upgrade_convolutions
from selfkd_tf.models.resnet import ARCHITECTURES
from selfkd_tf.models.resnet import build_multi_exit_resnet

__all__ = [
    "ARCHITECTURES",
    "EXIT_HEADS",
    "build_multi_exit_resnet",
    "upgrade_convolutions",
]
