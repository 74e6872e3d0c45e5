"""The flag of ``selfkd-eval`` and ``selfkd-export`` that loads models holding code.

A ``.keras`` file can carry Python code (a ``Lambda`` layer's function),
which would run as the file is loaded. Keras's safe mode refuses such files,
and both commands keep it on unless this flag says otherwise.
"""

from absl import flags

from selfkd_tf.experiment.trained import UNSAFE_FLAG

UNSAFE_DESERIALIZATION = flags.DEFINE_bool(
    UNSAFE_FLAG, False,
    "Load --model with Keras safe mode off: Python code stored in the .keras "
    "file (a Lambda layer's function) is run. Only for files you trust; "
    "without it such files are refused.")


def safe_mode() -> bool:
    """Keras's ``safe_mode`` for `selfkd_tf.experiment.trained.load_trained_model`."""
    return not UNSAFE_DESERIALIZATION.value
