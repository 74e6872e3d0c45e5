"""Atomic file writes, so a kill mid-write never leaves half a file; the
check that an output path can be written at all, made before any work; and
whether one path lies within another."""

from __future__ import annotations

import os
import tempfile


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers never see a partial file.

    The text goes to a temporary file in the destination directory, is
    flushed to disk and then replaces ``path`` (`os.replace`). Parent
    directories are created. The text is written verbatim (no newline
    translation), so CSV line endings survive.

    Example:

    >>> write_atomically("/tmp/run/flags.json", '{"seed": 0}\\n')
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}-", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file owner-only; make it readable like any
        # other output file.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def check_creatable(path: str | os.PathLike) -> None:
    """Refuses an output path that cannot be created, before any work goes into it.

    The nearest existing ancestor of ``path`` (its parent, or the first
    ancestor that exists: the parents `write_atomically` would create) must
    be a directory this process may create entries in. Whether ``path``
    itself exists, and what it is, is the caller's concern.

    Raises:
        ValueError: that ancestor is not a directory, or cannot be written
            in; the message (one line) names it.

    Example:

    >>> check_creatable("/tmp/run/export/saved")
    """
    ancestor = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {ancestor}: permission denied")


def is_within(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies under it.

    The paths are compared as given (both absolute, or both relative):
    pass `os.path.realpath` of each to see through symbolic links.

    >>> is_within("/runs/a/checkpoints/ckpt-1", "/runs/a"), is_within("/runs/ab", "/runs/a")
    (True, False)
    """
    return os.path.commonpath([path, directory]) == directory
