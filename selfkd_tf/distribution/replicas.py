"""Training steps that mean the same however a batch is shared out.

`tf.distribute` splits a global batch of ``B`` examples over ``R`` replicas
in parts of ``ceil(B / R)`` examples, so some parts are shorter, or empty:
a last batch of 1 on 2 replicas leaves one replica nothing, and 16 examples
on 3 replicas are 6 + 6 + 4. Nothing is padded or dropped; instead every
quantity a step combines across replicas is combined by example count:

- losses divide by the global number of examples (`selfkd_tf.distillation.losses`);
- a replica with no example skips its forward pass when per-replica batch
  norm would compute 0/0 statistics there (`forward_unless_empty`);
- per-replica batch norms' moving statistics become the replicas'
  example-weighted mean after every step (`pool_moving_statistics`);
- logged metrics pool every replica's totals and counts
  (`pooled_metric_results`);
- a loss-scale overflow on any replica skips the step on all
  (`share_overflow`).

Every function runs in a replica context (inside ``strategy.run`` or a
Keras step); with one replica each is exact and cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

SUM = tf.distribute.ReduceOp.SUM


def per_replica_batch_norms(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """``model``'s batch norms that normalise with this replica's statistics.

    Frozen batch norms (``trainable=False``) use their moving statistics and
    are left out, as are synchronised ones.
    """
    return [
        layer for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        and layer.trainable and not layer.synchronized
    ]


def has_synchronized_batch_norm(model: keras.layers.Layer) -> bool:
    """Whether any trainable batch norm of ``model`` synchronises its statistics."""
    return any(
        isinstance(layer, keras.layers.BatchNormalization)
        and layer.trainable and layer.synchronized
        for layer in model._flatten_layers()
    )


def forward_unless_empty(forward: Callable[[], object], batch_size: tf.Tensor,
                         output_spec) -> object:
    """``forward()``, or empty outputs when this replica holds no example.

    Per-replica batch norm over zero examples computes 0/0 statistics: NaN
    in the moving statistics and, through gamma's gradient, in the weights;
    and TensorFlow's CPU convolutions go wrong on an empty batch (oneDNN's
    return the input's shape, the default depthwise kernel a nonzero weight
    gradient). Empty outputs contribute nothing to a loss summed over
    examples.
    Synchronised batch norm must not be skipped (its all-reduce needs every
    replica) and needs no skipping (it divides by the count over all
    replicas).

    Args:
        forward: computes the outputs of this replica's examples.
        batch_size: int32 scalar, this replica's number of examples.
        output_spec: the outputs' structure of `keras.KerasTensor`s (or
            anything with ``shape`` and ``dtype``), batch axis first.

    Returns:
        ``forward()``'s structure; every tensor has 0 rows when
        ``batch_size`` is 0.
    """

    def empty():
        return tf.nest.map_structure(
            lambda t: tf.zeros([0, *t.shape[1:]], t.dtype), output_spec)

    return tf.cond(batch_size > 0, forward, empty)


def pool_moving_statistics(batch_norms: Sequence[keras.layers.BatchNormalization],
                           share: tf.Tensor, context) -> None:
    """Gives every replica the example-weighted mean of the moving statistics.

    Each replica updates its own copy of a per-replica batch norm's moving
    mean and variance from its part of the batch; left alone the copies drift
    apart (the saved model holds the first replica's, and each replica
    evaluates with its own). With the copies equal before the step and
    ``share_k`` = replica k's fraction of the global batch, the mean is
    ``m * old + (1 - m) * sum_k share_k stat_k``: for the moving mean,
    exactly one device's update on the whole batch; for the moving variance,
    the mean of the parts' variances (which is what each part was
    normalised with).

    Args:
        batch_norms: the layers to pool (`per_replica_batch_norms`).
        share: float32 scalar, this replica's examples / global examples.
        context: the replica context.
    """
    variables = [v for layer in batch_norms for v in (layer.moving_mean, layer.moving_variance)]
    if not variables:
        return
    local = tf.concat([tf.reshape(v.value, [-1]) for v in variables], axis=0)
    pooled = context.all_reduce(SUM, local * share)
    for v, value in zip(variables, tf.split(pooled, [math.prod(v.shape) for v in variables])):
        v.assign(tf.reshape(value, v.shape))


def pooled_metric_results(metrics: Sequence[keras.metrics.Mean], context) -> dict[str, tf.Tensor]:
    """Each metric's value over the examples of all replicas so far.

    Inside a step a metric's result covers this replica's examples only, and
    Keras averages the replicas' results, which misweighs unevenly shared
    batches (a replica with no example yet counts as accuracy 0). Summing
    every replica's totals and counts first gives the value over all
    examples, the same on every replica.

    Args:
        metrics: `keras.metrics.Mean` metrics (``total`` / ``count``), e.g.
            `keras.metrics.SparseCategoricalAccuracy`.
        context: the replica context.

    Returns:
        ``{metric.name: float32 scalar}``.
    """
    local = tf.stack([tf.stack([m.total.value, m.count.value]) for m in metrics])
    total, count = tf.unstack(context.all_reduce(SUM, local), axis=1)
    values = tf.unstack(tf.math.divide_no_nan(total, count))
    return {m.name: value for m, value in zip(metrics, values)}


def share_overflow(gradients: list[tf.Tensor], context) -> list[tf.Tensor]:
    """Makes every replica's gradients non-finite when any replica's are.

    `keras.optimizers.LossScaleOptimizer` decides whether to skip a step from
    the gradients it is given, which are still per replica: under a strategy
    that merges (MirroredStrategy, MultiWorkerMirroredStrategy) it looks at
    the first local replica only, so an overflow on another replica would be
    summed into every weight; otherwise each replica would decide on its own
    and the replicas would fall out of step. One scalar all-reduce makes the
    decision global.
    """
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])
    overflows = context.all_reduce(SUM, 1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(overflows > 0, float("nan"), 0.0)
    # One poisoned gradient is enough for the optimizer's finiteness check.
    return [gradients[0] + tf.cast(poison, gradients[0].dtype), *gradients[1:]]


def first_replica_batch(iterator, strategy: tf.distribute.Strategy):
    """The first local replica's part of the first batch of a Keras epoch iterator.

    Building a model needs only shapes, and every replica's part has the
    batch's structure and dtypes; the first part is always non-empty.
    ``iterator`` yields ``(epoch, iterator, distributed iterator)`` as Keras's
    ``TensorFlowTrainer`` reads it before the first step of ``fit``.
    """
    for _, _, batches in iterator:
        return tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues) else v,
            next(batches))
    return None
