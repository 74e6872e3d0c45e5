"""`cifar:PATH`: the canonical CIFAR-10 / CIFAR-100 python pickles.

`PATH` is the `cifar-10-batches-py` or `cifar-100-python` folder, its parent
folder, or the `.tar.gz` archive the folder came in (read in place, never
extracted). CIFAR-100 uses its 100 fine labels.

The files are pickles, a format that can run code when loaded, so they are
read with an unpickler that builds only what the canonical files hold (dicts,
lists, strings, numbers and numpy arrays) and refuses any other global with a
`DataError` naming the file: a pickle from a stranger cannot run code here.
An archive member that is a symbolic or hard link, a device, or whose name is
absolute or climbs out with `..` makes the whole archive refused, so nothing
outside the archive is ever read.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import tarfile
import warnings
import zipfile
from typing import Callable

import numpy as np

from selfkd_tf.data.sources import registry
from selfkd_tf.data.sources.arrays import DataError, ImageArrays, first_line
from selfkd_tf.data.sources.arrays import image_arrays

__all__ = ["PUBLISHED_STATS", "load", "safe_unpickle"]

# Published per-channel statistics of the CIFAR training sets, keyed by the
# number of classes.
PUBLISHED_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Every global a CIFAR pickle needs: numpy's array and scalar reconstruction
# and its dtype (written by numpy 1 as numpy.core, by numpy 2 as numpy._core;
# _frombuffer by pickle protocol 5), and _codecs.encode, which Python 3 uses
# for bytes in protocol 0-2 pickles. None of them can run code.
_ALLOWED_GLOBALS = frozenset(
    [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        *(
            (f"{core}.{module}", name)
            for core in ("numpy.core", "numpy._core")
            for module, name in (
                ("multiarray", "_reconstruct"),
                ("multiarray", "scalar"),
                ("numeric", "_frombuffer"),
            )
        ),
    ]
)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR pickle holds only "
                "dicts, lists, strings, numbers and numpy arrays"
            )
        # numpy 2 warns when numpy 1's module names are resolved.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def safe_unpickle(content: bytes):
    """Unpickles CIFAR data without ever running code from it.

    Python 2 pickles (the canonical CIFAR files) are read with
    `encoding="bytes"`, so their `str` keys and names come back as bytes.

    Raises:
        pickle.UnpicklingError: the pickle names a global other than numpy's
            array reconstruction, dtype and scalars, or `_codecs.encode`.
        Exception: anything a corrupt pickle raises.

    Example:

    >>> safe_unpickle(pickle.dumps({"data": np.zeros(2, np.uint8)}))
    {'data': array([0, 0], dtype=uint8)}
    """
    return _CifarUnpickler(io.BytesIO(content), encoding="bytes").load()


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    """File names and pickle keys of one canonical CIFAR python release."""

    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


_CIFAR_LAYOUTS = (
    _CifarLayout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    _CifarLayout(
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
)
_CIFAR_FILES = frozenset(
    name
    for layout in _CIFAR_LAYOUTS
    for name in (*layout.train, layout.test, layout.meta)
)


@registry.register("cifar", takes_path=True)
def load(spec: registry.SourceSpec) -> ImageArrays:
    """Loads CIFAR pickles from a release folder, its parent or its archive."""
    path = spec.path
    if os.path.isdir(path):
        return _read_cifar(
            path,
            lambda name: os.path.isfile(os.path.join(path, name)),
            lambda name: pathlib.Path(path, name).read_bytes(),
        )
    contents = _archive_contents(path)
    return _read_cifar(path, contents.__contains__, contents.__getitem__)


def _archive_contents(path: str) -> dict[str, bytes]:
    """The CIFAR files of a tar archive, by normalized member name.

    Raises:
        DataError: the archive is unreadable or holds a member other than a
            regular file or folder, or a name that could point outside it.
    """
    # Read the archive once, in order: seeking back in a .gz stream would
    # decompress it again from the start.
    contents = {}
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                problem = _unsafe_member(member)
                if problem:
                    raise DataError(
                        f"refusing {path}: member {member.name!r} {problem}; "
                        "a CIFAR archive holds only files and folders inside it"
                    )
                if (
                    member.isfile()
                    and os.path.basename(member.name) in _CIFAR_FILES
                ):
                    contents[os.path.normpath(member.name)] = (
                        archive.extractfile(member).read()
                    )
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"cannot read {path} as a CIFAR tar archive: {first_line(err)}"
        ) from None
    return contents


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why `member` could reach outside its archive, or None."""
    if member.issym() or member.islnk():
        return f"is a link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or folder"
    name = member.name.replace("\\", "/")
    if name.startswith("/") or os.path.isabs(member.name):
        return "has an absolute name"
    if ".." in name.split("/"):
        return "has a '..' in its name"
    return None


def _read_cifar(
    source: str, exists: Callable[[str], bool], read: Callable[[str], bytes]
) -> ImageArrays:
    """Reads a CIFAR release through `exists`/`read` of relative file names."""
    found = [
        (layout, prefix)
        for layout in _CIFAR_LAYOUTS
        for prefix in ("", layout.folder)
        if exists(os.path.join(prefix, layout.meta))
    ]
    if len({layout.folder for layout, _ in found}) != 1:
        problem = (
            "holds both CIFAR-10 and CIFAR-100 data"
            if found
            else "holds no CIFAR python data"
        )
        raise DataError(
            f"{source} {problem}; expected cifar-10-batches-py or "
            "cifar-100-python (the folder, its parent folder or its .tar.gz "
            "archive)"
        )
    layout, prefix = found[0]

    def unpickle(name):
        where = os.path.join(source, prefix, name)
        if not exists(os.path.join(prefix, name)):
            raise DataError(f"missing CIFAR file {where}")
        try:
            content = safe_unpickle(read(os.path.join(prefix, name)))
        # Corrupt pickles raise almost any exception type.
        except Exception as err:
            raise DataError(
                f"cannot unpickle {where}: {first_line(err)}"
            ) from None
        if not isinstance(content, dict):
            raise DataError(
                f"{where} holds a {type(content).__name__}, not a CIFAR dict"
            )
        return where, {
            k.decode() if isinstance(k, bytes) else k: v
            for k, v in content.items()
        }

    def field(where, content, key):
        if key not in content:
            raise DataError(f"{where} has no key {key!r}")
        return content[key]

    def batch(name):
        where, content = unpickle(name)
        data = np.asarray(field(where, content, "data"))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{where}: 'data' has shape {data.shape}; expected [N, 3072]"
            )
        labels = np.asarray(field(where, content, layout.label_key))
        # Checked per file: files of mismatched lengths could otherwise add
        # up and shift every later label onto another image.
        if labels.shape != (len(data),):
            raise DataError(
                f"{where}: 'data' has {len(data)} rows but "
                f"{layout.label_key!r} has shape {labels.shape}"
            )
        # Rows hold the red, green and blue 32x32 planes one after the other.
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    train = [batch(name) for name in layout.train]
    x_test, y_test = batch(layout.test)
    where, meta = unpickle(layout.meta)
    names = [
        n.decode() if isinstance(n, bytes) else n
        for n in field(where, meta, layout.names_key)
    ]
    return image_arrays(
        os.path.join(source, prefix),
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        x_test,
        y_test,
        names,
        PUBLISHED_STATS.get(len(names)),
    )
