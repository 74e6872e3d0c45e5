"""Exit heads that turn a shallow stage into an auxiliary classifier.

A head maps a shallow stage's output ``[B, h, w, c]`` to a feature map with
as many channels as the deepest stage, ``D = deeper_channels[-1]``, so that
the pooled features of every exit live in the same space and can be
compared by the feature-mimicking losses; `exit_classifier` then pools and
classifies it. A head is called as ``head(x, deeper_channels, ratio,
sync_batchnorm=..., name=...)``: ``deeper_channels`` are the channels of
every deeper exit's stage, the deepest last, and ``ratio`` the stage's
resolution over the deepest stage's, rounded to a whole number >= 1 (any
number, not only a power of 2).

Three styles are available (`EXIT_HEADS`):

- ``"bottleneck"`` (PS-KD / DMFL): 1x1 reduce -> kxk stride-k conv -> 1x1
  expand, ``k = ratio``. Its kxk convolution holds ``(D / 4)^2 k^2``
  weights: 16.8M per exit at ``k = 8`` on a 2048-wide network.
- ``"attention"`` (BYOT / SCAN): a sigmoid attention mask followed by one
  stride-2 separable convolution per deeper exit (each exit at half the
  resolution of the next).
- ``"pooled"``, the cheap one: kxk average pooling, stride k, then a 1x1
  convolution to ``D`` channels with batch norm and ReLU: ``c D`` weights.
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
    deeper_channels: tuple[int, ...],
    ratio: int,
    *,
    sync_batchnorm: bool = False,
    name: str,
):
    """PS-KD / DMFL bottleneck exit head.

    With `D = deeper_channels[-1]` and `k = ratio`: `1x1 conv (D // 4) -> BN
    -> ReLU -> kxk conv stride k (D // 4) -> BN -> ReLU -> 1x1 conv (D) ->
    BN -> ReLU`. The convolutions have a bias even though a BN follows, as
    in PS-KD; the reference parameter counts (e.g. 13,011,152 for ResNet-18
    on CIFAR-100) include these biases.

    Args:
        x: The stage's output, shape `(batch, H, W, C)`.
        deeper_channels: Output channels of every deeper exit's stage, the
            deepest last.
        ratio: The stage's resolution over the deepest stage's, `k >= 1`.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names, e.g. `"exit1_head"`.

    Returns:
        Tensor of shape `(batch, H // k, W // k, D)`; `H // k` equals the
        deepest stage's height when `H` is a multiple of `k`.
    """
    channels = deeper_channels[-1]
    hidden = max(1, channels // 4)
    # Kernel and stride k collapse the remaining downsampling in one step;
    # `conv2d` computes such a convolution as a patch projection.
    k = ratio
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
    deeper_channels: tuple[int, ...],
    ratio: int,
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
    exit, whose output channels follow `deeper_channels` (doubling for the
    standard widths), ending at the deepest stage's channels and resolution.

    Args:
        x: The stage's output, shape `(batch, H, W, C)`, with `H` and `W`
            even.
        deeper_channels: Output channels of every deeper exit's stage, the
            deepest last.
        ratio: The stage's resolution over the deepest stage's: it must be
            `2 ** len(deeper_channels)`, each exit at half the resolution of
            the next.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names, e.g. `"exit1_head"`.

    Returns:
        Tensor of shape `(batch, H / 2 ** n, W / 2 ** n, deeper_channels[-1])`
        with `n = len(deeper_channels)`.

    Raises:
        ValueError: `ratio` is not `2 ** len(deeper_channels)`, or `H` or `W`
            is odd (the mask's upsampling restores even sizes only).
    """
    if ratio != 2 ** len(deeper_channels) or any(
            size is not None and size % 2 for size in x.shape[1:3]):
        raise ValueError(
            f"exit_head: attention heads need each exit at half the resolution of the "
            f"next and even sizes; got a {tuple(x.shape[1:3])} stage {ratio}x the deepest's "
            f"with {len(deeper_channels)} deeper exits; use bottleneck or pooled")
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
    for index, filters in enumerate(deeper_channels, start=1):
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

    Features ``[B, D]`` (a backbone that pools itself) are the exit's
    feature as they are.

    Both layers compute in float32 so that distillation losses see
    full-precision features and logits under a mixed-precision policy. The
    Dense layer uses PyTorch's `nn.Linear` default initialization
    (`U(-1/sqrt(D), 1/sqrt(D))` for kernel and bias).

    Args:
        x: Feature map of shape `(batch, H, W, D)`, or features `(batch, D)`.
        num_classes: Number of classes.
        index: 1-based exit index, used in the layer names
            `exit{index}_features` and `exit{index}_logits`.

    Returns:
        Tuple `(features, logits)` of float32 tensors with shapes
        `(batch, D)` and `(batch, num_classes)`.
    """
    pool = (keras.layers.GlobalAveragePooling2D if len(x.shape) == 4
            # Only casts to float32, like the pooling does.
            else keras.layers.Identity)
    features = pool(dtype="float32", name=f"exit{index}_features")(x)
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


def pooled_exit_head(
    x,
    deeper_channels: tuple[int, ...],
    ratio: int,
    *,
    sync_batchnorm: bool = False,
    name: str,
):
    """The cheap exit head: average pooling, then a 1x1 convolution to `D`.

    `kxk average pooling, stride k (k = ratio; none for k = 1) -> 1x1 conv
    (D, no bias) -> BN -> ReLU`, with `D = deeper_channels[-1]`: `C D`
    weights, against `(D / 4)^2 k^2 + ...` for the bottleneck head (e.g.
    0.5M against 17.3M for a 256-channel stage of a 2048-wide network at
    `k = 8`).

    Args: as `bottleneck_exit_head`'s (only the deepest channel count is
    read). Returns a tensor of shape `(batch, H // k, W // k, D)`.
    """
    if ratio > 1:
        x = keras.layers.AveragePooling2D(ratio, name=f"{name}_pool")(x)
    return conv_bn(x, deeper_channels[-1], 1, sync_batchnorm=sync_batchnorm, name=name,
                   suffix="1")


_HEAD_BUILDERS = {
    "bottleneck": bottleneck_exit_head,
    "attention": attention_exit_head,
    "pooled": pooled_exit_head,
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
