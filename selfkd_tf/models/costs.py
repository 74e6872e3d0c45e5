"""What a network costs: trainable parameters, and FLOPs per image of every exit.

`count_parameters` counts as PyTorch's ``model.parameters()`` does;
`count_flops` counts a forward pass with TensorFlow's profiler; `exit_costs`
gives the FLOPs of every stage and exit head of a multi-exit network, which
an early-exit cascade spends as its examples leave (`ExitCosts`).

Example:

```python
costs = exit_costs(backbone)
costs.single_exit(2), costs.cascade_exit(2)   # FLOPs per image
count_parameters(backbone)
```
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf.models.multi_exit import exit_segments


def count_parameters(model: keras.Model) -> int:
    """Trainable parameters, counted as PyTorch's ``model.parameters()``.

    Batch-norm moving statistics are not parameters; the ``SelfKDModel``'s
    PS-KD tables are not either.
    """
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def count_flops(model: keras.Model) -> int:
    """Floating-point operations of one forward pass on one example.

    Counted by TensorFlow's profiler on the inference graph built from the
    layers' shapes (a multiply-accumulate is two operations); ops without a
    registered count (e.g. activations) add nothing. ``model`` is any
    single-input functional model: a classifier, or a stage or exit head
    from `selfkd_tf.models.multi_exit.exit_segments`.
    """
    forward = tf.function(lambda inputs: model(inputs, training=False))
    graph = forward.get_concrete_function(
        tf.TensorSpec([1, *model.input.shape[1:]], model.input.dtype)).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    # The v1 profiler warns about its own deprecated internals.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        profile = tf.compat.v1.profiler.profile(
            graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
            options=options)
    finally:
        logger.setLevel(level)
    return int(profile.total_float_ops)


@dataclasses.dataclass(frozen=True)
class ExitCosts:
    """FLOPs per image of every stage and exit head of a multi-exit network.

    Attributes:
        stage_flops: ``N`` counts; stage 1 includes the stem.
        head_flops: ``N`` counts; head ``k`` maps stage ``k``'s output to
            exit ``k``'s logits (exit head, pooling, classifier).
    """

    stage_flops: tuple[int, ...]
    head_flops: tuple[int, ...]

    def single_exit(self, exit: int) -> int:  # noqa: A002
        """The cost of exit ``exit`` (1-based) served alone: its stages and its head."""
        return sum(self.stage_flops[:exit]) + self.head_flops[exit - 1]

    def cascade_exit(self, exit: int) -> int:  # noqa: A002
        """The cascade's cost for an example answered at exit ``exit``.

        The example has run stages ``1..exit`` and the heads of exits
        ``1..exit`` (the shallower heads were asked and were not sure).
        """
        return sum(self.stage_flops[:exit]) + sum(self.head_flops[:exit])


def exit_costs(backbone: keras.Model) -> ExitCosts:
    """`ExitCosts` of a multi-exit backbone, cut by
    `selfkd_tf.models.multi_exit.exit_segments`."""
    segments = exit_segments(backbone)
    return ExitCosts(tuple(count_flops(m) for m in segments.stages),
                     tuple(count_flops(m) for m in segments.heads))
