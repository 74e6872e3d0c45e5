"""Convolution, normalization and initializer primitives.

Every backbone and exit-head layer is created through these functions so that
padding, initialization and normalization follow one convention: the PyTorch
reference implementations of PS-KD, BYOT and torchvision ResNet.
"""

import keras
import tensorflow as tf

# PyTorch's `BatchNorm2d(momentum=0.1, eps=1e-5)`: PyTorch weighs the new batch
# statistic by `momentum`, Keras weighs the running average by it.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv_kernel_initializer() -> keras.initializers.Initializer:
    """He-normal fan-out initializer (`kaiming_normal_(mode="fan_out")`).

    Also used for depthwise kernels. Keras counts the fan-out of a depthwise
    kernel as `k * k`, PyTorch as `channels * k * k`; the pointwise convolution
    and batch normalization that always follow make the difference irrelevant
    to the forward pass.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def batch_norm(sync_batchnorm: bool, name: str) -> keras.layers.Layer:
    """PyTorch-equivalent batch normalization layer.

    Args:
        sync_batchnorm: Whether to synchronize batch statistics across
            replicas of a distribution strategy.
        name: Layer name.

    Returns:
        A `keras.layers.BatchNormalization` layer.
    """
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        synchronized=sync_batchnorm,
        name=name,
    )


@keras.saving.register_keras_serializable(package="selfkd_tf")
class PatchConv2D(keras.layers.Conv2D):
    """A `Conv2D` whose kernel size equals its stride, as a patch projection.

    A `k x k` convolution with stride `k` and no padding sees every input
    pixel exactly once, so it equals rearranging each `k x k` patch into the
    channels (`space_to_depth`) and applying a `1 x 1` convolution, i.e. one
    matrix product. The result and the weights (kernel of shape
    `(k, k, channels, filters)`, same variable names) are those of the plain
    `Conv2D`, but the gradient is far cheaper under XLA, whose strided
    convolution gradient is slow on CPU.

    Rows and columns beyond the last whole patch are dropped, as by the
    `"valid"` convolution.

    Example:

    >>> layer = PatchConv2D(16, 4)
    >>> layer(np.zeros((2, 32, 32, 8), "float32")).shape
    (2, 8, 8, 16)

    Args:
        filters: Number of output channels.
        kernel_size: Square kernel size `k`, also the stride.
        **kwargs: Further `keras.layers.Conv2D` arguments; `strides` and
            `padding`, if given, must be `k` and `"valid"`.

    Input shape: `(batch, height, width, channels)`, channels last.
    Output shape: `(batch, height // k, width // k, filters)`.
    """

    def __init__(self, filters: int, kernel_size: int, **kwargs):
        kwargs.setdefault("strides", kernel_size)
        kwargs.setdefault("padding", "valid")
        super().__init__(filters, kernel_size, **kwargs)
        if (
            self.strides != self.kernel_size
            or self.padding != "valid"
            or self.groups != 1
        ):
            raise ValueError(
                "PatchConv2D needs strides == kernel_size, padding='valid' "
                f"and groups=1; got kernel_size={self.kernel_size}, "
                f"strides={self.strides}, padding={self.padding!r}, "
                f"groups={self.groups}"
            )

    def call(self, inputs):
        size = self.kernel_size[0]
        height = inputs.shape[1] // size * size
        width = inputs.shape[2] // size * size
        patches = tf.nn.space_to_depth(inputs[:, :height, :width, :], size)
        # space_to_depth orders a patch's values as (row, column, channel),
        # the row-major order of the kernel's first three axes.
        kernel = tf.reshape(self.kernel, (-1, self.filters))
        outputs = tf.einsum("bhwi,io->bhwo", patches, kernel)
        if self.use_bias:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


def _pad_for_stride(x, kernel_size: int, strides: int, name: str):
    """Returns `(x, padding)` reproducing PyTorch's `padding=kernel_size // 2`.

    For strided convolutions Keras' `"same"` pads only the bottom/right edge,
    which shifts the sampling grid by one pixel relative to PyTorch and to the
    1x1 projection shortcut; explicit symmetric padding keeps them aligned.
    """
    if strides == 1 or kernel_size == 1:
        return x, "same"
    x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    return x, "valid"


def conv2d(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    padding: str = "same",
    name: str,
):
    """2D convolution with PyTorch padding semantics.

    A `"valid"` convolution whose kernel size equals its stride is built as a
    `PatchConv2D`, which computes the same function with the same weights.

    Args:
        x: Input tensor of shape `(batch, height, width, channels)`.
        filters: Number of output channels.
        kernel_size: Square kernel size.
        strides: Square stride.
        groups: Number of channel groups (`channels` and `filters` must be
            divisible by it).
        use_bias: Whether the convolution has a bias.
        padding: `"same"` for symmetric `kernel_size // 2` padding,
            `"valid"` for none.
        name: Layer name; a strided `"same"` convolution also creates
            `f"{name}_pad"`.

    Returns:
        Output tensor of shape `(batch, height', width', filters)`.
    """
    if padding == "same":
        x, padding = _pad_for_stride(x, kernel_size, strides, name)
    patchwise = kernel_size == strides > 1 and padding == "valid" and groups == 1
    layer = PatchConv2D if patchwise else keras.layers.Conv2D
    return layer(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        use_bias=use_bias,
        kernel_initializer=conv_kernel_initializer(),
        name=name,
    )(x)


def depthwise_conv2d(x, kernel_size: int, *, strides: int = 1, name: str):
    """Bias-free depthwise convolution, padded symmetrically by `k // 2`.

    Args:
        x: Input tensor of shape `(batch, height, width, channels)`.
        kernel_size: Square kernel size.
        strides: Square stride.
        name: Layer name; a strided convolution also creates `f"{name}_pad"`.

    Returns:
        Output tensor of shape `(batch, height', width', channels)`.
    """
    x, padding = _pad_for_stride(x, kernel_size, strides, name)
    return keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        depthwise_initializer=conv_kernel_initializer(),
        name=name,
    )(x)


def conv_bn(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    padding: str = "same",
    relu: bool = True,
    sync_batchnorm: bool = False,
    name: str,
    suffix: str = "",
):
    """Convolution, batch normalization and (optionally) ReLU.

    Layers are named `f"{name}_conv{suffix}"`, `f"{name}_bn{suffix}"` and
    `f"{name}_relu{suffix}"`, e.g. `stage2_block1_conv1`.

    Args:
        x: Input tensor of shape `(batch, height, width, channels)`.
        filters: Number of output channels.
        kernel_size: Square kernel size.
        strides: Square stride.
        groups: Number of channel groups of the convolution.
        use_bias: Whether the convolution has a bias.
        padding: `"same"` (symmetric `kernel_size // 2`) or `"valid"`.
        relu: Whether to end with a ReLU.
        sync_batchnorm: Whether batch statistics are synchronized across
            replicas.
        name: Prefix of the layer names.
        suffix: Appended to each layer name, to number repeated units.

    Returns:
        Output tensor of shape `(batch, height', width', filters)`.
    """
    x = conv2d(
        x,
        filters,
        kernel_size,
        strides=strides,
        groups=groups,
        use_bias=use_bias,
        padding=padding,
        name=f"{name}_conv{suffix}",
    )
    x = batch_norm(sync_batchnorm, name=f"{name}_bn{suffix}")(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu{suffix}")(x)
    return x
