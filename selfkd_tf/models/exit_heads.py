"""Exit heads that turn a shallow stage into an auxiliary classifier.

A head maps the output of stage `stage` (1-based) to a feature map with as
many channels as the deepest stage, `stage_channels[-1]`, so that the pooled
features of every exit live in the same space and can be compared by the
feature-mimicking losses. `exit_classifier` then pools and classifies it.

Two styles are available (`EXIT_HEADS`):

- `"bottleneck"` (PS-KD / DMFL): 1x1 reduce -> kxk stride-k conv -> 1x1 expand.
- `"attention"` (BYOT / SCAN): a sigmoid attention mask followed by a chain
  of stride-2 separable convolutions.
"""

import math

import keras

from selfkd_tf.models.primitives import batch_norm
from selfkd_tf.models.primitives import conv_bn
from selfkd_tf.models.primitives import depthwise_conv2d


def sep_conv(
    x, filters: int, *, strides: int, sync_batchnorm: bool = False, name: str
):
    """SCAN/BYOT separable convolution, applied twice.

    `depthwise 3x3 (strides) -> pointwise 1x1 -> BN -> ReLU ->
    depthwise 3x3 -> pointwise 1x1 (to filters) -> BN -> ReLU`, all
    convolutions without bias.

    Args:
        x: Input tensor of shape `(batch, height, width, channels)`.
        filters: Output channels of the second pointwise convolution.
        strides: Stride of the first depthwise convolution.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names.

    Returns:
        Output tensor of shape
        `(batch, ceil(height / strides), ceil(width / strides), filters)`.
    """
    channels = x.shape[-1]
    for index, (stride, out_channels) in enumerate(
        ((strides, channels), (1, filters)), start=1
    ):
        x = depthwise_conv2d(
            x, 3, strides=stride, name=f"{name}_dwconv{index}"
        )
        x = conv_bn(
            x,
            out_channels,
            1,
            sync_batchnorm=sync_batchnorm,
            name=name,
            suffix=str(index),
        )
    return x


def bottleneck_exit_head(
    x,
    stage: int,
    stage_channels: tuple[int, ...],
    *,
    sync_batchnorm: bool = False,
    name: str,
):
    """PS-KD / DMFL bottleneck exit head.

    With `D = stage_channels[-1]` and `k = 2 ** (len(stage_channels) - stage)`:
    `1x1 conv (D // 4) -> BN -> ReLU -> kxk conv stride k (D // 4) -> BN ->
    ReLU -> 1x1 conv (D) -> BN -> ReLU`. The convolutions have a bias even
    though a BN follows, as in PS-KD; the reference parameter counts
    (e.g. 13,011,152 for ResNet-18 on CIFAR-100) include these biases.

    Args:
        x: Output of stage `stage`, shape `(batch, H, W, C)`.
        stage: 1-based index of the stage `x` comes from.
        stage_channels: Output channels of every stage of the backbone.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names, e.g. `"exit1_head"`.

    Returns:
        Tensor of shape `(batch, H // k, W // k, D)`; `H // k` equals the
        deepest stage's height when `H` is a multiple of `k`.
    """
    channels = stage_channels[-1]
    hidden = max(1, channels // 4)
    # Kernel and stride k collapse the remaining downsampling in one step;
    # `conv2d` computes such a convolution as a patch projection.
    k = 2 ** (len(stage_channels) - stage)
    for index, (filters, size) in enumerate(
        ((hidden, 1), (hidden, k), (channels, 1)), start=1
    ):
        x = conv_bn(
            x,
            filters,
            size,
            strides=size,
            use_bias=True,
            padding="valid",
            sync_batchnorm=sync_batchnorm,
            name=name,
            suffix=str(index),
        )
    return x


def attention_exit_head(
    x,
    stage: int,
    stage_channels: tuple[int, ...],
    *,
    sync_batchnorm: bool = False,
    name: str,
):
    """BYOT / SCAN attention exit head.

    The attention mask is `SepConv(C -> C, stride 2) -> BN -> ReLU ->
    bilinear 2x upsampling -> sigmoid`, multiplied with `x`. The BN after the
    SepConv duplicates the SepConv's own final BN but is part of the
    reference model: without it ResNeXt-50 32x4d on CIFAR-100 has 3,584
    parameters fewer than the reference 37,898,448. Because of the ReLU the
    mask lies in `[0.5, 1)`, also as in the reference.

    The attended map then passes through one stride-2 SepConv per deeper
    stage, whose output channels follow `stage_channels` (doubling for the
    standard widths), ending at the deepest stage's channels and resolution.

    Args:
        x: Output of stage `stage`, shape `(batch, H, W, C)`, with `H` and `W`
            even.
        stage: 1-based index of the stage `x` comes from.
        stage_channels: Output channels of every stage of the backbone.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names, e.g. `"exit1_head"`.

    Returns:
        Tensor of shape `(batch, H / 2 ** n, W / 2 ** n, stage_channels[-1])`
        with `n = len(stage_channels) - stage`.
    """
    mask = sep_conv(
        x,
        x.shape[-1],
        strides=2,
        sync_batchnorm=sync_batchnorm,
        name=f"{name}_mask_sepconv",
    )
    mask = batch_norm(sync_batchnorm, name=f"{name}_mask_bn")(mask)
    mask = keras.layers.ReLU(name=f"{name}_mask_relu")(mask)
    mask = keras.layers.UpSampling2D(
        2, interpolation="bilinear", name=f"{name}_mask_upsample"
    )(mask)
    mask = keras.layers.Activation("sigmoid", name=f"{name}_mask_sigmoid")(
        mask
    )
    x = keras.layers.Multiply(name=f"{name}_attend")([x, mask])
    for index, filters in enumerate(stage_channels[stage:], start=1):
        x = sep_conv(
            x,
            filters,
            strides=2,
            sync_batchnorm=sync_batchnorm,
            name=f"{name}_sepconv{index}",
        )
    return x


def exit_classifier(x, num_classes: int, index: int):
    """Pools a feature map into the exit's feature and classifies it.

    Both layers compute in float32 so that distillation losses see
    full-precision features and logits under a mixed-precision policy. The
    Dense layer uses PyTorch's `nn.Linear` default initialization
    (`U(-1/sqrt(D), 1/sqrt(D))` for kernel and bias).

    Args:
        x: Feature map of shape `(batch, H, W, D)`.
        num_classes: Number of classes.
        index: 1-based exit index, used in the layer names
            `exit{index}_features` and `exit{index}_logits`.

    Returns:
        Tuple `(features, logits)` of float32 tensors with shapes
        `(batch, D)` and `(batch, num_classes)`.
    """
    features = keras.layers.GlobalAveragePooling2D(
        dtype="float32", name=f"exit{index}_features"
    )(x)
    bound = 1.0 / math.sqrt(x.shape[-1])
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        dtype="float32",
        name=f"exit{index}_logits",
    )(features)
    return features, logits


_HEAD_BUILDERS = {
    "bottleneck": bottleneck_exit_head,
    "attention": attention_exit_head,
}

EXIT_HEADS = tuple(_HEAD_BUILDERS)


def get_exit_head(style: str):
    """Returns the head-building function for `style` (one of `EXIT_HEADS`).

    Raises:
        ValueError: If `style` is not in `EXIT_HEADS`.
    """
    if style not in _HEAD_BUILDERS:
        raise ValueError(
            f"`exit_head` must be one of {EXIT_HEADS} or None, got {style!r}."
        )
    return _HEAD_BUILDERS[style]
