"""The ``selfkd-*`` console scripts: each imports its command, then runs it.

A TensorFlow command takes seconds to import (TensorFlow, Keras). Ctrl-C in
that time raises `KeyboardInterrupt` inside an import, before
`selfkd_tf.cli.program.run` is there to catch it. The entry points below
catch it instead: the command ends like a later Ctrl-C, with one line and
exit status 130 (`selfkd_tf.cli.program.INTERRUPTED`); nothing has been
written yet.

``python -m selfkd_tf.cli.train`` imports the command directly and is not
covered.
"""

from __future__ import annotations

import importlib

from selfkd_tf.cli import program


def _start(module: str, name: str) -> None:
    try:
        command = importlib.import_module(f"selfkd_tf.cli.{module}")
    except KeyboardInterrupt:
        program.fail(name, "interrupted while starting; nothing was written",
                     status=program.INTERRUPTED)
    command.run()


def train() -> None:
    """``selfkd-train``."""
    _start("train", "selfkd-train")


def evaluate() -> None:
    """``selfkd-eval``."""
    _start("evaluate", "selfkd-eval")


def export() -> None:
    """``selfkd-export``."""
    _start("export", "selfkd-export")


def tune() -> None:
    """``selfkd-tune``."""
    _start("tune", "selfkd-tune")


def report() -> None:
    """``selfkd-report``."""
    _start("report", "selfkd-report")
