"""Measures how many training images per second the input pipeline delivers.

Builds the training dataset of `selfkd_tf.data.make_datasets` (augmented and
normalized, as in training) and times full epochs of it with nothing else
running, then prints the per-epoch rates and their median.

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
    # One extra epoch first: it traces the pipeline functions and fills buffers.
    train, _, info = make_datasets(
        args.dataset,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        augment=args.augment,
        epochs=args.epochs + 1,
    )
    print(
        f"loaded {info.name}: {info.num_train} training images {info.image_shape} "
        f"in {time.perf_counter() - start:.1f} s"
    )

    rates = []
    batches = iter(train)
    for epoch in range(args.epochs + 1):
        start = time.perf_counter()
        for _ in range(info.steps_per_epoch):
            next(batches)
        rate = info.num_train / (time.perf_counter() - start)
        if epoch:
            rates.append(rate)
        print(
            f"epoch {epoch}{' (warm-up)' if not epoch else ''}: {rate:,.0f} images/s"
        )
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"batch {args.batch_size}, augment={args.augment}"
    )
    print(
        f"median over {args.epochs} epochs: {statistics.median(rates):,.0f} images/s"
    )


if __name__ == "__main__":
    main()
