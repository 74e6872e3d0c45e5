"""Command-line plumbing shared by ``selfkd-train``, ``selfkd-eval`` and ``selfkd-export``.

Bad input ends a command with one line on stderr,
``<program>: error: --<flag>: <problem>``, and exit status 2, never a
traceback: flag parsing errors, `selfkd_tf.experiment.SettingsError` (which
wraps the library's `ValueError` and `DataError` met at start-up) alike.

Importing this module quiets TensorFlow's C++ start-up logging (unless
``TF_CPP_MIN_LOG_LEVEL`` is set), so it is imported before TensorFlow.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

USAGE_ERROR = 2


def fail(program: str, message: str, status: int = USAGE_ERROR) -> NoReturn:
    """Prints ``<program>: error: <message>`` on one line and exits."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def flag_message(error) -> str:
    """``"--flag: problem"`` for a `SettingsError`, its text otherwise."""
    flag = getattr(error, "flag", None)
    return f"--{flag}: {error.problem}" if flag else str(error)


def run(main: Callable[[list[str]], int | None], program: str) -> None:
    """`absl.app.run` with flag-parsing errors reported as one line."""

    def parse(argv: list[str]) -> list[str]:
        try:
            remaining = flags.FLAGS(argv)
        except flags.Error as err:
            fail(program, err)
        if len(remaining) > 1:
            fail(program, f"unexpected arguments: {' '.join(remaining[1:])}")
        # TensorFlow logs routine work (e.g. every checkpoint save) at INFO,
        # which absl would print; --verbosity=0 brings it back.
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        return remaining

    app.run(main, flags_parser=parse)
