"""Run directories: what they hold, reading them safely, and the one-writer lock.

Imports neither TensorFlow nor Keras.
"""

from selfkd_tf.rundir.data_record import DataFingerprint
from selfkd_tf.rundir.lock import RunDirectoryBusy
from selfkd_tf.rundir.lock import locked
from selfkd_tf.rundir.reading import RunDirectoryError
from selfkd_tf.rundir.reading import read_history
from selfkd_tf.rundir.reading import read_json
from selfkd_tf.rundir.reading import read_metrics
