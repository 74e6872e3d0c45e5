"""Reports of finished runs: tables, figures, seed summaries and record provenance.

Imports neither TensorFlow nor Keras.
"""

from selfkd_tf.report.runs import Run
from selfkd_tf.report.runs import load_runs
from selfkd_tf.report.tables import write_report
