"""What the measurement tools in ``tools/`` share: flag checks and whole-file outputs.

Each tool runs through `selfkd_tf.cli.program.run`, which gives it the
product commands' manners (``--help``, flagfiles, ``<program>: error: ...``
on one line): a `selfkd_tf.errors.SettingsError` is bad input (exit status
2), a `selfkd_tf.cli.program.CommandError` a failure of the machine (exit
status 1). The checks here raise the first before any work is done; the
writers raise the second, and write their files whole (`write_text`,
`write_json`), so an interrupted or failed tool leaves no partial file.

Example (a tool):

```python
from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages
from absl import flags
from selfkd_tf.cli import program
import tool_io

flags.DEFINE_string("out_json", None, "Where the JSON report goes.")
FLAGS = flags.FLAGS

def main(argv):
    tool_io.check_output_file("out_json", FLAGS.out_json)
    ...
    tool_io.write_json(FLAGS.out_json, report)

if __name__ == "__main__":
    program.run(main, "thing.py")
```
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

from absl import flags

from selfkd_tf.cli.program import CommandError
from selfkd_tf.data import sources
from selfkd_tf.errors import SettingsError
from selfkd_tf.files import check_creatable, write_atomically

__all__ = ["check_dataset", "check_output_file", "register_finite", "write_json", "write_text",
           "writing"]


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
        SettingsError: as `selfkd_tf.data.sources.parse` finds.
    """
    try:
        sources.parse(dataset)
    except sources.DataError as err:
        raise SettingsError(flag, str(err)) from None


@contextlib.contextmanager
def writing(path: str):
    """Turns an `OSError` met while writing ``path`` (e.g. a full disk) into a `selfkd_tf.cli.program.CommandError`."""
    try:
        yield
    except OSError as err:
        raise CommandError(f"cannot write {path}: {err.strerror or err}") from None


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
