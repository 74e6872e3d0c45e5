"""Where exits can attach to any functional Keras model: its stages.

An exit can attach to a tensor that every path from the image to the output
passes through (a *cut point*): the network before it and after it are then
consecutive pieces, which an early-exit cascade runs one by one. A *stage*
is the last cut point at its resolution. `find_stages` lists the stages of
any functional or sequential model (keras.applications, keras-hub
backbones, hand-written ones), whatever its blocks: residual adds written
as ``x + y`` (Keras operations, not layers) and nested functional models
(ConvNeXt's stages, keras-hub's) are looked into.

A tensor is named by a *reference* that stays the same in every process:

- ``"layer_name"``: the layer's output;
- ``"layer_name:input"``: the tensor that feeds the layer, for a tensor no
  layer with a name of its own produces (a residual ``x + y``, or a layer
  Keras named itself);
- ``"outer/inner"``: a layer inside the nested model ``outer``.

Names Keras gave itself (``activation_18``, ``add_3``) are numbered in the
order layers are built in a process, so they name other layers in another
process; references avoid them where the graph allows, and
`resolve_exits` refuses them.

Example:

```python
backbone = keras.applications.MobileNetV3Small(
    input_shape=(224, 224, 3), include_top=False, weights=None,
    include_preprocessing=False)
for stage in find_stages(backbone):
    print(stage.reference, stage.shape, stage.stride)
# expanded_conv_project_bn (112, 112, 16) 2.0
# expanded_conv_2_add (28, 28, 24) 8.0   ... and so on
```
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import keras

MAX_AUTO_EXITS = 4
"""How many exits ``exits="auto"`` attaches at most, the deepest included:
the paper's 4 (one per ResNet stage)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """A point of the network where an exit can attach.

    Attributes:
        reference: how `resolve_exits` names it (see the module docstring).
        shape: ``(height, width, channels)`` of its tensor.
        stride: the image's height over the tensor's, e.g. 8.0.
    """

    reference: str
    shape: tuple[int, int, int]
    stride: float


def _snake_case(name: str) -> str:
    """The name Keras gives a layer of class ``name`` (``ReLU`` -> ``re_lu``)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclasses.dataclass
class FlatGraph:
    """A model rebuilt on a fixed input, with every tensor in reach.

    Attributes:
        inputs: the new image input ``[B, H, W, C]``.
        output: the model's output, computed by the model's own layers
            (shared: same weights) from ``inputs``.
        tensors: reference -> tensor, for every layer's output and input.
        numbered: the references that rest on a name Keras gave itself.
        cuts: the cut points, in order from the image to the output.
        weighted: ids of the tensors computed with some layer's weights.
    """

    inputs: object
    output: object
    tensors: dict[str, object]
    numbered: set[str]
    cuts: list[object]
    weighted: set[int]

    def reference_of(self, tensor) -> str:
        """The reference of ``tensor``, one that stays the same across
        processes where there is one."""
        named = [name for name, t in self.tensors.items() if t is tensor]
        stable = [name for name in named if name not in self.numbered]
        return (stable or named)[0]


def _graph_of(model) -> keras.Model | None:
    """The functional graph of ``model``: itself, or a built Sequential's."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, keras.Model) and hasattr(model, "_run_through_graph"):
        return model
    return None


def flatten(backbone: keras.Model, image_shape: Sequence[int] | None = None,
            *, allow_open: bool = False) -> FlatGraph:
    """``backbone``'s graph on an input of ``image_shape``, nested models inlined.

    Where the graph is already there (same input shape, no nested model
    upstream), its own tensors are reused, so the backbone's layers keep one
    node each and ``layer.output`` still names their tensor; elsewhere the
    backbone's layers are called anew (sharing their weights).

    Args:
        backbone: a functional or built sequential model of one image input
            and one output.
        image_shape: ``(height, width, channels)``; default the backbone's.
        allow_open: whether a height or width may stay open (None): the
            graph can then be cut at named tensors, but its stages, which
            are found by resolution, cannot be listed.

    Raises:
        ValueError: one line: ``backbone`` is not a functional model (a
            subclassed model has no graph to look into), has several inputs
            or outputs, or leaves the image size open and no
            ``image_shape`` is given (unless ``allow_open``).
    """
    graph = _graph_of(backbone)
    if graph is None or len(graph.inputs) != 1:
        kind = type(backbone).__name__
        raise ValueError(
            f"backbone: exits attach to a functional keras.Model of one image input; got "
            f"a {kind}" + (" with several inputs" if graph is not None else
                           " (a subclassed model's layers have no symbolic outputs to attach "
                           "to); build it with the functional API"))
    shape = tuple(image_shape or graph.input.shape[1:])
    if len(shape) != 3 or shape[-1] is None or (
            any(size is None for size in shape) and not allow_open):
        raise ValueError(
            f"image_shape: the backbone takes images of {tuple(graph.input.shape[1:])}; "
            "give their (height, width, channels)")
    inputs = (graph.input if shape == tuple(graph.input.shape[1:])
              else keras.Input(shape, name="image"))
    existing = {(id(node.operation), tuple(id(t) for t in node.input_tensors)): node.outputs
                for nodes in graph._nodes_by_depth.values() for node in nodes}
    tensors: dict[str, object] = {}
    numbered: set[str] = set()
    weighted: set[int] = set()
    order: list[tuple[list[int], list[object]]] = []  # (ids read, outputs) per operation

    def run(model, model_inputs, prefix):
        def call(operation, *args, **kwargs):
            qualified = f"{prefix}{operation.name}"
            if re.fullmatch(rf"{_snake_case(type(operation).__name__)}(_\d+)?",
                            operation.name):
                numbered.update((qualified, f"{qualified}:input"))
            read = [t for t in keras.tree.flatten((args, kwargs))
                    if isinstance(t, keras.KerasTensor)]
            inner = _graph_of(operation)
            if inner is not None:
                outputs = run(inner, args[0] if len(args) == 1 else list(args),
                              f"{qualified}/")
            else:
                key = (id(operation), tuple(id(t) for t in read))
                outputs = (existing[key] if key in existing
                           else keras.tree.flatten(operation(*args, **kwargs)))
                order.append(([id(t) for t in read], keras.tree.flatten(outputs)))
                # A Normalization layer's mean and variance are preprocessing.
                if (getattr(operation, "weights", None)
                        and not isinstance(operation, keras.layers.Normalization)) or any(
                        id(t) in weighted for t in read):
                    weighted.update(id(t) for t in keras.tree.flatten(outputs))
            if len(read) == 1:
                tensors.setdefault(f"{qualified}:input", read[0])
            produced = keras.tree.flatten(outputs)
            if len(produced) == 1:
                tensors[qualified] = produced[0]
            return outputs

        return model._run_through_graph(model_inputs, call_fn=call)

    output = keras.tree.flatten(run(graph, inputs, ""))
    if len(output) != 1:
        raise ValueError(
            f"backbone: exits attach to a model of one output; got {len(output)}")
    return FlatGraph(inputs, output[0], tensors, numbered,
                     _cut_points(inputs, output[0], order), weighted)


def _cut_points(inputs, output, order) -> list:
    """The tensors every path from ``inputs`` to ``output`` passes through.

    ``order`` lists the operations in a topological order. A tensor is a
    cut point when, as it is produced, every tensor produced before it has
    been read by all its readers: nothing computed earlier bypasses it.
    """
    readers: dict[int, int] = {}
    for read, _ in order:
        for tensor in read:
            readers[tensor] = readers.get(tensor, 0) + 1
    unread = {id(inputs): readers.get(id(inputs), 0)}
    cuts = []
    for read, outputs in order:
        for tensor in read:
            unread[tensor] -= 1
            if not unread[tensor]:
                del unread[tensor]
        for tensor in outputs:
            if readers.get(id(tensor)):
                unread[id(tensor)] = readers[id(tensor)]
        if len(outputs) == 1 and set(unread) <= {id(outputs[0])}:
            cuts.append(outputs[0])
    if not cuts or cuts[-1] is not output:
        cuts.append(output)
    return cuts


def _is_map(tensor) -> bool:
    return len(tensor.shape) == 4


def stage_tensors(flat: FlatGraph) -> list:
    """The stages: the last cut point at each resolution, shallowest first.

    Cut points before the first layer with weights (the image and its
    preprocessing) are no stage, nor are those larger than an earlier one
    (a zero padding before a strided convolution). The deepest stage is the
    backbone's output when that is a feature map.
    """
    last: dict[tuple[int, int], object] = {}
    for tensor in flat.cuts:
        if _is_map(tensor) and id(tensor) in flat.weighted:
            size = tuple(tensor.shape[1:3])
            if all(size[0] <= seen[0] and size[1] <= seen[1] for seen in last):
                last[size] = tensor
    return list(last.values())


def find_stages(backbone: keras.Model, image_shape: Sequence[int] | None = None
                ) -> list[Stage]:
    """Where exits can attach to ``backbone``: its stages, shallowest first.

    One per resolution: the last tensor at that resolution that every path
    from the image to the output passes through, after the first layer with
    weights. ``exits="auto"`` picks the last ones before the deepest exit.

    Args:
        backbone: a functional or built sequential model from images to a
            feature map ``[B, h, w, D]`` or features ``[B, D]``.
        image_shape: ``(height, width, channels)`` of the images; needed
            when the backbone's input leaves them open.

    Returns:
        `Stage` entries: reference, shape ``(h, w, c)`` and stride.

    Raises:
        ValueError: as `flatten`.

    Example:

    >>> trunk = keras.applications.ResNet50V2(
    ...     include_top=False, weights=None, input_shape=(32, 32, 3))
    >>> [s.stride for s in find_stages(trunk)]
    [2.0, 4.0, 8.0, 16.0, 32.0]
    """
    flat = flatten(backbone, image_shape)
    height = flat.inputs.shape[1]
    return [Stage(flat.reference_of(t), tuple(int(s) for s in t.shape[1:]),
                  round(height / t.shape[1], 2)) for t in stage_tensors(flat)]


def resolve_exits(flat: FlatGraph, exits: str | int | Sequence[str]) -> list:
    """The tensors the shallow exits attach to, shallowest first.

    Args:
        flat: the backbone, flattened.
        exits: ``"auto"``: one exit per stage before the deepest
            resolution, the last ``MAX_AUTO_EXITS - 1`` of them; an int
            ``N >= 1``: ``N`` exits, the deepest included (``N - 1`` stages,
            the deepest ones before the output's resolution); or references
            (see the module docstring), shallowest first, the last of which
            may name the backbone's output.

    Returns:
        Feature maps ``[B, h, w, c]``, each a cut point, in the network's
        order, none the backbone's output.

    Raises:
        ValueError: one line: an unknown reference, a name Keras numbered
            itself, a tensor the graph cannot be cut at, one that is no
            feature map, references out of order or repeated, or more exits
            than the backbone has stages.
    """
    if any(size is None for size in flat.inputs.shape[1:3]):
        # Stages are found by resolution, which an open image size leaves unknown.
        if isinstance(exits, (str, int)):
            raise ValueError(
                f"image_shape: the backbone takes images of {tuple(flat.inputs.shape[1:])}; "
                f"give their (height, width, channels) for exits={exits!r}, or name the "
                "stages")
        candidates = []
    else:
        candidates = _shallow_stages(flat)
    if isinstance(exits, str) and exits == "auto":
        return candidates[-(MAX_AUTO_EXITS - 1):]
    if isinstance(exits, int) and not isinstance(exits, bool):
        if exits < 1:
            raise ValueError(f"exits: a number of exits must be at least 1; got {exits}")
        if exits > len(candidates) + 1:
            raise ValueError(
                f"exits: {exits} exits need {exits - 1} stages before the deepest exit; "
                f"the backbone has {len(candidates)}: "
                f"{[flat.reference_of(t) for t in candidates]}")
        return candidates[len(candidates) - (exits - 1):]
    if isinstance(exits, str) or not all(isinstance(e, str) for e in exits):
        raise ValueError(
            f"exits: expected 'auto', a number of exits or a list of references; got "
            f"{exits!r}")
    references = list(exits)
    if references and flat.tensors.get(references[-1]) is flat.output:
        references = references[:-1]
    position = {id(t): i for i, t in enumerate(flat.cuts)}
    chosen = []
    for reference in references:
        tensor = _tensor_named(flat, reference, candidates)
        if id(tensor) not in position or tensor is flat.output:
            what = "the backbone's output, the deepest exit," if tensor is flat.output \
                else "a tensor a branch runs beside"
            raise ValueError(
                f"exits: {reference!r} is {what} so the network cannot be cut there into "
                f"consecutive pieces; stages: {_listing(flat, candidates)}")
        if not _is_map(tensor):
            raise ValueError(
                f"exits: {reference!r} is {tuple(tensor.shape)}, not a feature map "
                "[B, h, w, c]")
        if chosen and position[id(tensor)] <= position[id(chosen[-1])]:
            raise ValueError(
                f"exits: {reference!r} comes before or at the previous exit; list them "
                "shallowest first, each once")
        chosen.append(tensor)
    return chosen


def _shallow_stages(flat: FlatGraph) -> list:
    """The stages at a higher resolution than the deepest exit's."""
    stages = stage_tensors(flat)
    deepest = flat.output if _is_map(flat.output) else (stages or [None])[-1]
    if deepest is None:
        return []
    return [t for t in stages if t.shape[1] > deepest.shape[1]
            or t.shape[2] > deepest.shape[2]]


def _listing(flat: FlatGraph, candidates: list) -> str:
    return ", ".join(flat.reference_of(t) for t in candidates) or "none"


def _tensor_named(flat: FlatGraph, reference: str, candidates: list):
    if reference not in flat.tensors:
        raise ValueError(
            f"exits: the backbone has no layer or tensor {reference!r}; stages: "
            f"{_listing(flat, candidates)}")
    tensor = flat.tensors[reference]
    if reference in flat.numbered:
        raise ValueError(
            f"exits: {reference!r} is a name Keras numbered itself, which names another "
            f"layer in another process; use {flat.reference_of(tensor)!r} or one of: "
            f"{_listing(flat, candidates)}")
    return tensor
