"""Runs layers forward and backward at many batch and image sizes; a crash is the finding.

The child program of ``tests/test_kernel_crash.py``, not a test module.

Usage: ``python tests/kernel_crash_child.py LAYERS.json REPEATS``, where the file holds
``[{"layer": <keras.layers.serialize output>, "input_shape": [H, W, C],
"padding": P, "where": "<arch>/<head>:<layer name>"}, ...]``, ``P`` being
the zero padding the network puts before the layer (part of ``H`` and
``W``). Every layer is traced once
as a training step (forward, a loss, gradients for the input and the
weights) and run at every batch size of `BATCHES` and every image scale of
`SCALES`, and the whole list ``REPEATS`` times (the defects strike some
of the time). Each layer's ``where`` is printed before it runs, so when the
process dies the last line names the layer. Kernel defects that abort the
process cannot be caught inside it, hence the separate process.
"""

import json
import sys

import numpy as np
import tensorflow as tf
import keras

import selfkd_tf.models  # noqa: F401 - registers the package's layers

BATCHES = (1, 5, 6, 16)
"""A batch of 1, an odd and an even last batch, and a full one."""
SCALES = (1, 2, 4)
"""The layers' inputs for 8x8 images, then for 16x16 and 32x32 ones."""


def run(entry: dict, rng: np.random.Generator) -> None:
    layer = keras.layers.deserialize(entry["layer"])  # built, as saved
    height, width, channels = entry["input_shape"]
    pad = entry["padding"]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels])])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.square(y))
        return tape.gradient(loss, [x, *layer.trainable_weights])

    for scale in SCALES:
        for batch in BATCHES:
            size = ((height - 2 * pad) * scale + 2 * pad, (width - 2 * pad) * scale + 2 * pad)
            x = rng.standard_normal((batch, *size, channels))
            for gradient in step(tf.constant(x, tf.float32)):
                if not np.all(np.isfinite(gradient.numpy())):
                    raise SystemExit(f"non-finite gradient: {entry['where']}")


def main(path: str, repeats: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    for _ in range(repeats):
        for entry in entries:
            print(entry["where"], flush=True)
            run(entry, rng)
    print(f"ran {len(entries)} layers {repeats} times", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
