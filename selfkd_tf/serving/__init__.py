"""Serving a trained model: SavedModel exports and early-exit cascades."""

from selfkd_tf.serving.cascade import EarlyExitCascade
from selfkd_tf.serving.early_exit import early_exit_curve
from selfkd_tf.serving.early_exit import measure_latency
from selfkd_tf.serving.early_exit import select_threshold
from selfkd_tf.serving.saved_model import export_saved_model
