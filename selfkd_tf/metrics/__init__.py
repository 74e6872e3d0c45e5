"""The paper's metrics as numpy functions of probabilities, temperature scaling, and
the ``metrics.json`` record.

Imports neither TensorFlow nor Keras.
"""

from selfkd_tf.metrics.calibration import apply_temperature
from selfkd_tf.metrics.calibration import apply_temperatures
from selfkd_tf.metrics.calibration import fit_temperature
from selfkd_tf.metrics.calibration import fit_temperatures
from selfkd_tf.metrics.record import build_metrics_record
from selfkd_tf.metrics.record import write_metrics_json
from selfkd_tf.metrics.scores import METRIC_KEYS
from selfkd_tf.metrics.scores import aurc
from selfkd_tf.metrics.scores import classification_metrics
from selfkd_tf.metrics.scores import eaurc
from selfkd_tf.metrics.scores import expected_calibration_error
from selfkd_tf.metrics.scores import multi_exit_metrics
from selfkd_tf.metrics.scores import negative_log_likelihood
from selfkd_tf.metrics.scores import reliability_bins
from selfkd_tf.metrics.scores import top_k_error
