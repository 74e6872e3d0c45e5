"""Scoring a Keras model: every exit's probabilities, the metrics record, streaming metrics."""

from selfkd_tf.evaluation.scoring import evaluate_model
from selfkd_tf.evaluation.scoring import format_metrics_table
from selfkd_tf.evaluation.scoring import predict_exit_probabilities
from selfkd_tf.evaluation.streaming_metrics import ExpectedCalibrationError
from selfkd_tf.evaluation.streaming_metrics import NegativeLogLikelihood
