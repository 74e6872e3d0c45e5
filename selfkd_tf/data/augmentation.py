"""Image augmentation and evaluation transforms, pure functions of their draws.

Two recipes (`AUGMENTATIONS`), plus ``"none"``:

- ``"cifar"`` (the paper's): a random `H x W` crop of the image zero-padded
  by `CROP_PADDING` pixels and a random horizontal flip, on images of one
  size (`crop_and_flip`, a whole batch at a time). Evaluation takes the
  image as it is.
- ``"imagenet"`` (torchvision's ImageNet training, as PS-KD trains it):
  a random-resized crop (area 8% to 100% of the image, aspect ratio 3/4 to
  4/3) resized to the target size, a random horizontal flip, PS-KD's colour
  jitter (brightness, contrast and saturation 0.4, in random order) and PCA
  lighting noise (AlexNet's, standard deviation 0.1), from an image of any
  size (`imagenet_train`). Evaluation resizes the shorter side to
  `256 / 224` of the target and crops the centre (`resize_and_center_crop`).

Every random choice comes from a stateless seed, so an augmentation is a
pure function of the image and its seed; `selfkd_tf.data.plan` derives the
seeds from `(seed, epoch, index)`. Pixels are float32 in 0..255 units (the
pipeline normalizes afterwards); colour jitter and lighting, like PS-KD's,
do not clip.

Example:

>>> image = tf.zeros([300, 400, 3], tf.uint8)
>>> imagenet_train(image, tf.constant([1, 2]), (224, 224)).shape
TensorShape([224, 224, 3])
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = [
    "AUGMENTATIONS",
    "CROP_PADDING",
    "crop_and_flip",
    "imagenet_train",
    "resize_and_center_crop",
]

AUGMENTATIONS = ("cifar", "imagenet", "none")
CROP_PADDING = 4

# torchvision's RandomResizedCrop defaults.
_AREA = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)
_ATTEMPTS = 10
# torchvision's evaluation: Resize(256) then CenterCrop(224).
EVAL_RESIZE = 256 / 224
# PS-KD's ColorJitter(0.4, 0.4, 0.4) and Lighting(0.1, ...) (AlexNet's PCA of
# ImageNet's RGB pixels in [0, 1] units).
_JITTER = 0.4
_LIGHTING_STD = 0.1
_EIGVAL = (0.2175, 0.0188, 0.0045)
_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
_GRAY = (0.299, 0.587, 0.114)
# Distinct streams of one example's seed.
_CROP, _FLIP, _JITTER_STREAM, _ORDER, _LIGHT = range(5)


def crop_and_flip(images: tf.Tensor, offset: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """Crops each image from its zero-padded self, then optionally mirrors it.

    Args:
        images: uint8 `[B, H, W, C]`.
        offset: int32 `[B, 2]`, top-left corner `(row, col)` of each crop in
            the image padded by `CROP_PADDING`, in `[0, 2 * CROP_PADDING]`.
        flip: bool `[B]`, whether to mirror each crop horizontally.

    Returns:
        uint8 `[B, H, W, C]`.
    """
    height, width = images.shape[1], images.shape[2]
    p = CROP_PADDING
    padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
    rows = offset[:, :1] + tf.range(height)
    cols = offset[:, 1:] + tf.range(width)
    # Mirroring the crop is reading its columns right to left.
    cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
    # Two batched gathers crop every image at its own offset in one op each.
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def _stream(seed: tf.Tensor, number: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, number)


def crop_window(height, width, seed: tf.Tensor) -> tf.Tensor:
    """torchvision's `RandomResizedCrop.get_params`: the window to crop.

    Up to 10 draws of an area fraction in [0.08, 1] and a log-uniform aspect
    ratio in [3/4, 4/3]; the first whose window fits the image wins, at a
    uniform position. When none fits, the largest centred window whose
    ratio is clamped to that range.

    Args:
        height, width: int32 scalars, the image's size.
        seed: int32 `[2]`, a stateless seed.

    Returns:
        int32 `[4]`: `(top, left, crop_height, crop_width)`.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    area = tf.random.stateless_uniform(
        [_ATTEMPTS], seed=_stream(seed, 0), minval=_AREA[0], maxval=_AREA[1]
    ) * h * w
    log_ratio = tf.random.stateless_uniform(
        [_ATTEMPTS],
        seed=_stream(seed, 1),
        minval=math.log(_RATIO[0]),
        maxval=math.log(_RATIO[1]),
    )
    ratio = tf.exp(log_ratio)
    crop_w = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    position = tf.random.stateless_uniform([2], seed=_stream(seed, 2))

    def drawn():
        ch, cw = crop_h[first], crop_w[first]
        top = tf.cast(position[0] * tf.cast(height - ch + 1, tf.float32), tf.int32)
        left = tf.cast(position[1] * tf.cast(width - cw + 1, tf.float32), tf.int32)
        return tf.stack([top, left, ch, cw])

    def centred():
        in_ratio = w / h
        cw = tf.where(
            in_ratio < _RATIO[0], width,
            tf.where(in_ratio > _RATIO[1],
                     tf.cast(tf.round(h * _RATIO[1]), tf.int32), width))
        ch = tf.where(
            in_ratio < _RATIO[0], tf.cast(tf.round(w / _RATIO[0]), tf.int32),
            height)
        return tf.stack([(height - ch) // 2, (width - cw) // 2, ch, cw])

    return tf.cond(tf.reduce_any(fits), drawn, centred)


def _resize(image: tf.Tensor, size) -> tf.Tensor:
    """Bilinear, antialiased (as PIL shrinks) float32 resize to `size`."""
    return tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)


def _gray(image: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(image * tf.constant(_GRAY), axis=-1, keepdims=True)


def color_jitter(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """PS-KD's `ColorJitter(0.4, 0.4, 0.4)`: three blends in random order.

    Each blend moves the image towards a reference by a factor drawn
    uniformly in [-0.4, 0.4]: black (brightness), the mean grey level
    (contrast) and each pixel's grey level (saturation). No clipping.

    Args:
        image: float32 `[H, W, 3]`.
        seed: int32 `[2]`.

    Returns:
        float32 `[H, W, 3]`.
    """
    alpha = tf.random.stateless_uniform(
        [3], seed=_stream(seed, _JITTER_STREAM), minval=-_JITTER, maxval=_JITTER
    )
    order = tf.random.experimental.stateless_shuffle(
        tf.range(3), seed=_stream(seed, _ORDER)
    )
    references = (
        lambda x: tf.zeros_like(x),
        lambda x: tf.fill(tf.shape(x), tf.reduce_mean(_gray(x))),
        lambda x: tf.broadcast_to(_gray(x), tf.shape(x)),
    )
    for position in range(3):
        kind = order[position]
        reference = tf.switch_case(
            kind, [lambda r=r, x=image: r(x) for r in references])
        image = image + tf.gather(alpha, kind) * (reference - image)
    return image


def lighting(image: tf.Tensor, seed: tf.Tensor, scale: float = 255.0) -> tf.Tensor:
    """AlexNet's PCA lighting noise, as PS-KD adds it (standard deviation 0.1).

    Args:
        image: float32 `[H, W, 3]` in pixel units of `scale` (255: 0..255).
        seed: int32 `[2]`.
        scale: the pixel value of white; the noise is defined for 1.

    Returns:
        float32 `[H, W, 3]`.
    """
    alpha = tf.random.stateless_normal(
        [3], seed=_stream(seed, _LIGHT), stddev=_LIGHTING_STD
    )
    rgb = tf.linalg.matvec(tf.constant(_EIGVEC), alpha * tf.constant(_EIGVAL))
    return image + scale * rgb


def imagenet_train(
    image: tf.Tensor, seed: tf.Tensor, size: tuple[int, int]
) -> tf.Tensor:
    """The ImageNet training augmentation of one image of any size.

    Args:
        image: uint8 `[H, W, 3]`.
        seed: int32 `[2]`, the example's stateless seed.
        size: `(height, width)` of the result.

    Returns:
        float32 `[*size, 3]` in 0..255 units.
    """
    shape = tf.shape(image)
    top, left, height, width = tf.unstack(
        crop_window(shape[0], shape[1], _stream(seed, _CROP))
    )
    crop = _resize(image[top : top + height, left : left + width], size)
    flip = tf.random.stateless_uniform([], seed=_stream(seed, _FLIP)) < 0.5
    crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    return lighting(color_jitter(crop, seed), seed)


def resize_and_center_crop(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """torchvision's ImageNet evaluation transform, scaled to `size`.

    The shorter side is resized to `round(256 / 224 * min(size))`, keeping the
    aspect ratio, then the centre `size` window is cropped.

    Args:
        image: uint8 `[H, W, C]` of any size.
        size: `(height, width)`.

    Returns:
        float32 `[*size, C]` in 0..255 units.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    shorter = round(EVAL_RESIZE * min(size))
    scale = shorter / tf.reduce_min(shape)
    # At least the crop's size, whatever the rounding.
    new_size = tf.maximum(
        tf.cast(tf.round(shape * scale), tf.int32), tf.constant(size, tf.int32)
    )
    resized = _resize(image, new_size)
    top = (new_size[0] - size[0]) // 2
    left = (new_size[1] - size[1]) // 2
    return tf.ensure_shape(
        resized[top : top + size[0], left : left + size[1]],
        [*size, image.shape[-1]],
    )
