"""The error a command answers with one line: a setting that cannot be used.

Library functions that check what a user chose (a flag, a dataset, a run
directory, a model file) raise `SettingsError`; every ``selfkd-*`` command
and tool turns it into ``<program>: error: --<flag>: <problem>`` and exit
status 2 (`selfkd_tf.cli.program.run`). This module imports nothing, so
commands without TensorFlow can catch it.
"""


class SettingsError(ValueError):
    """A setting cannot be used; `flag` names it (``None`` if no single one).

    ``str(error)`` is one line, ``"<flag>: <problem>"``.

    Example:

    >>> str(SettingsError("epochs", "got 0; allowed: integers >= 1"))
    'epochs: got 0; allowed: integers >= 1'
    """

    def __init__(self, flag: str | None, problem: str):
        self.flag = flag
        self.problem = problem
        super().__init__(f"{flag}: {problem}" if flag else problem)
