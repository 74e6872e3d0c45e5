"""One writer at a time per run directory: a lock held while a process uses it.

Two trainers writing one run directory interleave their checkpoints and
cut each other's ``history.csv``. So a process that writes a run directory
holds an exclusive lock on it for as long as it does (`locked`): the whole
of ``selfkd-train`` (only the chief of a multi-worker cluster: the other
workers write into folders of their own), the whole of ``selfkd-tune`` on
its search directory. ``selfkd-eval`` and ``selfkd-export`` read a run's
``model.keras`` and may write beside it; they hold a shared lock, so any
number of them run together, but never while the run trains (they would
read a model about to be replaced and leave results of a model that no
longer exists), and a run is not trained while they read it.

The lock is `fcntl.flock` on the file `LOCK_FILE` in the directory. The
kernel releases it when the process ends, however it ends (``kill -9``
included), so no stale lock survives. The exclusive holder writes its pid,
host and activity into the file, for the refusal message; the last holder
removes the file, and a file left behind by a killed process is simply
locked again. The directory is created if needed, and removed again when
it is still empty at the end (a refused or invalid run leaves no trace).

On a filesystem without lock support (``flock`` fails with ``ENOLCK`` or
``EOPNOTSUPP``, as on NFS mounted with ``nolock``), the command goes on
without the lock and says so on stderr: nothing then stops a second process.

Example:

```python
with locked("runs/a", activity="trained"):   # RunDirectoryBusy if taken
    ...                                      # write runs/a
with locked("runs/a", shared=True):          # beside other readers
    ...                                      # read runs/a/model.keras
```
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
from typing import Iterator

LOCK_FILE = ".lock"
"""The file of a run directory that its users lock (`locked`)."""

_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})
_READ_ONLY = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class LockError(ValueError):
    """The lock cannot be taken; ``str(error)`` is one line."""


class RunDirectoryBusy(LockError):
    """Another process holds the lock; ``str(error)`` is one line naming it."""


def _created_directories(directory: str) -> list[str]:
    """Creates ``directory`` and its missing parents; returns those created,
    deepest first."""
    missing = []
    path = os.path.abspath(directory)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    return missing


def _remove_if_empty(directories: list[str]) -> None:
    for path in directories:
        try:
            os.rmdir(path)
        except OSError:  # not empty (the run wrote files), or gone
            return


def _open(path: str, shared: bool) -> int | None:
    """A descriptor of the lock file, created if absent; None when a reader
    cannot create it (a directory it may not write, which no one writes).

    Raises:
        OSError: the file cannot be opened (a symbolic link: ``ELOOP``), or
            is not a regular file with a single name.
    """
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(err.errno, "a symbolic link, not a lock file; remove it",
                          path) from err
        if not (shared and err.errno in _READ_ONLY):
            raise
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
    status = os.fstat(fd)
    # Written through, another name of the file would change elsewhere.
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.EEXIST, "a hard link or a special file, not a lock "
                      "file; remove it", path)
    return fd


def _is_current(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (its last holder
    may have removed it between our open and our lock)."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> tuple[str, str]:
    """What the exclusive holder does, and ``" (pid N)"`` (``" (pid N on host
    H)"`` from another machine), from the file; ``"written"`` and ``""`` if
    it has not written them yet."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        activity, pid, host = str(record["activity"]), int(record["pid"]), str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "written", ""
    where = "" if host == socket.gethostname() else f" on host {host}"
    return activity, f" (pid {pid}{where})"


def _refusal(directory: str, fd: int, shared: bool) -> RunDirectoryBusy:
    if not shared:
        # Readers (shared holders) leave the file empty and let another
        # reader in; a writer does neither.
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            return RunDirectoryBusy(
                f"{directory} is being read by another process (selfkd-eval or "
                "selfkd-export); wait for it or stop it")
    activity, holder = _holder(fd)
    return RunDirectoryBusy(
        f"{directory} is being {activity} by another process{holder}; "
        "wait for it or stop it")


def _lock(directory: str, shared: bool) -> int | None:
    """Takes the lock; returns its descriptor, or None when it cannot be had
    (no lock support, or a reader in a directory it cannot write).

    Raises:
        RunDirectoryBusy: another process holds it.
        OSError: the lock file cannot be opened.
    """
    path = os.path.join(directory, LOCK_FILE)
    while True:
        fd = _open(path, shared)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _refusal(directory, fd, shared) if _is_current(fd, path) else None
            os.close(fd)
            if error is None:
                continue  # its holder removed it meanwhile: lock the new one
            raise error from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _UNSUPPORTED:
                raise
            with contextlib.suppress(OSError):
                if not shared:
                    os.unlink(path)
            print(f"warning: cannot lock {directory} ({os.strerror(err.errno)}); "
                  "nothing stops another process from using it at the same time",
                  file=sys.stderr)
            return None
        if _is_current(fd, path):
            return fd
        os.close(fd)


def _release(fd: int, directory: str) -> None:
    """Removes the file when no one else holds it, then lets go."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        # A shared holder upgrades first: other readers keep the file.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _is_current(fd, path):
            os.unlink(path)
    except OSError:  # another reader holds it, or the file is gone
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(directory: str, *, shared: bool = False,
           activity: str = "trained") -> Iterator[None]:
    """Holds the lock of ``directory`` for the ``with`` block.

    Args:
        directory: the run (or search) directory; created if absent, and
            removed at the end if it is still empty.
        shared: a reader's lock, held together with other readers; the
            default is a writer's, held alone.
        activity: what a writer does to the directory, as refusals name it
            (``"<directory> is being trained by another process"``).

    Raises:
        RunDirectoryBusy: another process holds a conflicting lock. The
            message is one line: the directory, what the holder does and,
            when known, its pid (and host, when it is another machine).
        LockError: the directory or its lock file cannot be created or
            opened (a ``LOCK_FILE`` that is a symbolic link, a hard link or
            not a regular file is refused).

    Example:

    >>> with locked("/tmp/run", activity="trained"):
    ...     pass
    """
    created, fd = [], None
    try:
        try:
            if not shared:
                created = _created_directories(directory)
            fd = _lock(directory, shared)
            if fd is not None and not shared:
                record = {"pid": os.getpid(), "host": socket.gethostname(),
                          "activity": activity}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        except OSError as err:
            raise LockError(f"cannot {'read' if shared else 'write'} "
                            f"{err.filename or directory}: {err.strerror or err}") from err
        yield
    finally:
        if fd is not None:
            _release(fd, directory)
        _remove_if_empty(created)
