"""A replica's empty share of a batch goes through every network correctly.

`tf.distribute` splits a batch of one example over two replicas as 1 + 0.
On an empty batch TensorFlow's convolution kernels go wrong: oneDNN's
return the *input's* shape (``tf.nn.conv2d`` of ``[0, 8, 8, 3]`` images with
4 filters gives ``[0, 8, 8, 3]``), so with synchronised batch norm the next
all-reduce failed ("Shape mismatch in the collective"); the default
depthwise kernel's weight gradient is not zero. Each kernel setting runs in
its own process (``python test_empty_batches.py``) with two logical CPU
devices, and checks two stages of ResNet-18 with each exit head: on the empty replica
every output has the output spec's shape with 0 rows, in training and in
inference mode, and every weight's gradient is zero; and backbones of
Keras's own convolutions without trainable batch norm train on batches that
leave a replica empty (its share skips the network).
"""

import subprocess
import sys

import pytest

from selfkd_tf.models import EXIT_HEADS
from support import REPO, environment, tiny_backbone

NUM_CLASSES = 10
IMAGE_SIZE = 8
NETWORKS = ("resnet18",)
NUM_STAGES = 2
"""Two stages of ResNet-18 hold every kind of layer the networks have (3x3,
strided 3x3 and 1x1, and patch convolutions, depthwise ones in the attention
head); whole and deeper networks take minutes to trace on two replicas."""


def child() -> None:
    import numpy as np
    import tensorflow as tf

    from selfkd_tf.models import EXIT_HEADS

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    images = np.ones((1, IMAGE_SIZE, IMAGE_SIZE, 3), "float32")
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(images).batch(1))
    shares = strategy.experimental_local_results(next(iter(dataset)))
    assert [int(t.shape[0]) for t in shares] == [1, 0]
    checked = 0
    for arch in NETWORKS:
        for head in EXIT_HEADS:
            with strategy.scope():
                # Synchronised batch norm: the empty replica takes part in
                # every all-reduce, so it runs the whole network.
                model = tiny_backbone(NUM_CLASSES, IMAGE_SIZE, num_stages=NUM_STAGES,
                                      exit_head=head, sync_batchnorm=True, arch=arch)

            def step(x):
                with tf.GradientTape() as tape:
                    training = model(x, training=True)
                    loss = tf.add_n([tf.reduce_sum(z) for z in training["logits"]])
                return ([training, model(x, training=False)],
                        tape.gradient(loss, model.trainable_variables))

            # As in `fit`: the step is traced with the batch size unknown.
            @tf.function
            def distributed_step(iterator):
                return strategy.run(step, args=(next(iterator),))

            outputs, gradients = distributed_step(iter(dataset))
            specs = tf.nest.flatten(model.output) * 2
            empty = [strategy.experimental_local_results(t)[1]
                     for t in tf.nest.flatten(outputs)]
            for got, spec in zip(empty, specs, strict=True):
                assert tuple(got.shape) == (0, *spec.shape[1:]), (
                    arch, head, spec.name, got.shape)
            for variable, gradient in zip(model.trainable_variables, gradients):
                # The empty replica's own gradient: it has no example to add.
                assert gradient is None or not np.any(
                    strategy.experimental_local_results(gradient)[1]), (
                        arch, head, variable.path)
            checked += 1
    print(f"checked {checked} networks")
    train_own_backbones(strategy)
    print("trained own backbones")


def train_own_backbones(strategy) -> None:
    """Keras's convolutions, no trainable batch norm: an empty share is skipped."""
    import keras
    import numpy as np

    from selfkd_tf.distillation.config import SelfKDConfig
    from selfkd_tf.optimizers import make_optimizer
    from selfkd_tf.distillation.model import SelfKDModel

    for norm in ("none", "frozen"):
        with strategy.scope():
            inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
            x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
            if norm == "frozen":
                frozen = keras.layers.BatchNormalization()
                frozen.trainable = False
                x = frozen(x)
            features = [keras.layers.GlobalAveragePooling2D()(x)]
            backbone = keras.Model(inputs, {
                "logits": [keras.layers.Dense(NUM_CLASSES)(features[0])],
                "features": features})
            model = SelfKDModel(backbone, num_train_examples=3,
                                config=SelfKDConfig(methods=()))
            model.compile(optimizer=make_optimizer(0.01, schedule="constant"))
        # Batches of 2 and 1: the last leaves the second replica empty.
        history = model.fit(np.ones((3, IMAGE_SIZE, IMAGE_SIZE, 3), "float32"),
                            np.array([0, 1, 2]), batch_size=2, epochs=1, verbose=0)
        assert all(np.isfinite(v[-1]) for v in history.history.values()), norm


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_every_network_passes_an_empty_replica_share(onednn):
    result = subprocess.run(
        [sys.executable, __file__], cwd=REPO,
        env={**environment(), "TF_ENABLE_ONEDNN_OPTS": onednn},
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-3:] == [
        f"checked {len(NETWORKS) * len(EXIT_HEADS)} networks", "trained own backbones", ""]


if __name__ == "__main__":
    child()
