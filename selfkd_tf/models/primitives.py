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


def _project(layer: keras.layers.Conv2D, patches):
    """`layer`'s bias and activation applied to `patches @ kernel`.

    `patches` has shape `(batch, height, width, k * k * channels)`, each
    patch's values in the kernel's row-major `(row, column, channel)` order.
    """
    kernel = tf.reshape(layer.kernel, (-1, layer.filters))
    outputs = tf.einsum("bhwi,io->bhwo", patches, kernel)
    if layer.use_bias:
        outputs = outputs + layer.bias
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


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

    >>> import numpy as np
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
        # Static sizes where known keep the output shape static; images of
        # any size (`input_shape=(None, None, 3)`) need the dynamic ones.
        dynamic = tf.shape(inputs)
        height, width = (
            (inputs.shape[axis] or dynamic[axis]) // size * size for axis in (1, 2)
        )
        # space_to_depth orders a patch's values as (row, column, channel).
        return _project(
            self, tf.nn.space_to_depth(inputs[:, :height, :width, :], size)
        )


@keras.saving.register_keras_serializable(package="selfkd_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that routes around two defects of the CPU kernels.

    - **Strided `1 x 1`.** A `1 x 1` convolution with stride `s` (the
      projection shortcut of a downsampling block) reads the pixels at rows
      and columns `0, s, 2s, ...` and nothing else, under `"same"` as under
      `"valid"` padding (neither pads a `1 x 1` kernel). So it equals
      `x[:, ::s, ::s, :]` followed by one matrix product with the kernel,
      which this layer computes instead of calling the CPU convolution
      kernels: oneDNN's strided `1 x 1` convolution is the one kernel of
      these networks reported to abort training (few input channels, a
      small last batch).
    - **Empty batches.** oneDNN's convolutions return an empty batch in the
      shape of their *input* (`[0, H, W, C_in]`), not of their output, so
      the next layer sees the wrong number of channels: a replica whose
      share of a batch is empty failed: training with synchronised batch
      norm with "Shape mismatch in the collective", evaluation and
      prediction with a shape error in the next layer. Under a strategy with
      several replicas an empty batch never reaches the kernel here
      (`channels_last` only): it gets zeros of the output's shape, and the
      kernel a zero gradient.

    Every other input is computed by `keras.layers.Conv2D` itself. Weights,
    variable names and the configuration are those of `keras.layers.Conv2D`.
    The class keeps Keras's name because a `.keras` file stores weights
    under the snake-cased class name (`conv2d_7`): networks saved with plain
    `Conv2D` layers and networks built with this layer lay their weights out
    identically, so either loads the other's files
    (`selfkd_tf.models.conversion.upgrade_layers`).

    Example:

    >>> import numpy as np
    >>> layer = Conv2D(16, 1, strides=2, padding="same")
    >>> layer(np.zeros((2, 7, 7, 8), "float32")).shape
    (2, 4, 4, 16)

    Input shape: `(batch, height, width, channels)`.
    Output shape: as `keras.layers.Conv2D`; for a `1 x 1` kernel with
    stride `s`, `(batch, ceil(height / s), ceil(width / s), filters)`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._subsamples = _is_strided_pointwise(
            kernel_size=self.kernel_size, strides=self.strides,
            groups=self.groups, dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def call(self, inputs):
        if self._subsamples:
            rows, columns = self.strides
            return _project(self, inputs[:, ::rows, ::columns, :])
        return _unless_empty(self, keras.layers.Conv2D.call, inputs)


@keras.saving.register_keras_serializable(package="selfkd_tf")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` that keeps a replica's empty batch from the kernels.

    On an empty batch TensorFlow's depthwise kernels give wrong results:
    oneDNN's forward pass returns the input's shape, and the default kernel's
    gradient of the depthwise weights is not zero. Under a strategy with
    several replicas, an empty batch (a replica's empty share of a batch)
    gets zeros of the output's shape and a zero gradient instead
    (`channels_last` only). Weights, variable names and configuration are
    those of `keras.layers.DepthwiseConv2D`, whose name the class keeps for
    the same reason as `Conv2D`.

    Example:

    >>> import numpy as np
    >>> DepthwiseConv2D(3, depth_multiplier=2)(np.zeros((2, 7, 7, 4), "float32")).shape
    (2, 5, 5, 8)
    """

    def call(self, inputs):
        return _unless_empty(self, keras.layers.DepthwiseConv2D.call, inputs)


def _unless_empty(layer, call, inputs):
    """``call(layer, inputs)``, or zeros of its output's shape for an empty batch.

    The kernels' defects on empty batches are described in `Conv2D` and
    `DepthwiseConv2D`. Under a strategy with several replicas the branch
    not taken is not run, and an empty batch's gradient with respect to the
    weights is zero; anywhere else the layer's own call runs.
    """
    # Only a replica of several can be handed an empty share of a batch; a
    # branch elsewhere would cost memory for batches nobody sends (measured
    # with tools/benchmark.py on one device: peak 487 against 362 MB for the
    # baseline at width 0.25, batch 128).
    context = tf.distribute.get_replica_context()
    if (layer.data_format != "channels_last" or context is None
            or context.num_replicas_in_sync == 1):
        return call(layer, inputs)
    static = layer.compute_output_shape(inputs.shape)
    shape = tf.shape(inputs)
    sizes = []
    for axis, kernel, stride, dilation in zip(
        (1, 2), layer.kernel_size, layer.strides, layer.dilation_rate
    ):
        size = shape[axis]
        if layer.padding == "valid":
            size = tf.maximum(size - dilation * (kernel - 1), 0)
        sizes.append((size + stride - 1) // stride)
    outputs = tf.cond(
        shape[0] > 0,
        lambda: call(layer, inputs),
        lambda: tf.zeros(tf.stack([shape[0], *sizes, static[-1]]), layer.compute_dtype),
    )
    # The zeros' shape is computed; the layers after need the static one.
    outputs.set_shape(static)
    return outputs


def _is_strided_pointwise(
    *, kernel_size, strides, groups, dilation_rate, data_format
) -> bool:
    """Whether `Conv2D` arguments describe a strided 1x1 convolution that
    `Conv2D` computes as a matrix product."""
    return (
        tuple(kernel_size) == (1, 1)
        and tuple(strides) != (1, 1)
        and groups == 1
        and tuple(dilation_rate) == (1, 1)
        and data_format == "channels_last"
    )


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
    `PatchConv2D`, any other as this module's `Conv2D`; both compute the
    same function with the same weights as `keras.layers.Conv2D`.

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
    return (PatchConv2D if patchwise else Conv2D)(
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
    return DepthwiseConv2D(
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
