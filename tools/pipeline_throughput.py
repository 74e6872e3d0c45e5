"""Measures how many training images per second the input pipeline delivers, and its memory.

Builds the training dataset of `selfkd_tf.data.make_datasets` (augmented and
normalized, as in training), reads whole epochs of it with no model consuming
the batches, and prints the rate of each epoch and their median, whether the
images were streamed or held in memory (``--cache``), and the process's
peak resident memory (from start-up, so TensorFlow's own is included) with
the resident memory before the data set was built.

``--write_jpegs=DIR`` writes a synthetic image folder instead and exits:
``--jpegs`` training JPEGs of ``--jpeg_size`` pixels (plus a tenth as many
test images) in 10 classes, smooth random colour fields, in the
``folder:`` layout.

Example:

    python tools/pipeline_throughput.py --dataset folder:/tmp/cifar/cifar10-jpeg
    python tools/pipeline_throughput.py --write_jpegs=/tmp/j20k --jpegs=20000
    python tools/pipeline_throughput.py --dataset folder:/tmp/j20k --epochs 1
"""

from __future__ import annotations

import os
import resource
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
flags.DEFINE_enum("cache", "auto", ["auto", "memory", "none"], "As selfkd-train --cache.")
flags.DEFINE_enum("augmentation", "cifar", ["cifar", "imagenet", "none"],
                  "As selfkd-train --augmentation.")
flags.DEFINE_integer("image_size", None, "As selfkd-train --image_size.", lower_bound=1)
flags.DEFINE_string("write_jpegs", None, "Write a synthetic image folder here and exit.")
flags.DEFINE_integer("jpegs", 2000, "Training images --write_jpegs writes.", lower_bound=10)
flags.DEFINE_integer("jpeg_size", 96, "Their height and width.", lower_bound=8)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.", lower_bound=1)
flags.DEFINE_integer("epochs", 5, "Timed epochs, after one untimed.", lower_bound=1)
flags.DEFINE_bool("augment", True, "Augment the images, as in training; --noaugment "
                  "(or --no-augment) times the pipeline without augmentation.")
flags.DEFINE_bool("no-augment", False, "Same as --noaugment.")
# The names of earlier versions of this tool.
flags.DEFINE_alias("data-dir", "data_dir")
flags.DEFINE_alias("batch-size", "batch_size")
FLAGS = flags.FLAGS


def _resident_mb() -> float:
    """The process's resident memory now, in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_resident_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux: KB units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_jpegs(root: str, count: int, size: int) -> None:
    """`count` training and `count // 10` test JPEGs in 10 class folders."""
    if os.path.exists(root):
        raise SettingsError("write_jpegs", f"{root} exists; choose a new folder")
    for split, n in (("train", count), ("test", max(10, count // 10))):
        for number in range(n):
            folder = os.path.join(root, split, f"class{number % 10}")
            os.makedirs(folder, exist_ok=True)
            seed = tf.constant([number, 0 if split == "train" else 1])
            # A coarse random field, upsampled: compresses like a photograph.
            coarse = tf.random.stateless_uniform([8, 8, 3], seed, maxval=255.0)
            image = tf.cast(tf.image.resize(coarse[None], [size, size])[0], tf.uint8)
            tf.io.write_file(os.path.join(folder, f"{number:06d}.jpg"),
                             tf.io.encode_jpeg(image, quality=90))
    print(f"wrote {count} training JPEGs of {size}x{size} to {root}")


def main(argv: list[str]) -> int:
    del argv  # tool_io.run rejects positional arguments
    if FLAGS.write_jpegs:
        write_jpegs(FLAGS.write_jpegs, FLAGS.jpegs, FLAGS.jpeg_size)
        return 0
    if not FLAGS.dataset:
        raise SettingsError("dataset", "missing; give --dataset or --write_jpegs")
    before = _resident_mb()
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
            augmentation=FLAGS.augmentation if augment else None,
            image_size=FLAGS.image_size,
            cache=FLAGS.cache,
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
    print(f"batch {FLAGS.batch_size}, augment={augment}, "
          f"augmentation={FLAGS.augmentation}, cache={info.cache}")
    median = statistics.median(rates[1:])
    print(f"median over {FLAGS.epochs} epochs: {median:,.0f} images/s")
    print(f"resident memory before building the data: {before:,.0f} MB; "
          f"peak: {_peak_resident_mb():,.0f} MB")
    return 0


if __name__ == "__main__":
    program.run(main, PROGRAM)
