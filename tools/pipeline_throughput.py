"""Measures how many training images per second the input pipeline delivers.

Builds the training dataset of `selfkd_tf.data.make_datasets` (augmented and
normalized, as in training), reads whole epochs of it with no model consuming
the batches, and prints the rate of each epoch and their median.

Example:

    python tools/pipeline_throughput.py --dataset folder:/tmp/cifar/cifar10-jpeg
"""

from __future__ import annotations

import statistics
import time

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

import tool_io  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from selfkd_tf.data import make_datasets  # noqa: E402
from selfkd_tf.experiment.settings import as_settings_error  # noqa: E402
from selfkd_tf.errors import SettingsError  # noqa: E402

PROGRAM = "pipeline_throughput.py"

flags.DEFINE_string("dataset", None, "Dataset string (as selfkd-train --dataset), "
                    "e.g. folder:PATH.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.", lower_bound=1)
flags.DEFINE_integer("epochs", 5, "Timed epochs, after one untimed.", lower_bound=1)
flags.DEFINE_bool("augment", True, "Augment the images, as in training; --noaugment "
                  "(or --no-augment) times the pipeline without augmentation.")
flags.DEFINE_bool("no-augment", False, "Same as --noaugment.")
# The names of earlier versions of this tool.
flags.DEFINE_alias("data-dir", "data_dir")
flags.DEFINE_alias("batch-size", "batch_size")
flags.mark_flag_as_required("dataset")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    del argv  # tool_io.run rejects positional arguments
    if FLAGS["no-augment"].value and FLAGS["augment"].present and FLAGS.augment:
        raise SettingsError("no-augment", "contradicts --augment; give one of them")
    augment = FLAGS.augment and not FLAGS["no-augment"].value
    tool_io.check_dataset("dataset", FLAGS.dataset)
    start = time.perf_counter()
    # One untimed epoch first: it traces the pipeline and fills its buffers.
    with as_settings_error():  # e.g. files that do not decode
        train, _, info = make_datasets(
            FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            batch_size=FLAGS.batch_size,
            augment=augment,
            epochs=FLAGS.epochs + 1,
        )
    elapsed = time.perf_counter() - start
    print(f"loaded {info.name}: {info.num_train} training images")
    print(f"  of shape {info.image_shape} in {elapsed:.1f} s")

    batches = iter(train)
    rates = []
    for epoch in range(FLAGS.epochs + 1):
        start = time.perf_counter()
        for _ in range(info.steps_per_epoch):
            next(batches)
        rates.append(info.num_train / (time.perf_counter() - start))
        label = "warm-up" if epoch == 0 else f"epoch {epoch}"
        print(f"{label}: {rates[-1]:,.0f} images/s")

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print(f"batch {FLAGS.batch_size}, augment={augment}")
    median = statistics.median(rates[1:])
    print(f"median over {FLAGS.epochs} epochs: {median:,.0f} images/s")
    return 0


if __name__ == "__main__":
    program.run(main, PROGRAM)
