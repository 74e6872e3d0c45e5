"""Registers the package's Keras classes once Keras is imported.

A saved model names its classes by registered name (``selfkd_tf>SelfKDModel``)
and Keras finds them only in its registry, which the class definitions fill
when their modules run. The package imports those modules lazily, so that
tools without TensorFlow (``selfkd-report``) start fast; this module closes
the gap: as soon as both Keras and this package are imported, in either
order, the modules holding serialisable classes are imported too.

Keras and TensorFlow each import the other part-way through their own
import, and the registering modules use both and import the package's other
modules, so registration waits until neither Keras, TensorFlow nor any module
of this package is still being imported (e.g. ``import selfkd_tf.experiment.callbacks``
imports Keras half-way through its own code). A small import hook does the waiting;
general-purpose post-import hooks (``wrapt``) cost more start-up time than
the package's whole import.

Example:

>>> import selfkd_tf, keras
>>> model = keras.saving.load_model("runs/a/model.keras")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys

SERIALIZABLE_MODULES = (
    "selfkd_tf.models",
    "selfkd_tf.optimizers",
    "selfkd_tf.evaluation.streaming_metrics",
    "selfkd_tf.distillation.model",
)
"""The modules whose classes carry `keras.saving.register_keras_serializable`."""

_WATCHED = ("keras", "tensorflow")
_PACKAGE = "selfkd_tf"


def _watched(name: str) -> bool:
    return name in _WATCHED or name.startswith(_PACKAGE + ".")


def _initializing(name: str, finished: str | None) -> bool:
    # importlib marks a module whose code is still running.
    return name != finished and getattr(
        getattr(sys.modules.get(name), "__spec__", None), "_initializing", False)


def _fully_imported(name: str, finished: str | None) -> bool:
    return name in sys.modules and not _initializing(name, finished)


def register_serializables(finished: str | None = None) -> bool:
    """Imports `SERIALIZABLE_MODULES` if Keras and TensorFlow are imported.

    Args:
        finished: a module whose code has just run to its end (importlib
            still marks it as running until its loader returns).

    Returns:
        Whether the classes are registered (False while Keras is not
        imported, or it, TensorFlow or a module of this package is still
        being imported).
    """
    if not _fully_imported("keras", finished):
        return False
    if "tensorflow" in sys.modules and not _fully_imported("tensorflow", finished):
        return False
    if any(_initializing(name, finished) for name in list(sys.modules)
           if name == _PACKAGE or name.startswith(_PACKAGE + ".")):
        return False
    for name in SERIALIZABLE_MODULES:
        importlib.import_module(name)
    return True


class _AfterImport:
    """A `sys.meta_path` finder that runs `register_serializables` after
    each watched module (Keras, TensorFlow, this package's modules) is
    executed.

    It finds the module's spec with the finders after it and wraps that
    loader's ``exec_module``; it removes itself once registration is done.
    """

    def find_spec(self, fullname, path=None, target=None):
        if not _watched(fullname):
            return None
        finders = sys.meta_path[sys.meta_path.index(self) + 1:]
        spec = next(
            filter(None, (
                finder.find_spec(fullname, path, target)
                for finder in finders if hasattr(finder, "find_spec")
            )),
            None,
        )
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            if register_serializables(fullname) and self in sys.meta_path:
                sys.meta_path.remove(self)

        # Each find_spec call makes a fresh loader, so only this import's
        # loader is wrapped.
        loader.exec_module = exec_module
        return spec


def register_on_keras_import() -> None:
    """Registers the classes now, or as soon as Keras has been imported.

    Called at the end of the package's ``__init__``, which importlib still
    marks as running.
    """
    if register_serializables(_PACKAGE):
        return
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
