"""ResNet / ResNeXt backbones with one classifier exit per stage.

`resnet_backbone` builds the stages and `stage_output_names` declares where
they end; `build_multi_exit_resnet` attaches an exit to each
(`selfkd_tf.models.multi_exit.attach_exits`).

The backbones follow torchvision's definitions (ResNet v1.5: the stride of a
bottleneck block sits on its 3x3 convolution; a 1x1 conv + BN projection
shortcut whenever the shape changes) with one of two stems (`STEMS`):

- ``"cifar"``: a 3x3 stride-1 convolution and no max-pooling, the usual
  stem for 32x32 images;
- ``"imagenet"``: torchvision's, a 7x7 stride-2 convolution and a 3x3
  stride-2 max-pooling (both padded symmetrically, as PyTorch pads), which
  divide the image size by 4 before the first stage.

``"auto"`` picks the ImageNet stem for images of at least
`IMAGENET_STEM_MIN_SIZE` pixels on their shorter side and the CIFAR stem
otherwise (`resolve_stem`).
"""

import dataclasses
import math

import keras

from selfkd_tf.models.exit_heads import get_exit_head
from selfkd_tf.models.multi_exit import attach_exits
from selfkd_tf.models.primitives import conv_bn

_STEM_CHANNELS = 64
_STAGE_PLANES = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
NUM_STAGES_CHOICES = (2, 3, 4)
STEMS = ("auto", "cifar", "imagenet")
IMAGENET_STEM_MIN_SIZE = 128
"""``stem="auto"`` takes the ImageNet stem for images this size or larger."""


@dataclasses.dataclass(frozen=True)
class _Architecture:
    block: str  # "basic" or "bottleneck".
    depths: tuple[int, int, int, int]
    default_exit_head: str
    groups: int = 1
    width_per_group: int = 64


_ARCHITECTURES = {
    "resnet18": _Architecture("basic", (2, 2, 2, 2), "bottleneck"),
    "resnet34": _Architecture("basic", (3, 4, 6, 3), "bottleneck"),
    "resnet50": _Architecture("bottleneck", (3, 4, 6, 3), "bottleneck"),
    "resnext50_32x4d": _Architecture(
        "bottleneck", (3, 4, 6, 3), "attention", groups=32, width_per_group=4
    ),
}

ARCHITECTURES = tuple(_ARCHITECTURES)

_EXPANSION = {"basic": 1, "bottleneck": 4}


def scale_channels(channels: int, width_multiplier: float) -> int:
    """Scales a channel count, rounding to the nearest integer >= 1."""
    return max(1, int(channels * width_multiplier + 0.5))


def _residual_output(x, residual, filters, strides, sync_batchnorm, name):
    """Adds the (projected if needed) shortcut to `residual`, then ReLU."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_bn(
            x,
            filters,
            1,
            strides=strides,
            relu=False,
            sync_batchnorm=sync_batchnorm,
            name=f"{name}_shortcut",
        )
    x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def basic_block(
    x, planes: int, *, strides: int = 1, sync_batchnorm: bool = False, name: str
):
    """ResNet basic block: two 3x3 conv + BN, residual add, ReLU.

    Args:
        x: Input tensor of shape `(batch, H, W, C)`.
        planes: Output channels.
        strides: Stride of the first convolution and of the shortcut.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names, e.g. `"stage2_block1"`.

    Returns:
        Tensor of shape `(batch, ceil(H / strides), ceil(W / strides), planes)`.
    """
    residual = conv_bn(
        x,
        planes,
        3,
        strides=strides,
        sync_batchnorm=sync_batchnorm,
        name=name,
        suffix="1",
    )
    residual = conv_bn(
        residual,
        planes,
        3,
        relu=False,
        sync_batchnorm=sync_batchnorm,
        name=name,
        suffix="2",
    )
    return _residual_output(x, residual, planes, strides, sync_batchnorm, name)


def bottleneck_block(
    x,
    planes: int,
    *,
    strides: int = 1,
    groups: int = 1,
    width_per_group: int = 64,
    sync_batchnorm: bool = False,
    name: str,
):
    """ResNet v1.5 / ResNeXt bottleneck block with expansion 4.

    `1x1 conv (width) -> 3x3 conv (width, strides, groups) -> 1x1 conv
    (4 * planes)`, each followed by BN (and ReLU but the last), then residual
    add and ReLU. As in torchvision, `width = planes * width_per_group / 64 *
    groups`. Below full width that product may not split into `groups`
    integer groups, so the cardinality becomes `gcd(groups, width)`: e.g.
    ResNeXt-50 32x4d at `width_multiplier=0.0625` has 8 groups of 1 channel
    in its first stage. At full width nothing changes.

    Args:
        x: Input tensor of shape `(batch, H, W, C)`.
        planes: Base channel count; the block outputs `4 * planes` channels.
        strides: Stride of the 3x3 convolution and of the shortcut.
        groups: Cardinality of the 3x3 convolution.
        width_per_group: Channels per group at `planes=64`.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names, e.g. `"stage2_block1"`.

    Returns:
        Tensor of shape
        `(batch, ceil(H / strides), ceil(W / strides), 4 * planes)`.
    """
    width = max(1, planes * width_per_group * groups // 64)
    residual = conv_bn(
        x, width, 1, sync_batchnorm=sync_batchnorm, name=name, suffix="1"
    )
    residual = conv_bn(
        residual,
        width,
        3,
        strides=strides,
        groups=math.gcd(groups, width),
        sync_batchnorm=sync_batchnorm,
        name=name,
        suffix="2",
    )
    filters = planes * _EXPANSION["bottleneck"]
    residual = conv_bn(
        residual,
        filters,
        1,
        relu=False,
        sync_batchnorm=sync_batchnorm,
        name=name,
        suffix="3",
    )
    return _residual_output(x, residual, filters, strides, sync_batchnorm, name)


def resolve_stem(stem: str, input_shape) -> str:
    """``"cifar"`` or ``"imagenet"``: `stem`, with ``"auto"`` decided by the image size.

    >>> resolve_stem("auto", (224, 224, 3)), resolve_stem("auto", (32, 32, 3))
    ('imagenet', 'cifar')
    """
    if stem != "auto":
        return stem
    sizes = [size for size in input_shape[:2] if size is not None]
    large = len(sizes) == 2 and min(sizes) >= IMAGENET_STEM_MIN_SIZE
    return "imagenet" if large else "cifar"


def _stem(inputs, stem: str, channels: int, sync_batchnorm: bool):
    if stem == "cifar":
        return conv_bn(inputs, channels, 3, sync_batchnorm=sync_batchnorm, name="stem")
    x = conv_bn(
        inputs, channels, 7, strides=2, sync_batchnorm=sync_batchnorm, name="stem"
    )
    # PyTorch pads max-pooling with -inf; after the ReLU zeros are the same.
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)


def resnet_backbone(
    inputs,
    arch: str,
    *,
    num_stages: int = 4,
    width_multiplier: float = 1.0,
    sync_batchnorm: bool = False,
    stem: str = "cifar",
):
    """Builds the stem and the first `num_stages` stages of `arch`.

    Layers are named `stem_*` and `stage{s}_block{b}_*`.

    Args:
        inputs: Image tensor of shape `(batch, H, W, channels)`.
        arch: One of `ARCHITECTURES`.
        num_stages: Number of stages to build, in `{2, 3, 4}`.
        width_multiplier: Scales every channel count.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        stem: ``"cifar"`` or ``"imagenet"`` (see the module docstring).

    Returns:
        List of the `num_stages` stage outputs, shallowest first; stage `s`
        has spatial size `ceil(H / 2 ** (s - 1))` after the CIFAR stem, and
        a quarter of that (rounded up at each halving) after the ImageNet
        stem.
    """
    spec = _ARCHITECTURES[arch]
    x = _stem(
        inputs, stem, scale_channels(_STEM_CHANNELS, width_multiplier), sync_batchnorm
    )
    stage_outputs = []
    stages = zip(_STAGE_PLANES, _STAGE_STRIDES, spec.depths[:num_stages])
    for stage, (planes, strides, depth) in enumerate(stages, start=1):
        planes = scale_channels(planes, width_multiplier)
        for block in range(1, depth + 1):
            kwargs = dict(
                strides=strides if block == 1 else 1,
                sync_batchnorm=sync_batchnorm,
                name=f"stage{stage}_block{block}",
            )
            if spec.block == "basic":
                x = basic_block(x, planes, **kwargs)
            else:
                x = bottleneck_block(
                    x,
                    planes,
                    groups=spec.groups,
                    width_per_group=spec.width_per_group,
                    **kwargs,
                )
        stage_outputs.append(x)
    return stage_outputs


def stage_output_names(arch: str, num_stages: int = 4) -> list[str]:
    """The layers whose outputs are the stages of `resnet_backbone`, shallowest first.

    Stage ``s`` ends in the ReLU after its last block's residual add,
    ``stage{s}_block{depth}_out``.

    >>> stage_output_names("resnet18", 3)
    ['stage1_block2_out', 'stage2_block2_out', 'stage3_block2_out']
    """
    depths = _ARCHITECTURES[arch].depths[:num_stages]
    return [f"stage{s}_block{d}_out" for s, d in enumerate(depths, start=1)]


def _validate_arguments(
    num_classes, input_shape, num_stages, exit_head, width_multiplier, stem
):
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be a positive integer, got {num_classes!r}."
        )
    if num_stages not in NUM_STAGES_CHOICES:
        raise ValueError(
            f"`num_stages` must be one of {NUM_STAGES_CHOICES}, "
            f"got {num_stages!r}."
        )
    if not width_multiplier > 0:
        raise ValueError(
            f"`width_multiplier` must be > 0, got {width_multiplier!r}."
        )
    if len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be (height, width, channels), "
            f"got {input_shape!r}."
        )
    if stem not in STEMS:
        raise ValueError(f"`stem` must be one of {STEMS}, got {stem!r}.")
    # The attention mask is downsampled by 2 and upsampled back, which only
    # restores even sizes; the last head sits on stage N - 1, which is
    # 2 ** (N - 2) times smaller than the input (4 times more after the
    # ImageNet stem).
    multiple = 2 ** (num_stages - 1) * (
        4 if resolve_stem(stem, input_shape) == "imagenet" else 1)
    if exit_head == "attention" and any(
        size is not None and size % multiple for size in input_shape[:2]
    ):
        raise ValueError(
            "`input_shape` height and width must be multiples of "
            f"{multiple} for attention exit heads with num_stages="
            f"{num_stages}, got {tuple(input_shape)!r}."
        )


def build_multi_exit_resnet(
    arch: str,
    num_classes: int,
    input_shape: tuple[int | None, int | None, int] = (32, 32, 3),
    num_stages: int = 4,
    exit_head: str | None = None,
    width_multiplier: float = 1.0,
    sync_batchnorm: bool = False,
    name: str | None = None,
    stem: str = "auto",
) -> keras.Model:
    """Builds a ResNet/ResNeXt classifier with one exit after every stage.

    Exit `i` (1-based, shallowest first) sits on stage `i`. Every exit but
    the deepest adds an exit head, a side branch that maps the stage output
    to a map with the deepest stage's width `D`; every exit then applies
    global average pooling, giving its feature `F_i` of length `D`, and a
    Dense classifier, giving its logits `z_i`. The heads never feed back into
    the backbone, so `keras.Model(model.input, model.output["logits"][-1])`
    is the plain backbone plus its classifier.

    Convolutions use He-normal fan-out initialization and batch normalization
    uses `momentum=0.9, epsilon=1e-5`, matching PyTorch's defaults. Backbone
    convolutions have no bias.

    Args:
        arch: One of `ARCHITECTURES`: `"resnet18"`, `"resnet34"`,
            `"resnet50"` or `"resnext50_32x4d"`.
        num_classes: Number of classes.
        input_shape: Shape of one (already normalized) image,
            `(height, width, channels)`.
        num_stages: Number of backbone stages to keep, in `{2, 3, 4}`; the
            deepest exit follows the last kept stage.
        exit_head: One of `EXIT_HEADS`: `"bottleneck"` (PS-KD / DMFL) or
            `"attention"` (BYOT / SCAN). `None` picks `"attention"` for
            `"resnext50_32x4d"` and `"bottleneck"` otherwise. Attention heads
            need height and width to be multiples of `2 ** (num_stages - 1)`.
        width_multiplier: Scales every channel count (stem, stages, heads),
            rounding to an integer >= 1. For ResNeXt the cardinality shrinks
            to the largest divisor of 32 that divides the group-conv width.
            Small values (e.g. `0.0625`) give tiny networks for tests and
            CPU runs.
        sync_batchnorm: Whether every batch normalization synchronizes its
            statistics across replicas of a distribution strategy.
        name: Model name; defaults to `f"{arch}_multi_exit"`.
        stem: ``"cifar"`` (3x3 convolution), ``"imagenet"`` (torchvision's
            7x7 stride-2 convolution and 3x3 stride-2 max-pooling) or
            ``"auto"``: the ImageNet stem when height and width are at least
            `IMAGENET_STEM_MIN_SIZE` (128), else the CIFAR stem. With the
            ImageNet stem and 1000 classes the deepest exit's sub-model (the
            backbone and its classifier) has exactly torchvision's
            trainable parameters (e.g. 11,689,512 for ResNet-18).

    Returns:
        A functional `keras.Model` mapping images of shape
        `(batch, *input_shape)` to the dict
        `{"logits": [z_1, ..., z_N], "features": [F_1, ..., F_N]}` with
        `N = num_stages`, `z_i` of shape `(batch, num_classes)` and `F_i` of
        shape `(batch, D)`, all float32 even under a mixed-precision policy.
        `D` is the deepest kept stage's width: 512 (resnet18/34) or 2048
        (resnet50, resnext50_32x4d) with 4 stages, halved per dropped stage,
        times `width_multiplier`.

    Raises:
        ValueError: If an argument is outside its allowed values.

    Example:

    ```python
    model = build_multi_exit_resnet("resnet18", num_classes=100)
    outputs = model(np.zeros((8, 32, 32, 3), "float32"))
    [z.shape for z in outputs["logits"]]    # 4 x (8, 100)
    [f.shape for f in outputs["features"]]  # 4 x (8, 512)
    deepest = keras.Model(model.input, model.output["logits"][-1])
    ```
    """
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"`arch` must be one of {ARCHITECTURES}, got {arch!r}."
        )
    if exit_head is None:
        exit_head = _ARCHITECTURES[arch].default_exit_head
    get_exit_head(exit_head)  # validates
    _validate_arguments(
        num_classes, input_shape, num_stages, exit_head, width_multiplier, stem
    )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    stage_outputs = resnet_backbone(
        inputs,
        arch,
        num_stages=num_stages,
        width_multiplier=width_multiplier,
        sync_batchnorm=sync_batchnorm,
        stem=resolve_stem(stem, input_shape),
    )
    trunk = keras.Model(inputs, stage_outputs[-1], name=f"{arch}_backbone")
    return attach_exits(
        trunk,
        num_classes,
        exits=stage_output_names(arch, num_stages),
        exit_head=exit_head,
        image_shape=tuple(input_shape),
        sync_batchnorm=sync_batchnorm,
        name=name or f"{arch}_multi_exit",
    )
