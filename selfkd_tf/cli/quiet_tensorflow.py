"""Imports TensorFlow with its start-up messages hidden, for the TensorFlow commands.

``selfkd-train``, ``-eval``, ``-export``, ``-tune`` and the tools in
``tools/`` import this module before anything that imports TensorFlow. On a
machine without a GPU, TensorFlow prints, at every start, that it found no
CUDA driver, an ``E0000 ... failed call to cuInit`` "error", absl's
``WARNING: All log messages before absl::InitializeLog() ...`` notice and
oneDNN/CPU-instruction banners. The driver line and absl's notice come
twice, because ``libtensorflow_framework.so`` and
``_pywrap_profiler_plugin.so`` each carry their own copy of the CUDA stub
and of absl's logging. They are written by
C++ while the libraries load (before ``TF_CPP_MIN_LOG_LEVEL`` takes effect)
and when the devices are first listed, so the import and the device listing
run with the process's stderr (file descriptor 2) sent to a temporary file,
which is replayed if the import fails.

``SELFKD_VERBOSE_TF=1``, or ``TF_CPP_MIN_LOG_LEVEL`` set to 0 or 1, shows
the messages. ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (TensorFlow's warnings
and errors after start-up are shown, its INFO lines are not).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

VERBOSE_ENV = "SELFKD_VERBOSE_TF"
"""Environment variable that, set to 1, shows TensorFlow's start-up messages."""


def _shows_startup_messages() -> bool:
    if os.environ.get(VERBOSE_ENV, "0").strip() not in ("", "0"):
        return True
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() in ("0", "1")


@contextlib.contextmanager
def _stderr_held():
    """Sends file descriptor 2 to a temporary file; replays it on an exception."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except Exception:  # not Ctrl-C: nothing failed to report then
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _import_tensorflow() -> None:
    if _shows_startup_messages():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _stderr_held():
        import tensorflow as tf

        # Loads the CUDA platform, which reports cuInit's failure on a
        # machine without a GPU.
        tf.config.list_physical_devices("GPU")


_import_tensorflow()
