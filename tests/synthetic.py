"""Small, learnable data in the element structure of `selfkd_tf.data`."""

import numpy as np
import tensorflow as tf


def learnable_arrays(n: int, num_classes: int, size: int = 16, seed: int = 0):
    """Images whose class is visible in their colour, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    palette = rng.uniform(-1, 1, size=(num_classes, 1, 1, 3))
    images = palette[labels] + 0.3 * rng.normal(size=(n, size, size, 3))
    return images.astype("float32"), labels.astype("int32")


def indexed_dataset(images, labels, batch_size: int, shuffle_seed=None):
    """``({"image", "index"}, label)`` batches, as `selfkd_tf.data` yields."""
    index = np.arange(len(labels), dtype="int32")
    ds = tf.data.Dataset.from_tensor_slices(({"image": images, "index": index}, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(labels), seed=shuffle_seed)
    return ds.batch(batch_size)

