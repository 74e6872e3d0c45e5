"""The multi-exit contract: what a backbone must output, and where its exits sit.

A multi-exit backbone is a functional `keras.Model` from images
``[B, H, W, C]`` to

    {"logits": [z_1, ..., z_N], "features": [F_1, ..., F_N]}

with ``N >= 1`` exits numbered from the shallowest (1) to the deepest (N),
``z_i`` float ``[B, classes]`` and ``F_i`` float ``[B, D]`` (every exit has
the deepest feature's width ``D``, so the feature losses can compare them).
`selfkd_tf.distillation.model.SelfKDModel` trains such a model,
`selfkd_tf.serving` serves it.

Exit ``k`` is the branch `attach_exits` adds on a tensor of the backbone,
its *stage*: an exit head (`selfkd_tf.models.exit_heads`, for every exit
but the deepest) and a classifier, all in layers named ``exit{k}_*``. What
the rest of the library needs to know of an exit is found through those
layers, whatever the backbone: the stage is the one tensor the exit's layers
read from outside the exit (`exit_segments`), so the network can be cut into
the consecutive pieces an early-exit cascade runs one by one.

- `check_multi_exit` checks a model against the contract, in one line;
- `as_multi_exit` takes a plain classifier as a one-exit network;
- `attach_exits` adds the exits to a backbone's stages;
- `exit_model` cuts the classifier of one exit (or of the ensemble);
- `exit_segments` cuts the network into stages and exit heads.

Example:

```python
backbone = build_multi_exit_resnet("resnet18", num_classes=10)
num_exits, num_classes, width = check_multi_exit(backbone)   # 4, 10, 512
deepest = exit_model(backbone, num_exits)                    # images -> [z_4]
segments = exit_segments(backbone)                           # 4 stages, 4 heads
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras

from selfkd_tf.models import stages
from selfkd_tf.models.exit_heads import exit_classifier, get_exit_head

ENSEMBLE = "ensemble"
"""`exit_model`'s name for the mean of every exit's probabilities."""

_CONTRACT = ('a functional keras.Model whose output is {"logits": [z_1..z_N], '
             '"features": [F_1..F_N]} (build one with '
             "selfkd_tf.build_multi_exit_resnet)")


def _describe(output) -> str:
    if isinstance(output, dict):
        return f"a dict with the keys {sorted(map(str, output))}"
    if isinstance(output, (list, tuple)):
        return f"a list of {len(output)} tensors"
    return f"one tensor of shape {tuple(getattr(output, 'shape', ()))}"


def check_multi_exit(backbone) -> tuple[int, int, int]:
    """Checks that ``backbone`` keeps the multi-exit contract.

    Args:
        backbone: the model to check.

    Returns:
        ``(N, classes, D)``: the number of exits, of classes and the
        features' width.

    Raises:
        ValueError: one line, starting ``backbone:``, saying what differs
            from the contract: not a functional model, another output
            structure, lists of different lengths, exits with different
            numbers of classes or feature widths, tensors that are not
            ``[batch, n]``.

    Example:

    >>> check_multi_exit(keras.applications.MobileNetV3Small(weights=None))
    Traceback (most recent call last):
    ValueError: backbone: expected a functional keras.Model whose output is ...
    """
    if not isinstance(backbone, keras.Model):
        raise ValueError(f"backbone: expected {_CONTRACT}; got {type(backbone).__name__}")
    try:
        output = backbone.output
    except (AttributeError, ValueError):
        raise ValueError(
            f"backbone: expected {_CONTRACT}; got a {type(backbone).__name__} "
            "without symbolic outputs (a subclassed model)") from None
    if not (isinstance(output, dict) and set(output) == {"logits", "features"}
            and all(isinstance(output[k], (list, tuple)) for k in output)):
        raise ValueError(f"backbone: expected {_CONTRACT}; got {_describe(output)}")
    logits, features = output["logits"], output["features"]
    if not logits or len(logits) != len(features):
        raise ValueError(
            f"backbone: expected as many features as logits, at least one; got "
            f"{len(logits)} logits and {len(features)} features")
    for kind, tensors in (("logits", logits), ("features", features)):
        shapes = [tuple(t.shape) for t in tensors]
        if any(len(s) != 2 or s[-1] is None for s in shapes):
            raise ValueError(f"backbone: every {kind} tensor must be [batch, n]; got {shapes}")
        if len({s[-1] for s in shapes}) != 1:
            raise ValueError(
                f"backbone: every exit's {kind} must have the same width; got {shapes}")
    return len(logits), int(logits[-1].shape[-1]), int(features[-1].shape[-1])


def as_multi_exit(model: keras.Model) -> keras.Model:
    """``model`` itself if it keeps the contract; a plain classifier as one exit.

    A functional model from images to logits ``[B, classes]`` becomes a
    one-exit network whose feature is its logits (with one exit no feature
    loss reads them), sharing its layers.

    Raises:
        ValueError: one line: the classifier outputs probabilities (a
            softmax), from which the objective cannot recover logits.
    """
    output = getattr(model, "output", None) if isinstance(model, keras.Model) else None
    if output is None or isinstance(output, (dict, list, tuple)) or len(output.shape) != 2:
        return model
    _refuse_probabilities(model.name, output)
    return keras.Model(model.input, {"logits": [output], "features": [output]},
                       name=model.name)


def _refuse_probabilities(name: str, output) -> None:
    """Raises when ``output`` comes out of a softmax: probabilities, which
    neither the objective (it needs logits) nor an exit (it needs features)
    can use."""
    producer = output._keras_history.operation
    activation = getattr(producer, "activation", None)
    if (isinstance(producer, keras.layers.Softmax)
            or getattr(activation, "__name__", None) == "softmax"):
        raise ValueError(
            f"backbone: {name} outputs probabilities (its last layer "
            f"{producer.name!r} applies a softmax); build it to output logits "
            "(keras.applications: classifier_activation=None) or features "
            "(include_top=False)")


def attach_exits(
    backbone: keras.Model,
    num_classes: int,
    exits: str | int | Sequence[str] = "auto",
    exit_head: str = "bottleneck",
    *,
    image_shape: Sequence[int] | None = None,
    sync_batchnorm: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Gives any functional model a classifier exit at each of its stages.

    The deepest exit reads the backbone's output: a feature map ``[B, h, w,
    D]`` is pooled, features ``[B, D]`` are used as they are. Every other
    exit reads a stage (`selfkd_tf.models.stages`): an exit head maps it to
    ``D`` channels at about the deepest map's resolution (whatever the
    channels and the resolution ratio), then the exit pools it into its
    feature ``F_k [B, D]`` and classifies that into ``z_k [B, classes]``
    (`selfkd_tf.models.exit_heads`). Layers are named ``exit{k}_*``. The
    heads never feed back into the backbone, so the deepest exit is the
    backbone plus its classifier, and the network can be cut at every
    exit's stage into the consecutive pieces a cascade runs.

    Args:
        backbone: a functional (or built sequential) model of one image
            input, without its classifier: ``include_top=False`` for
            keras.applications, a keras-hub backbone, or one of your own.
            Nested functional models are looked into.
        num_classes: classes of every exit.
        exits: where the shallow exits attach (see
            `selfkd_tf.models.stages.resolve_exits`): ``"auto"`` (one exit
            per stage before the deepest resolution, at most 4 exits in
            all), a number of exits ``N`` (the deepest included), or the
            references of the stages, shallowest first, as `find_stages`
            lists them; the last may name the backbone's output.
        exit_head: one of `selfkd_tf.models.exit_heads.EXIT_HEADS`.
        image_shape: ``(height, width, channels)`` of the images, needed
            when the backbone's input leaves them open.
        sync_batchnorm: whether the heads' batch norms synchronise their
            statistics across replicas.
        name: the model's name; default ``f"{backbone.name}_multi_exit"``.

    Returns:
        A functional model with the multi-exit contract (`check_multi_exit`)
        on an input named ``"image"`` of ``image_shape``, sharing the
        backbone's layers (nested models are inlined: their layers become
        the new model's).

    Raises:
        ValueError: one line: a subclassed model, an unknown
            ``exit_head``, ``exits`` that name no tensor, one the graph
            cannot be cut at, or more exits than stages, or an output that
            is neither a feature map nor features.

    Example:

    ```python
    trunk = keras.applications.MobileNetV3Small(
        input_shape=(96, 96, 3), include_top=False, weights=None)
    backbone = attach_exits(trunk, num_classes=10, exit_head="pooled")
    model = SelfKDModel(backbone, num_train_examples=5000)
    ```
    """
    head = get_exit_head(exit_head)
    flat = stages.flatten(backbone, image_shape, allow_open=True)
    output = flat.output
    if len(output.shape) not in (2, 4) or output.shape[-1] is None:
        raise ValueError(
            f"backbone: its output must be a feature map [B, h, w, D] or features [B, D]; "
            f"got {tuple(output.shape)} (pool token outputs into features first)")
    if len(output.shape) == 2:
        _refuse_probabilities(backbone.name, output)
    shallow = stages.resolve_exits(flat, exits)
    ratios = _resolution_ratios(backbone, flat, shallow, image_shape)
    channels = [x.shape[-1] for x in shallow] + [output.shape[-1]]
    logits, features = [], []
    for k, x in enumerate(shallow, start=1):
        ratio = ratios[k - 1]
        x = head(x, tuple(channels[k:]), ratio, sync_batchnorm=sync_batchnorm,
                 name=f"exit{k}_head")
        feature, logit = exit_classifier(x, num_classes, k)
        features.append(feature)
        logits.append(logit)
    feature, logit = exit_classifier(output, num_classes, len(shallow) + 1)
    features.append(feature)
    logits.append(logit)
    return keras.Model(flat.inputs, {"logits": logits, "features": features},
                       name=name or f"{backbone.name}_multi_exit")


PROBE_SIZE = 512
"""Height and width at which the resolution ratios of a backbone of open
image size are measured (a multiple of every usual total stride)."""


def _resolution_ratios(backbone, flat, shallow, image_shape) -> list[int]:
    """Each shallow exit's resolution over the deepest feature map's, >= 1.

    A backbone of open image size is measured at `PROBE_SIZE` (the ratios
    of a convolutional network do not depend on it).
    """
    if any(size is None for size in flat.inputs.shape[1:3]):
        channels = flat.inputs.shape[-1]
        probe = stages.flatten(backbone, (PROBE_SIZE, PROBE_SIZE, channels))
        shallow = [probe.tensors[flat.reference_of(x)] for x in shallow]
        flat = probe
    output = flat.output
    deepest = output if len(output.shape) == 4 else stages.stage_tensors(flat)[-1]
    return [max(1, round(x.shape[1] / deepest.shape[1])) for x in shallow]


def exit_model(backbone: keras.Model, exit: int | str) -> keras.Model:  # noqa: A002
    """The sub-model of ``backbone`` computing one exit's logits, or every exit's.

    Args:
        backbone: a multi-exit backbone.
        exit: a 1-based exit index, or `ENSEMBLE`.

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
class ExitSegments:
    """A multi-exit backbone cut into the pieces a cascade runs one by one.

    Attributes:
        stages: ``N`` functional models; ``stages[0]`` maps the (normalised)
            image ``[B, H, W, C]`` to exit 1's stage, and ``stages[k]`` maps
            exit ``k``'s stage to exit ``k + 1``'s.
        heads: ``N`` functional models; ``heads[k]`` maps exit ``k + 1``'s
            stage to its logits ``[B, classes]``.

    They share the backbone's layers and weights, so
    ``heads[k](stages[k](...stages[0](x)))`` is the backbone's
    ``logits[k]``.
    """

    stages: tuple[keras.Model, ...]
    heads: tuple[keras.Model, ...]


def _nodes(model: keras.Model) -> list:
    """The nodes of ``model``'s own graph (a layer called elsewhere too has
    nodes of other graphs)."""
    return [node for nodes in model._nodes_by_depth.values() for node in nodes]


def exit_stage(backbone: keras.Model, exit: int):  # noqa: A002
    """The tensor of ``backbone`` that exit ``exit`` (1-based) reads: its stage.

    Found through the exit itself: the one tensor that the exit's layers
    (named ``exit{k}_*`` by `attach_exits`) read from outside the exit.

    Raises:
        ValueError: the exit has no layers, or they read more than one
            tensor of the rest of the network.
    """
    prefix = f"exit{exit}_"
    inside = lambda operation: operation.name.startswith(prefix)  # noqa: E731
    read = {}
    for node in _nodes(backbone):
        if inside(node.operation):
            for tensor in node.input_tensors:
                if not inside(tensor._keras_history.operation):
                    read[id(tensor)] = tensor
    if len(read) != 1:
        raise ValueError(
            f"backbone: exit {exit} must read one tensor of the network through its "
            f"layers '{prefix}*'; found {len(read)}")
    return next(iter(read.values()))


def exit_segments(backbone: keras.Model) -> ExitSegments:
    """Cuts a multi-exit backbone into stages and exit heads.

    Args:
        backbone: a multi-exit backbone whose exits were attached by
            `attach_exits` (`exit_stage` finds each exit's stage).

    Returns:
        `ExitSegments`.

    Raises:
        ValueError: an exit's stage cannot be found, or a piece between two
            stages needs anything but the shallower stage (Keras then finds
            the cut graph disconnected).
    """
    num_exits, _, _ = check_multi_exit(backbone)
    logits = backbone.output["logits"]
    ends = [exit_stage(backbone, k) for k in range(1, num_exits + 1)]
    starts = [backbone.input, *ends[:-1]]
    stages = tuple(keras.Model(start, end, name=f"{backbone.name}_stage{k}")
                   for k, (start, end) in enumerate(zip(starts, ends), start=1))
    heads = tuple(keras.Model(end, z, name=f"{backbone.name}_exit{k}")
                  for k, (end, z) in enumerate(zip(ends, logits), start=1))
    return ExitSegments(stages, heads)
