"""What the measurement tools in ``tools/`` share on their command lines.

Each tool runs through `run`, which gives it the product commands' manners
(`selfkd_tf.cli.program`: ``--help``, flagfiles, ``<program>: error: ...`` on
one line) and turns the two kinds of failure its ``main`` raises into one
line on stderr:

- `selfkd_tf.settings.SettingsError`: bad input (a flag, a dataset, a
  model), exit status 2. The checks here raise it before any work is done.
- `ToolError`: the machine failed the tool (a file could not be written, a
  child process died), exit status 1.

Outputs are written whole (`write_text`, `write_json`), so an interrupted or
failed tool leaves no partial file.

Importing this module first quiets TensorFlow's start-up messages
(`selfkd_tf.cli.common`), as for the product commands.

Example (a tool):

```python
import tool_cli  # first: quiets TensorFlow's start-up logging
from absl import flags

flags.DEFINE_string("out_json", None, "Where the JSON report goes.")
FLAGS = flags.FLAGS

def main(argv):
    tool_cli.check_output_file("out_json", FLAGS.out_json)
    ...
    tool_cli.write_json(FLAGS.out_json, report)

if __name__ == "__main__":
    tool_cli.run(main, "thing.py")
```
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from typing import Any, Callable

from selfkd_tf.cli import common  # first: quiets TensorFlow's start-up logging

from absl import flags  # noqa: E402

from selfkd_tf import sources  # noqa: E402
from selfkd_tf.files import check_creatable, write_atomically  # noqa: E402
from selfkd_tf.settings import SettingsError  # noqa: E402

__all__ = ["ToolError", "check_dataset", "check_output_file", "register_finite", "run",
           "write_json", "write_text", "writing"]


class ToolError(Exception):
    """A failure that is not the user's input (exit status 1); one line."""


def run(main: Callable[[list[str]], int | None], program: str) -> None:
    """`selfkd_tf.cli.program.run` for a tool named ``program``, e.g. ``"benchmark.py"``.

    A `SettingsError` escaping ``main`` ends the tool with
    ``<program>: error: --<flag>: <problem>`` and exit status 2, a
    `ToolError` with its message and exit status 1.
    """

    @functools.wraps(main)  # keeps main's module, whose flags --help lists
    def checked(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except SettingsError as err:
            common.fail(program, common.flag_message(err))
        except ToolError as err:
            common.fail(program, str(err), status=1)

    common.run(checked, program)


def register_finite(name: str, minimum: float, *, inclusive: bool = True) -> None:
    """Makes float flag ``name`` refuse NaN, infinities and values below ``minimum``.

    absl's ``lower_bound`` lets NaN through; this validator does not. With
    ``inclusive=False`` the flag must be above ``minimum``.
    """
    relation = ">=" if inclusive else ">"

    def valid(value: float | None) -> bool:
        if value is None:
            return True
        return math.isfinite(value) and (value >= minimum if inclusive else value > minimum)

    flags.register_validator(name, valid, message=f"must be a finite number {relation} {minimum:g}")


def check_output_file(flag: str, path: str | None) -> None:
    """Refuses an output file that cannot be written, before any work goes into it.

    Raises:
        SettingsError: ``path`` is a directory, lies under a file, or lies in
            a directory this process cannot write in. None passes.
    """
    if path is None:
        return
    if not path:
        raise SettingsError(flag, "empty; give a file name")
    if os.path.isdir(path):
        raise SettingsError(flag, f"{path} is a directory; give a file name")
    try:
        check_creatable(path)
    except ValueError as err:
        raise SettingsError(flag, str(err)) from None


def check_dataset(flag: str, dataset: str) -> None:
    """Refuses an unknown dataset string or a missing dataset path, before loading.

    Raises:
        SettingsError: as `selfkd_tf.sources.parse` finds.
    """
    try:
        sources.parse(dataset)
    except sources.DataError as err:
        raise SettingsError(flag, str(err)) from None


@contextlib.contextmanager
def writing(path: str):
    """Turns an `OSError` met while writing ``path`` (e.g. a full disk) into a `ToolError`."""
    try:
        yield
    except OSError as err:
        raise ToolError(f"cannot write {path}: {err.strerror or err}") from None


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` whole (`selfkd_tf.files.write_atomically`).

    Raises:
        ToolError: the file could not be written; nothing is left behind.
    """
    with writing(path):
        write_atomically(path, text)


def write_json(path: str, record: dict[str, Any]) -> None:
    """Writes ``record`` to ``path`` as indented JSON, whole; see `write_text`."""
    write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
