"""Measures how many training images per second the input pipeline delivers.

Builds the training dataset of `selfkd_tf.data.make_datasets` (augmented and
normalized, as in training), reads whole epochs of it with no model consuming
the batches, and prints the rate of each epoch and their median.

Example:

    python tools/pipeline_throughput.py --dataset folder:/tmp/cifar/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import tensorflow as tf

from selfkd_tf.data import make_datasets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", required=True, help="dataset string, e.g. folder:PATH"
    )
    parser.add_argument("--data-dir", default=None, help="TFDS data directory")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    # One untimed epoch first: it traces the pipeline and fills its buffers.
    train, _, info = make_datasets(
        args.dataset,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        augment=args.augment,
        epochs=args.epochs + 1,
    )
    elapsed = time.perf_counter() - start
    print(f"loaded {info.name}: {info.num_train} training images")
    print(f"  of shape {info.image_shape} in {elapsed:.1f} s")

    batches = iter(train)
    rates = []
    for epoch in range(args.epochs + 1):
        start = time.perf_counter()
        for _ in range(info.steps_per_epoch):
            next(batches)
        rates.append(info.num_train / (time.perf_counter() - start))
        label = "warm-up" if epoch == 0 else f"epoch {epoch}"
        print(f"{label}: {rates[-1]:,.0f} images/s")

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print(f"batch {args.batch_size}, augment={args.augment}")
    median = statistics.median(rates[1:])
    print(f"median over {args.epochs} epochs: {median:,.0f} images/s")


if __name__ == "__main__":
    main()
