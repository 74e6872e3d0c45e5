"""Serving exports: one classifier of a multi-exit model as a SavedModel.

A trained `SelfKDModel` has N exits; a deployment serves one of them (the
deepest by default, any exit ``k``, or the ensemble of all exits). The export
is cut from the functional backbone's graph, so it holds only the layers the
chosen output depends on: serving the deepest exit drops every auxiliary
head; serving exit ``k`` also drops the stages after ``k``.

The normalisation the model was trained with (``model.input_mean`` and
``model.input_std``) is part of the exported graph, so clients send raw
pixels ``[batch, H, W, C]`` in 0..255, as uint8 or float32, and get

- ``probabilities``: float32 ``[batch, classes]``;
- ``logits``: float32 ``[batch, classes]`` (for the ensemble, the log of its
  mean probabilities, so that ``softmax(logits) == probabilities``);
- ``class_ids``: int64 ``[batch]``, the most probable class.

Signatures: ``serving_default`` (float32 ``images``) and ``serve_uint8``
(uint8 ``images``); the loaded object also has ``serve`` and ``serve_uint8``
functions.

Example:

```python
summary = export_saved_model(model, "export/deepest")           # deepest exit
export_saved_model(model, "export/exit2", exit=2)
export_saved_model(model, "export/ensemble", exit="ensemble")

served = tf.saved_model.load("export/deepest")      # no selfkd_tf needed
served.serve(tf.zeros([1, 32, 32, 3]))["class_ids"]
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

ENSEMBLE = "ensemble"


def count_parameters(model: keras.Model) -> int:
    """Trainable parameters, counted as PyTorch's ``model.parameters()``.

    Batch-norm moving statistics are not parameters; the ``SelfKDModel``'s
    PS-KD tables are not either.
    """
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def count_flops(model: keras.Model) -> int:
    """Floating-point operations of one forward pass on one image.

    Counted by TensorFlow's profiler on the inference graph (a
    multiply-accumulate is two operations); ops without a registered count
    (e.g. activations) add nothing.
    """
    forward = tf.function(lambda images: model(images, training=False))
    graph = forward.get_concrete_function(
        tf.TensorSpec([1, *model.input.shape[1:]], tf.float32)).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    # The v1 profiler warns about its own deprecated internals.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        profile = tf.compat.v1.profiler.profile(
            graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
            options=options)
    finally:
        logger.setLevel(level)
    return int(profile.total_float_ops)


def resolve_exit(exit: int | str, num_exits: int) -> int | str:  # noqa: A002
    """``"deepest"``, ``"ensemble"``, ``k`` or ``"k"`` -> ``k`` or ``"ensemble"``.

    Raises:
        ValueError: ``exit`` names no exit of an ``num_exits``-exit model.
    """
    if exit == "deepest":
        return num_exits
    if exit == ENSEMBLE:
        return ENSEMBLE
    try:
        index = int(exit)
    except (TypeError, ValueError):
        index = None
    if index is None or not 1 <= index <= num_exits or str(exit).strip() != str(index):
        raise ValueError(
            f"exit: got {exit!r}; allowed: 1..{num_exits}, deepest, {ENSEMBLE}")
    return index


def classifier(backbone: keras.Model, exit: int | str) -> keras.Model:  # noqa: A002
    """The sub-model of ``backbone`` computing the chosen exit's logits.

    Args:
        backbone: a functional multi-exit model (``{"logits": [...], ...}``).
        exit: a 1-based exit index or ``"ensemble"``.

    Returns:
        A functional model from the backbone's (normalised) image input to a
        list of logits: ``[z_k]``, or ``[z_1, ..., z_N]`` for the ensemble.
        It shares the backbone's layers and holds only those the outputs
        depend on.
    """
    logits = backbone.output["logits"]
    outputs = logits if exit == ENSEMBLE else [logits[exit - 1]]
    name = f"{backbone.name}_{exit if exit == ENSEMBLE else f'exit{exit}'}"
    return keras.Model(backbone.input, outputs, name=name)


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What `export_saved_model` wrote, and its cost next to the training model.

    ``*_flops`` are per image (see `count_flops`); ``training_*`` describe the
    whole multi-exit network.
    """

    path: str
    exit: int | str
    params: int
    flops: int
    training_params: int
    training_flops: int

    def table(self) -> str:
        """The export's parameters and FLOPs next to the training model's."""
        rows = [("export", self.params, self.flops),
                ("training model", self.training_params, self.training_flops)]
        lines = [f"{'':<16}{'params':>14}{'FLOPs/image':>16}"]
        lines += [f"{n:<16}{p:>14,}{f:>16,}" for n, p, f in rows]
        return "\n".join(lines)


def export_saved_model(
    model, path: str, exit: int | str = "deepest", overwrite: bool = False  # noqa: A002
) -> ExportSummary:
    """Writes a SavedModel serving one classifier of ``model`` to ``path``.

    Args:
        model: a `selfkd_tf.training.SelfKDModel` (it provides ``backbone``,
            ``num_exits``, ``input_mean`` and ``input_std``).
        path: the SavedModel directory. It is written under a temporary name
            and renamed, so it never holds half an export.
        exit: ``"deepest"``, a 1-based exit index, or ``"ensemble"``.
        overwrite: replace an existing ``path``.

    Returns:
        An `ExportSummary`.

    Raises:
        ValueError: invalid ``exit``, or ``path`` exists and not ``overwrite``.
    """
    exit = resolve_exit(exit, model.num_exits)  # noqa: A001
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"out: {path} exists; pass --overwrite to replace it")
    if model.input_mean is None or model.input_std is None:
        raise ValueError("model: it records no input normalisation (input_mean, input_std)")
    network = classifier(model.backbone, exit)
    # The data pipeline's normalisation, (x / 255 - mean) / std, as the same
    # float32 multiply-add, so the export sees the pixels training saw.
    std = np.asarray(model.input_std, np.float32)
    scale = tf.constant(1.0 / (255.0 * std))
    shift = tf.constant(-np.asarray(model.input_mean, np.float32) / std)

    def serve(images):
        outputs = network(tf.cast(images, tf.float32) * scale + shift, training=False)
        logits = [tf.cast(z, tf.float32) for z in tf.nest.flatten(outputs)]
        if len(logits) == 1:
            logits = logits[0]
            probabilities = tf.nn.softmax(logits)
        else:
            probabilities = tf.add_n([tf.nn.softmax(z) for z in logits]) / len(logits)
            logits = tf.math.log(probabilities)
        return {"probabilities": probabilities, "logits": logits,
                "class_ids": tf.argmax(probabilities, axis=-1)}

    shape = [None, *network.input.shape[1:]]
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(
        "serve", serve, input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    archive.add_endpoint(
        "serve_uint8", serve, input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")])
    temporary = f"{os.path.normpath(path)}.tmp-{os.getpid()}"
    archive.write_out(temporary, verbose=False)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(temporary, path)
    return ExportSummary(
        path=path, exit=exit,
        params=count_parameters(network), flops=count_flops(network),
        training_params=count_parameters(model.backbone),
        training_flops=count_flops(model.backbone),
    )
