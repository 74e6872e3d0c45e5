"""Atomic file writes, so a kill mid-write never leaves half a file."""

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
