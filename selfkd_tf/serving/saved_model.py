"""Serving exports: a classifier of a multi-exit model as a SavedModel.

A trained `SelfKDModel` has N exits; a deployment serves one of them (the
deepest by default, any exit ``k``, the ensemble of all exits) or all of
them as an early-exit cascade (see `selfkd_tf.serving.cascade`). A single-exit
export is cut from the functional backbone's graph, so it holds only the
layers the chosen output depends on: serving the deepest exit drops every
auxiliary head; serving exit ``k`` also drops the stages after ``k``.

The normalisation the model was trained with (``model.input_mean`` and
``model.input_std``) is part of the exported graph, so clients send raw
pixels in 0..255, as uint8 or float32, under the input name
``pixels_0_to_255`` (`PIXELS`). The default signatures take images of the
model's size, ``[batch, H, W, C]``, which TFLite and ONNX converters take;
the ``serve_any_size`` signatures also take other heights and widths,
resized as the training data were (bilinear, antialiased, rounded to whole
pixel values). Another number of channels is refused, and so are float
pixels that look scaled to 0..1 (see `raw_pixel_normalizer`). A batch of
no image gets answers of 0 rows. Every export answers with

- ``probabilities``: float32 ``[batch, classes]``;
- ``logits``: float32 ``[batch, classes]`` (for the ensemble, the log of its
  mean probabilities, so that ``softmax(logits) == probabilities``);
- ``class_ids``: int64 ``[batch]``, the most probable class;
- ``class_names``: string ``[batch]``, that class's name;
- ``exit_ids`` (cascade only): int32 ``[batch]``, the 1-based exit that
  answered.

With ``temperatures`` (temperature scaling, fitted by ``selfkd-eval
--fit_temperature``) every exit's logits are divided by its temperature
before anything else, so the probabilities are calibrated.

Signatures: ``serving_default`` (float32 pixels), ``serve_uint8`` (uint8
pixels), ``serve_any_size`` and ``serve_any_size_uint8`` (any height and
width), ``classes`` (no input: every class name, in class-id order) and
``calibration`` (no input: the temperatures, 1 for every exit when none
were given, and ``fitted_on``, what they were fitted on). A cascade also
has ``serve_with_threshold`` and ``serve_uint8_with_threshold`` (pixels and
a float32 scalar ``threshold``; one that is negative, NaN or infinite fails
the call with ``InvalidArgumentError``) and ``stage_examples`` (no input:
how many examples each stage has run on since loading). The loaded object
has the functions ``serve``, ``serve_uint8``, ``serve_any_size``,
``serve_any_size_uint8`` (a cascade's take an optional ``threshold``),
``classes``, ``calibration`` and, for a cascade, ``stage_examples``.

Example:

```python
summary = export_saved_model(model, "export/deepest", class_names=names)
export_saved_model(model, "export/exit2", exit=2)
export_saved_model(model, "export/ensemble", exit="ensemble")
export_saved_model(model, "export/cascade", exit="cascade", threshold=0.9)

served = tf.saved_model.load("export/cascade")      # no selfkd_tf needed
served.serve(tf.zeros([1, 32, 32, 3]))["class_names"]
served.serve_uint8(images_uint8, threshold=0.8)["exit_ids"]
served.classes()                                     # every class name
```
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf.data.sources.arrays import resize_uint8
from selfkd_tf.files import check_creatable, is_within
from selfkd_tf.models.costs import count_flops, count_parameters, exit_costs
from selfkd_tf.models.multi_exit import ENSEMBLE, exit_model
from selfkd_tf.serving.cascade import EarlyExitCascade, check_temperatures, check_threshold

CASCADE = "cascade"
SAVED_MODEL_FILE = "saved_model.pb"
"""The file that marks a directory as a SavedModel, which ``overwrite`` may replace."""


def resolve_exit(exit: int | str, num_exits: int) -> int | str:  # noqa: A002
    """``"deepest"``, ``"ensemble"``, ``"cascade"``, ``k`` or ``"k"`` -> ``k`` or the name.

    Raises:
        ValueError: ``exit`` names no exit of an ``num_exits``-exit model.
    """
    if exit == "deepest":
        return num_exits
    if exit in (ENSEMBLE, CASCADE):
        return exit
    try:
        index = int(exit)
    except (TypeError, ValueError):
        index = None
    if index is None or not 1 <= index <= num_exits or str(exit).strip() != str(index):
        raise ValueError(
            f"exit: got {exit!r}; allowed: 1..{num_exits}, deepest, {ENSEMBLE}, {CASCADE}")
    return index


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What `export_saved_model` wrote, and its cost next to the training model.

    ``*_flops`` are per image (see `count_flops`); ``training_*`` describe the
    whole multi-exit network. For a cascade, ``flops`` is the cost of an
    image that reaches the deepest exit and ``exit_flops[k - 1]`` that of
    an image answered at exit ``k``.
    """

    path: str
    exit: int | str
    params: int
    flops: int
    training_params: int
    training_flops: int
    threshold: float | None = None
    exit_flops: tuple[int, ...] | None = None
    temperatures: tuple[float, ...] | None = None

    def table(self) -> str:
        """The export's parameters and FLOPs next to the training model's."""
        rows = [("export", f"{self.params:,}", self.flops),
                ("training model", f"{self.training_params:,}", self.training_flops)]
        rows += [(f"answer at exit {k}", "", flops)
                 for k, flops in enumerate(self.exit_flops or (), start=1)]
        width = max(16, *(len(name) + 2 for name, _, _ in rows))
        lines = [f"{'':<{width}}{'params':>14}{'FLOPs/image':>16}"]
        lines += [f"{n:<{width}}{p:>14}{f:>16,}" for n, p, f in rows]
        return "\n".join(lines)


PIXELS = "pixels_0_to_255"
"""The name of every serving signature's image input: raw pixels, 0..255."""

_RANGE_PROBLEM = (f"{PIXELS}: every value lies in [0, 1] and some are fractions: these "
                  "look like pixels scaled to 0..1; send them in 0..255 (multiply by 255)")


def raw_pixel_normalizer(model, any_size: bool = False):
    """Maps raw pixels to the model's input, as the data pipeline did.

    Args:
        model: a `SelfKDModel` (it provides ``backbone``, ``input_mean`` and
            ``input_std``).
        any_size: whether images of another height and width than the
            model's are taken, and resized as
            `selfkd_tf.data.sources.arrays.resize_uint8` resized the
            training images (an antialiased resize, which TFLite cannot
            convert); otherwise they must have the model's size.

    Returns:
        A function of uint8 or float32 ``[B, h, w, C]`` pixels in 0..255 that
        returns float32 ``[B, H, W, C]``, ``(x / 255 - mean) / std``, with
        ``(H, W)`` the model's size. Float pixels that all lie in ``[0, 1]``
        with some fractions (pixels scaled to 0..1, which the model would
        misread as near-black) fail the call with
        `tf.errors.InvalidArgumentError`.

    Raises:
        ValueError: the model records no input normalisation.
    """
    if model.input_mean is None or model.input_std is None:
        raise ValueError("model: it records no input normalisation (input_mean, input_std)")
    height, width, channels = model.backbone.input.shape[1:]
    # The data pipeline's normalisation, (x / 255 - mean) / std, as the same
    # float32 multiply-add, so the export sees the pixels training saw.
    std = np.asarray(model.input_std, np.float32)
    scale = tf.constant(1.0 / (255.0 * std))
    shift = tf.constant(-np.asarray(model.input_mean, np.float32) / std)

    def normalize(images):
        pixels = tf.cast(images, tf.float32)
        if images.dtype != tf.uint8:
            # A 0..255 image of whole values, or one with any value above 1,
            # passes; a black image (all 0) too.
            scaled = tf.logical_and(tf.reduce_max(pixels) <= 1.0,
                                    tf.reduce_any(tf.not_equal(pixels, tf.round(pixels))))
            with tf.control_dependencies([tf.debugging.Assert(
                    tf.logical_not(scaled), [_RANGE_PROBLEM])]):
                pixels = tf.identity(pixels)
        if any_size:
            pixels = tf.cond(
                tf.reduce_all(tf.shape(pixels)[1:3] == [height, width]),
                lambda: pixels,
                lambda: tf.cast(resize_uint8(pixels, (height, width)), tf.float32))
        return tf.ensure_shape(pixels, [None, height, width, channels]) * scale + shift

    return normalize


def check_export_arguments(
    model, path: str, exit: int | str, overwrite: bool,  # noqa: A002
    threshold: float | None,
) -> int | str:
    """Checks `export_saved_model`'s arguments before any work; returns the exit.

    Raises:
        ValueError: as `export_saved_model`.
    """
    exit = resolve_exit(exit, model.num_exits)  # noqa: A001
    if (exit == CASCADE) != (threshold is not None):
        raise ValueError("threshold: required with exit=cascade, and used only there")
    if threshold is not None:
        check_threshold(threshold)
    check_export_path(path, overwrite)
    return exit


def check_export_path(path: str, overwrite: bool, keep: Mapping[str, str] | None = None) -> None:
    """Refuses an export path whose writing would destroy anything but an export.

    ``path`` may be new (its missing parents are created) or, with
    ``overwrite``, an existing SavedModel directory (one holding
    `SAVED_MODEL_FILE`) or an empty directory, which the export replaces.
    Anything else is refused, with or without ``overwrite``: a file, a
    symbolic link, a directory holding other files, a path under a file or
    in a directory this process cannot write in, and a path that is or
    contains the current directory or one of ``keep``.

    Args:
        path: the SavedModel directory to write.
        overwrite: whether an existing SavedModel (or empty directory) may
            be replaced.
        keep: more paths the export must leave alone, each under a
            description for the message, e.g.
            ``{"the model's run directory": "runs/a"}``.

    Raises:
        ValueError: ``"out: <problem>"`` on one line, naming the path.

    Example:

    >>> check_export_path("runs/a/export", overwrite=True,  # doctest: +SKIP
    ...                   keep={"the model's run directory": "runs/a"})
    >>> check_export_path("runs/a", overwrite=True,  # doctest: +SKIP
    ...                   keep={"the model's run directory": "runs/a"})
    Traceback (most recent call last):
    ValueError: out: runs/a is the model's run directory (runs/a); export to another directory
    """
    try:
        check_creatable(path)
    except ValueError as err:
        raise ValueError(f"out: {err}") from None
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        raise ValueError(f"out: {path} is a symbolic link; give the directory itself")
    real = os.path.realpath(path)
    for description, kept in {"the current directory": os.getcwd(), **(keep or {})}.items():
        kept_real = os.path.realpath(kept)
        if is_within(kept_real, real):
            relation = "is" if real == kept_real else "contains"
            raise ValueError(f"out: {path} {relation} {description} ({kept}); "
                             "export to another directory")
    if not os.path.isdir(path):
        raise ValueError(f"out: {path} is a file; a SavedModel is a directory")
    try:
        entries = os.listdir(path)
    except OSError as err:
        raise ValueError(f"out: cannot read {path}: {err.strerror or err}") from None
    if entries and SAVED_MODEL_FILE not in entries:
        raise ValueError(
            f"out: {path} is a directory holding other files than a SavedModel; "
            "--overwrite replaces only a SavedModel or an empty directory")
    if not overwrite:
        raise ValueError(f"out: {path} exists; pass --overwrite to replace it")


def _check_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names: got {len(names)} names for a model of {num_classes} classes")
    return names


def export_saved_model(
    model,
    path: str,
    exit: int | str = "deepest",  # noqa: A002
    overwrite: bool = False,
    threshold: float | None = None,
    class_names: Sequence[str] | None = None,
    temperatures: Sequence[float] | None = None,
    calibration: str = "",
) -> ExportSummary:
    """Writes a SavedModel serving a classifier of ``model`` to ``path``.

    Args:
        model: a `selfkd_tf.distillation.model.SelfKDModel` (it provides ``backbone``,
            ``num_exits``, ``num_classes``, ``input_mean`` and ``input_std``).
        path: the SavedModel directory. It is written under a temporary name
            and renamed, so it never holds half an export.
        exit: ``"deepest"``, a 1-based exit index, ``"ensemble"`` or
            ``"cascade"``.
        overwrite: replace an existing SavedModel (or empty directory) at
            ``path``; nothing else is ever replaced (`check_export_path`).
        threshold: the cascade's default confidence threshold (``>= 0``);
            required with ``exit="cascade"`` and refused otherwise.
        class_names: one name per class, in class-id order; default
            ``"0"``, ``"1"``, ...
        temperatures: optional, one per exit (temperature scaling,
            `selfkd_tf.metrics.calibration`): exit ``k`` serves
            ``z_k / T_k`` as its logits and their softmax as its
            probabilities; the ensemble averages the scaled exits, the
            cascade compares the threshold with the scaled confidences.
        calibration: what the temperatures were fitted on, e.g. ``"test
            split, stratified half 1 of 2 (seed 0), 5000 examples"``; the
            ``calibration`` signature returns it.

    Returns:
        An `ExportSummary`.

    Raises:
        ValueError: invalid ``exit``, ``threshold`` or ``class_names``, or
            a ``path`` `check_export_path` refuses.
        OSError: the SavedModel cannot be written (e.g. the disk is full);
            ``path`` and its parents are then as they were.
    """
    exit = check_export_arguments(model, path, exit, overwrite, threshold)  # noqa: A001
    names = _check_class_names(class_names, model.num_classes)
    temperatures = check_temperatures(temperatures, model.num_exits)
    raw_pixel_normalizer(model)  # refuses a model without its normalisation
    archive = keras.export.ExportArchive()
    if exit == CASCADE:
        cascade = EarlyExitCascade(model.backbone, threshold, temperatures=temperatures)
        _add_cascade_endpoints(archive, cascade, model, tf.constant(names))
        costs = exit_costs(model.backbone)
        exit_flops = tuple(costs.cascade_exit(k) for k in range(1, model.num_exits + 1))
        network, flops = model.backbone, exit_flops[-1]
        threshold = cascade.threshold
    else:
        network = exit_model(model.backbone, exit)
        served = range(model.num_exits) if exit == ENSEMBLE else [exit - 1]
        scales = None if temperatures is None else [temperatures[k] for k in served]
        _add_classifier_endpoints(archive, network, model, tf.constant(names), scales)
        flops, exit_flops = count_flops(network), None
    archive.track(network)
    archive.add_endpoint("classes", lambda: tf.constant(names), input_signature=[])
    served_temperatures = tf.constant(temperatures or (1.0,) * model.num_exits, tf.float32)
    fitted_on = tf.constant(calibration if temperatures else "not temperature-scaled")
    archive.add_endpoint(
        "calibration", lambda: {"temperatures": served_temperatures, "fitted_on": fitted_on},
        input_signature=[])
    _write_replacing(archive, path, overwrite)
    return ExportSummary(
        path=path, exit=exit, params=count_parameters(network), flops=flops,
        training_params=count_parameters(model.backbone),
        training_flops=count_flops(model.backbone),
        threshold=threshold, exit_flops=exit_flops, temperatures=temperatures,
    )


def _write_replacing(archive: keras.export.ExportArchive, path: str, overwrite: bool) -> None:
    """Writes ``archive`` to ``path`` so that no failure leaves half an export.

    The SavedModel is written to a temporary directory beside ``path`` and
    renamed; an export it replaces is moved aside first and deleted only
    once the new one is in place. On any failure the temporary directories
    and the parents this call created are removed, and a replaced export
    is put back.
    """
    parent = os.path.dirname(os.path.abspath(path))
    created, missing = None, parent  # created: the outermost parent made here
    while not os.path.lexists(missing):
        created, missing = missing, os.path.dirname(missing)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    replaced = f"{temporary}-replaced"
    done = False
    try:
        archive.write_out(temporary, verbose=False)
        os.chmod(temporary, 0o755)  # mkdtemp's directory is owner-only
        check_export_path(path, overwrite)  # again: the directory may have changed
        if os.path.lexists(path):
            os.replace(path, replaced)
        try:
            os.replace(temporary, path)
        except BaseException:
            if os.path.lexists(replaced):
                os.replace(replaced, path)
            raise
        done = True
    finally:
        for leftover in (temporary, replaced):
            if os.path.lexists(leftover):
                shutil.rmtree(leftover)
        if not done and created is not None:
            shutil.rmtree(created, ignore_errors=True)


def _pixel_specs(network: keras.Model) -> list[tuple[str, tf.TensorSpec, bool]]:
    """``(name suffix, input spec, any size)`` of every image signature."""
    height, width, channels = network.input.shape[1:]
    return [
        (suffix, tf.TensorSpec([None, *size, channels], dtype, name=PIXELS), any_size)
        for any_size, size in ((False, (height, width)), (True, (None, None)))
        for suffix, dtype in (("", tf.float32), ("_uint8", tf.uint8))
    ]


def _answer(probabilities, logits, names) -> dict[str, tf.Tensor]:
    class_ids = tf.argmax(probabilities, axis=-1)
    return {"probabilities": probabilities, "logits": logits, "class_ids": class_ids,
            "class_names": tf.gather(names, class_ids)}


def _add_classifier_endpoints(archive, network, model, names, temperatures) -> None:
    def serving_function(any_size):
        normalize = raw_pixel_normalizer(model, any_size)

        def serve(images):
            pixels = normalize(images)
            # oneDNN's kernels fail on an empty batch: the network sees at
            # least one (blank) image, whose answer is dropped. A tf.cond
            # would hide the weights from converters (tf2onnx).
            batch = tf.shape(pixels)[0]
            padded = tf.concat([pixels, tf.zeros([1, *pixels.shape[1:]])], axis=0)[
                :tf.maximum(batch, 1)]
            logits = [tf.cast(z, tf.float32)[:batch]
                      for z in tf.nest.flatten(network(padded, training=False))]
            if temperatures is not None:
                logits = [z / t for z, t in zip(logits, temperatures)]
            if len(logits) == 1:
                return _answer(tf.nn.softmax(logits[0]), logits[0], names)
            probabilities = tf.add_n([tf.nn.softmax(z) for z in logits]) / len(logits)
            return _answer(probabilities, tf.math.log(probabilities), names)

        return serve

    for suffix, spec, any_size in _pixel_specs(network):
        name = f"serve{'_any_size' if any_size else ''}{suffix}"
        archive.add_endpoint(name, serving_function(any_size), input_signature=[spec])


def _add_cascade_endpoints(archive, cascade, model, names) -> None:
    for suffix, spec, any_size in _pixel_specs(model.backbone):
        serve, serve_with_threshold = _cascade_functions(
            cascade, raw_pixel_normalizer(model, any_size), names, spec)
        prefix = "serve_any_size" if any_size else "serve"
        archive.add_endpoint(f"{prefix}{suffix}", serve)
        if not any_size:
            archive.add_endpoint(f"{prefix}{suffix}_with_threshold", serve_with_threshold)
    archive.add_endpoint("stage_examples", cascade.stage_examples.read_value,
                         input_signature=[])


def _cascade_functions(cascade, normalize, names, images_spec):
    """The traced ``serve(images, threshold=None)`` and ``serve_with_threshold``."""
    threshold_spec = tf.TensorSpec([], tf.float32, name="threshold")

    # No Python control flow to convert; AutoGraph would also mistake the
    # closures of the several exports for one another.
    @tf.function(input_signature=[images_spec, threshold_spec], autograph=False)
    def serve_with_threshold(images, threshold):
        outputs = cascade(normalize(images), threshold)
        logits = outputs["logits"]
        return {**_answer(tf.nn.softmax(logits), logits, names),
                "exit_ids": outputs["exit_ids"]}

    # Traced for both calls, so the loaded ``serve`` takes an optional
    # threshold; each trace calls the one cascade graph above.
    @tf.function(autograph=False)
    def serve(images, threshold=None):
        return serve_with_threshold(
            images, cascade.threshold if threshold is None else threshold)

    serve_with_threshold.get_concrete_function()
    serve.get_concrete_function(images_spec)
    serve.get_concrete_function(images_spec, threshold_spec)
    return serve, serve_with_threshold
