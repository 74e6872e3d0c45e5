"""What every step of an epoch holds: the order, each example's draws, each worker's share.

An epoch's *plan* is a pure function of `(seed, epoch)`: a permutation of
the training examples' indices and, aligned with it, the augmentation draw
of each example, itself a function of `(seed, epoch, index)` (`epoch_plan`).
Batch `s` of the epoch is rows `[s * B, s * B + B)` of the plan.

With several replicas, `tf.distribute` gives replica `r` of `R` rows
`[r * c, (r + 1) * c)` of each global batch, `c = ceil(B / R)` (a short last
batch leaves the last replicas fewer rows, or none). A worker of a
multi-worker cluster holds replicas `[w * R_w, (w + 1) * R_w)`, so its share
of a batch is the rows of those replicas (`piece_bounds`), and it reads and
decodes only the examples of its share. The sample index stays global: it
is the example's position in the whole training split, whichever worker
reads it, so every worker's rows address the one PS-KD table.

Example:

>>> piece_bounds(rows=16, batch_size=16, share=WorkerShare(1, 2, 1))
([8], [16])
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from selfkd_tf.data.augmentation import CROP_PADDING

__all__ = ["WorkerShare", "epoch_key", "epoch_plan", "piece_bounds"]

# Distinct streams of the stateless generator, per epoch.
_ORDER_STREAM, _CROP_STREAM, _FLIP_STREAM, _DRAW_STREAM = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class WorkerShare:
    """Which replicas of a data-parallel run one pipeline feeds.

    Attributes:
        worker: this worker's position among the input pipelines, in
            `[0, workers)` (`tf.distribute.InputContext.input_pipeline_id`).
        workers: the number of workers (input pipelines).
        replicas_per_worker: replicas each worker holds (devices per
            worker; the same on every worker).
    """

    worker: int = 0
    workers: int = 1
    replicas_per_worker: int = 1

    def __post_init__(self):
        if not (0 <= self.worker < self.workers and self.replicas_per_worker >= 1):
            raise ValueError(f"not a worker share: {self}")

    @property
    def num_replicas(self) -> int:
        """All replicas of the run."""
        return self.workers * self.replicas_per_worker


def piece_bounds(rows, batch_size: int, share: WorkerShare):
    """This worker's replicas' rows of a global batch of `rows` rows.

    Args:
        rows: int (or int scalar tensor), rows of this global batch: the
            batch size, or fewer for an epoch's last batch.
        batch_size: the global batch size `B`.
        share: the worker and its replicas.

    Returns:
        `(starts, stops)`: one `[start, stop)` per replica of the worker, in
        replica order, batch-relative; empty where a replica gets no row.
        Python lists of ints for int `rows`, int tensors `[R_w]` otherwise.
    """
    per_replica = math.ceil(batch_size / share.num_replicas)
    first = share.worker * share.replicas_per_worker
    edges = [
        (first + k) * per_replica for k in range(share.replicas_per_worker + 1)
    ]
    if isinstance(rows, int):
        clipped = [min(edge, rows) for edge in edges]
        return clipped[:-1], clipped[1:]
    clipped = tf.minimum(tf.constant(edges, rows.dtype), rows)
    return clipped[:-1], clipped[1:]


def epoch_key(seed: int, epoch) -> tf.Tensor:
    """The stateless key of epoch `epoch`: int64 `[2]`."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def epoch_plan(
    num_examples: int, seed: int, epoch, augmentation: str, shuffle: bool = True
) -> dict[str, tf.Tensor]:
    """The order and the augmentation draws of one epoch.

    Args:
        num_examples: `N`, the training examples.
        seed: the run's seed.
        epoch: int scalar (tensor), 0-based.
        augmentation: one of `selfkd_tf.data.augmentation.AUGMENTATIONS`.
        shuffle: whether the order is shuffled (else `range(N)`).

    Returns:
        `{"index": int32 [N]}`, a permutation of `range(N)` drawn from
        `(seed, epoch)`, and aligned with it the draws of each example,
        functions of `(seed, epoch, index)`: for ``"cifar"``, `"offset"`
        int32 `[N, 2]` and `"flip"` bool `[N]`; for ``"imagenet"``, `"draw"`
        int32 `[N, 2]`, the example's stateless seed.
    """
    key = epoch_key(seed, epoch)

    def stream(number):
        return tf.random.experimental.stateless_fold_in(key, number)

    order = tf.range(num_examples)
    if shuffle:
        order = tf.random.experimental.stateless_shuffle(
            order, seed=stream(_ORDER_STREAM)
        )
    plan = {"index": order}
    draws = example_draws(num_examples, key, augmentation)
    # Drawn per example index, then read in epoch order.
    plan.update({name: tf.gather(value, order) for name, value in draws.items()})
    return plan


def example_draws(num_examples: int, key: tf.Tensor, augmentation: str) -> dict:
    """Every example's augmentation draws of the epoch of `key`, by index."""

    def stream(number):
        return tf.random.experimental.stateless_fold_in(key, number)

    if augmentation == "cifar":
        offset = tf.random.stateless_uniform(
            [num_examples, 2],
            seed=stream(_CROP_STREAM),
            maxval=2 * CROP_PADDING + 1,
            dtype=tf.int32,
        )
        flip = tf.random.stateless_uniform(
            [num_examples], seed=stream(_FLIP_STREAM), maxval=2, dtype=tf.int32
        )
        return {"offset": offset, "flip": flip == 1}
    if augmentation == "imagenet":
        draw = tf.random.stateless_uniform(
            [num_examples, 2],
            seed=stream(_DRAW_STREAM),
            minval=None,
            maxval=None,
            dtype=tf.int32,
        )
        return {"draw": draw}
    return {}
