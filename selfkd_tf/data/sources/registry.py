"""The registry of data sources, and the parsing of dataset strings.

A dataset string names a registered source, with a path for the sources that
read the user's files: `"digits"`, `"cifar100"`, `"npz:/data/x.npz"`. Each
source module registers its loader on import:

```python
@registry.register("npz", takes_path=True)
def load(spec: registry.SourceSpec) -> ImageArrays:
    ...
```
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from selfkd_tf.data.sources.arrays import DataError, ImageArrays
from selfkd_tf.data.sources.streamed import StreamedData

__all__ = ["Source", "SourceSpec", "dataset_forms", "parse", "register"]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What a loader is asked to read.

    Attributes:
        name: the registered source name, e.g. `"cifar100"` or `"folder"`.
        path: absolute path of the user's files, for sources that take one;
            None otherwise.
        data_dir: TensorFlow Datasets data directory (TFDS sources only).
        image_size: `(H, W)` the images will be resized to, or None; a
            source that decodes files of mixed sizes resizes while decoding.
    """

    name: str
    path: str | None = None
    data_dir: str | None = None
    image_size: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered data source.

    Attributes:
        name: the source name, the part of the dataset string before `:`.
        load: reads a `SourceSpec` into validated `ImageArrays`; raises
            `DataError` for anything it cannot read.
        takes_path: whether the dataset string is `name:PATH`.
        stream: for a source that reads files, describes them without
            decoding any (`StreamedData`); None for a source held in memory.
    """

    name: str
    load: Callable[[SourceSpec], ImageArrays]
    takes_path: bool
    stream: Callable[[SourceSpec], StreamedData] | None = None

    @property
    def form(self) -> str:
        """How the source is written: `"npz:PATH"` or `"digits"`."""
        return f"{self.name}:PATH" if self.takes_path else self.name


_SOURCES: dict[str, Source] = {}


def register(
    name: str,
    *,
    takes_path: bool = False,
    stream: Callable[[SourceSpec], StreamedData] | None = None,
) -> Callable[[Callable[[SourceSpec], ImageArrays]], Callable]:
    """Decorator registering `load` as the loader of source `name`.

    `stream`, for a source that reads files, describes them without decoding
    them, for the pipeline to read them as it trains.

    Raises:
        ValueError: `name` is already registered or holds a `:`.
    """
    if name in _SOURCES or ":" in name:
        raise ValueError(f"cannot register data source {name!r}")

    def decorate(load):
        _SOURCES[name] = Source(name, load, takes_path, stream)
        return load

    return decorate


def dataset_forms() -> str:
    """The accepted dataset strings, for messages: `"'digits', 'npz:PATH'"`.

    Sources without a path come first; each group is in alphabetical order.
    """
    ordered = sorted(_SOURCES.values(), key=lambda s: (s.takes_path, s.name))
    return ", ".join(repr(source.form) for source in ordered)


def parse(dataset: str) -> tuple[Source, str | None]:
    """Splits a dataset string into its source and absolute path (or None).

    Raises:
        DataError: unknown source, a path where none is taken, a missing or
            empty path, or a path that does not exist.

    Example:

    >>> source, path = parse("digits")
    >>> source.name, path
    ('digits', None)
    """
    kind, colon, path = str(dataset).partition(":")
    source = _SOURCES.get(kind)
    if source is None:
        raise DataError(
            f"unknown dataset {dataset!r}; expected one of {dataset_forms()}"
        )
    if bool(colon) != source.takes_path:
        need = "needs a path" if source.takes_path else "takes no path"
        raise DataError(f"dataset {dataset!r} {need}; expected {source.form}")
    if not source.takes_path:
        return source, None
    if not path:
        raise DataError(
            f"dataset {dataset!r} has an empty path; expected {kind}:PATH"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"{kind} path does not exist: {path}")
    return source, path
