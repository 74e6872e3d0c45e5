"""How every ``selfkd-*`` command starts: help, flagfiles and one-line errors.

`run` wraps `absl.app.run` so that every command behaves alike:

- ``--help``, ``-?`` and ``--helpshort`` print the command's description
  (its module docstring) and its own flags with their help texts, and exit
  0; ``--helpfull`` adds every other flag the process defines (absl's,
  TensorFlow's) and exits 0 as well.
- Ctrl-C ends the command with one line and exit status 130 (`INTERRUPTED`);
  SIGTERM, which job schedulers (Slurm, Kubernetes) send before they stop a
  job, ends it the same way with exit status 143 (`TERMINATED`).
- Bad input ends the command with one line on stderr,
  ``<program>: error: <problem>``, and exit status 2, never a traceback:
  unknown flags and bad values, positional arguments, and flagfiles that
  cannot be read as flags (`check_flagfiles`).

This module imports neither TensorFlow nor Keras, so ``selfkd-report``
starts fast; the TensorFlow commands go through `selfkd_tf.cli.quiet_tensorflow`.

Example (a command module):

```python
\"\"\"``selfkd-thing``: does a thing.\"\"\"
from absl import flags
from selfkd_tf.cli import program

flags.DEFINE_string("out", None, "Where the thing goes.")

def main(argv):
    ...

def run():
    program.run(main, "selfkd-thing")
```
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import textwrap
import unicodedata
from typing import Callable, Iterable, NoReturn

from absl import app, flags, logging

from selfkd_tf.errors import SettingsError

USAGE_ERROR = 2
"""Exit status for bad flags or bad data."""

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""

TERMINATED = 143
"""Exit status after SIGTERM (128 + SIGTERM), as shells report it."""

FLAGFILE_MAX_BYTES = 1 << 20
"""Largest flagfile read: flagfiles are short lists of flags."""

_FLAGFILE_DIRECTIVES = ("--flagfile", "-flagfile")
_COMMENTS = ("#", "//")


class FlagfileError(ValueError):
    """A flagfile that cannot be read as flags; the message is one line."""


class CommandError(Exception):
    """A failure that is not the user's input (exit status 1); one line."""


def fail(program: str, message: str, status: int = USAGE_ERROR) -> NoReturn:
    """Prints ``<program>: error: <message>`` on one line and exits."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def flag_message(error) -> str:
    """``"--flag: problem"`` for a `SettingsError`, its text otherwise."""
    flag = getattr(error, "flag", None)
    return f"--{flag}: {error.problem}" if flag else str(error)


# -- flagfiles ----------------------------------------------------------------


def _directive_paths(args: Iterable[str], in_file: bool = False) -> Iterable[str]:
    """The files of the ``--flagfile`` directives in ``args``, as absl reads them.

    Within a flagfile (``in_file``) absl only takes ``--flagfile=FILE`` lines.
    """
    args = iter(args)
    for arg in args:
        if arg == "--" and not in_file:
            return
        if arg in _FLAGFILE_DIRECTIVES and not in_file:
            yield os.path.expanduser(next(args, ""))
        elif arg.startswith(tuple(f"{d}=" for d in _FLAGFILE_DIRECTIVES)):
            yield os.path.expanduser(arg.partition("=")[2].strip())


def _printable(text: str, limit: int = 60) -> str:
    shown = repr(text[:limit])
    return shown[:-1] + "...'" if len(text) > limit else shown


def _flagfile_lines(path: str) -> list[str]:
    """The text lines of a regular flagfile; `FlagfileError` if it is not text."""
    with open(path, "rb") as f:
        content = f.read(FLAGFILE_MAX_BYTES + 1)
    if len(content) > FLAGFILE_MAX_BYTES:
        raise FlagfileError(
            f"{path}: larger than {FLAGFILE_MAX_BYTES} bytes; a flagfile holds "
            "one --name=value per line")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FlagfileError(
            f"{path}: not UTF-8 text (byte {content[err.start]:#04x} at offset "
            f"{err.start}); a flagfile holds one --name=value per line") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        control = [c for c in line if unicodedata.category(c) == "Cc" and c != "\t"]
        if control:
            raise FlagfileError(
                f"{path}:{number}: control character {control[0]!r}; a flagfile "
                "is text, one --name=value per line")
    return lines


def check_flagfiles(args: Iterable[str], _including: tuple[str, ...] = ()) -> None:
    """Checks the flagfiles named in ``args``, and those they include.

    absl expands ``--flagfile=FILE`` itself; this check runs first so that a
    bad file gives one line naming the file (and line) instead of a
    traceback, a silently ignored include loop or a flag taken for a
    positional argument. Files that are not regular files (e.g. the pipe of
    ``--flagfile=<(...)``) are left to absl, since reading them here would
    consume them.

    Args:
        args: command-line arguments (without the program name).

    Raises:
        FlagfileError: a flagfile is missing, is a directory, is not UTF-8
            text, is larger than `FLAGFILE_MAX_BYTES`, holds a line that is
            neither a flag, a comment (``#``, ``//``) nor blank, or includes
            itself through nested ``--flagfile`` lines.

    Example:

    >>> check_flagfiles(["--flagfile=configs/smoke.flags", "--epochs=3"])
    """
    for path in _directive_paths(args, in_file=bool(_including)):
        if not path:
            continue  # absl ignores an empty name
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            raise FlagfileError(f"{path}: {err.strerror.lower()}") from None
        if stat.S_ISDIR(mode):
            raise FlagfileError(f"{path}: is a directory, not a flagfile")
        if not stat.S_ISREG(mode):
            continue
        real = os.path.realpath(path)
        if real in _including:
            chain = " -> ".join([*_including[_including.index(real):], real])
            raise FlagfileError(f"{path}: includes itself ({chain})")
        lines = _flagfile_lines(path)
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if line and not line.startswith(_COMMENTS) and not line.startswith("-"):
                raise FlagfileError(
                    f"{path}:{number}: {_printable(line)} is not a flag; write "
                    "one --name=value per line (# starts a comment)")
        check_flagfiles(lines, (*_including, real))


# -- help ---------------------------------------------------------------------


def _flags_help(module) -> str:
    """The help of ``module``'s key flags, without absl's module heading."""
    text = flags.FLAGS.module_help(module)
    return text.split("\n", 2)[2] if text.count("\n") >= 2 else ""


def _description(module) -> str:
    doc = (module.__doc__ or "").strip()
    return doc or f"USAGE: {os.path.basename(sys.argv[0])} [flags]"


class _HelpFlag(flags.BooleanFlag):
    """``--help`` and friends: print help, exit 0.

    Replaces absl's help flags, which describe the flags of ``sys.argv[0]``
    (nothing for an installed console script) and exit 1.
    """

    def __init__(self, name: str, short_name: str | None, text: Callable[[], str],
                 description: str):
        super().__init__(name, False, description, short_name=short_name,
                         allow_override=True, allow_hide_cpp=True)
        self._text = text

    def parse(self, argument):
        if self._parse(argument):
            print(self._text())
            sys.exit(0)


def _define_help_flags(module, program: str) -> None:
    def short() -> str:
        return "\n".join([
            _description(module), "", f"{program} flags:", _flags_help(module), "",
            textwrap.fill("--flagfile=FILE reads flags from FILE, one --name=value "
                          "per line (# starts a comment); flags after it override "
                          "the file's. --helpfull also lists the flags of the "
                          "libraries (absl's, TensorFlow's).", width=80),
        ])

    def full() -> str:
        return f"{_description(module)}\n\n{flags.FLAGS.get_help()}"

    app.define_help_flags()  # so that app.run does not define absl's later
    for name, short_name, text, description in [
        ("help", "?", short, f"Show {program}'s flags and exit."),
        ("helpshort", None, short, "Same as --help."),
        ("helpfull", None, full, "Show every flag, also absl's and TensorFlow's, and exit."),
    ]:
        flags.DEFINE_flag(_HelpFlag(name, short_name, text, description),
                          module_name="absl.app")


# -- running ------------------------------------------------------------------

_signals_received: list[int] = []


def _stop_on_sigterm(signum, frame) -> NoReturn:
    # Raised where Ctrl-C raises, so a scheduler's stop gets Ctrl-C's clean
    # stop: checkpoint writes finish first, one line says how to resume.
    _signals_received.append(signum)
    raise KeyboardInterrupt


def interrupt_status() -> int:
    """The exit status for the `KeyboardInterrupt` being handled.

    `TERMINATED` when it was raised for SIGTERM (under `run`), `INTERRUPTED`
    for Ctrl-C.
    """
    return TERMINATED if signal.SIGTERM in _signals_received else INTERRUPTED



def run(main: Callable[[list[str]], int | None], program: str) -> None:
    """`absl.app.run` with help, flagfile checks and one-line errors.

    ``main`` may raise `selfkd_tf.errors.SettingsError` (exit status 2) or
    `CommandError` (exit status 1) for one line on stderr.

    The command's own flags are the key flags of ``main``'s module (those it
    defines, and those it adopts with `absl.flags.adopt_module_key_flags`);
    its description is that module's docstring.
    """
    _define_help_flags(sys.modules[main.__module__], program)

    def parse(argv: list[str]) -> list[str]:
        try:
            check_flagfiles(argv[1:])
            remaining = flags.FLAGS(argv)
        except FlagfileError as err:
            fail(program, f"--flagfile: {err}")
        except flags.Error as err:
            fail(program, err)
        if len(remaining) > 1:
            fail(program, "unexpected arguments: "
                 f"{' '.join(_printable(arg) for arg in remaining[1:])}; flags "
                 "start with --")
        # Libraries log routine work at INFO (TensorFlow: every checkpoint
        # save), which absl would print; --verbosity=0 brings it back.
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        return remaining

    def interruptible(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except SettingsError as err:
            fail(program, flag_message(err))
        except CommandError as err:
            fail(program, str(err), status=1)
        except KeyboardInterrupt:
            print(flush=True)  # ends a progress bar's line
            # Commands write their files whole, so nothing is left half-written.
            fail(program, "interrupted", status=interrupt_status())

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    app.run(interruptible, flags_parser=parse)
