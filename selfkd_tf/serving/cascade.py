"""Early-exit inference: a multi-exit network served as a confidence cascade.

Every exit of a network trained with BYOT is a classifier of its own. The
cascade runs the network stage by stage and lets each example leave at the
first exit that is confident enough: exit ``k``'s answer is taken when its
maximum softmax probability is at least the threshold ``T``; examples no
shallow exit is sure of get the deepest exit's answer (as in BranchyNet and
Shallow-Deep Networks). The stages after an example's exit are not computed
for it:

- a batch of one runs each deeper stage inside a `tf.cond` that is skipped
  once the example has left;
- in a larger batch, the examples still undecided after exit ``k`` are
  gathered (`tf.where`, `tf.gather`) and only they go through stage
  ``k + 1``; answers are scattered back to their rows
  (`tf.tensor_scatter_nd_update`).

Batch normalisation runs in inference mode, so an example's answer does not
depend on the other examples of its batch. ``T = 0`` reproduces exit 1 and
any ``T > 1`` the deepest exit.

Example:

```python
cascade = EarlyExitCascade(model.backbone, threshold=0.9)
outputs = cascade(normalized_images)           # float32 [B, H, W, C]
outputs["logits"]     # float32 [B, classes], from the exit that answered
outputs["exit_ids"]   # int32 [B], 1-based
cascade(normalized_images, threshold=0.5)      # another threshold, same graph
cascade.stage_examples.numpy()                 # examples each stage has run on
```

`selfkd_tf.serving.saved_model.export_saved_model` (``exit="cascade"``) serves it on raw
pixels; `selfkd_tf.serving.early_exit` measures its accuracy against its cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from selfkd_tf.models.multi_exit import exit_segments

_THRESHOLD_PROBLEM = ("threshold: must be a number >= 0 (0 answers at exit 1, above 1 "
                      "only at the deepest exit)")


def check_threshold(threshold: float) -> float:
    """The threshold as a float, or ValueError (``"threshold: ..."``).

    Any finite value ``>= 0`` is valid: ``0`` answers everything at exit 1,
    and a value above 1 never answers early.
    """
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{_THRESHOLD_PROBLEM}; got {threshold!r}")
    return value


def check_temperatures(temperatures: Sequence[float] | None, num_exits: int
                       ) -> tuple[float, ...] | None:
    """The temperatures as floats, one per exit, or None; ValueError otherwise.

    Raises:
        ValueError: ``"temperatures: ..."``: not one per exit, or one that is
            not a finite number > 0.
    """
    if temperatures is None:
        return None
    values = tuple(float(t) for t in temperatures)
    if len(values) != num_exits or not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"temperatures: give {num_exits} finite numbers > 0, one per "
                         f"exit; got {list(temperatures)}")
    return values


class EarlyExitCascade(tf.Module):
    """A multi-exit backbone as a confidence cascade that skips deeper stages.

    Args:
        backbone: a functional multi-exit model from
            `selfkd_tf.models.build_multi_exit_resnet` (``model.backbone`` of
            a `SelfKDModel`).
        threshold: the default confidence threshold ``T >= 0``.
        name: the module's name.
        temperatures: optional, one per exit: exit ``k`` answers with
            ``z_k / T_k`` (temperature scaling, `selfkd_tf.metrics.calibration`),
            so the threshold applies to calibrated confidences.

    Call arguments:
        images: float32 ``[B, H, W, C]``, normalised as in training (the
            backbone's input).
        threshold: optional scalar overriding the default for this call;
            a negative, NaN or infinite value fails the call with
            `tf.errors.InvalidArgumentError` (a served cascade returns it
            to the client as an error).

    Returns a dict:
        ``logits``: float32 ``[B, classes]``, the logits of the exit that
        answered each example; ``exit_ids``: int32 ``[B]``, that exit,
        1-based (the first ``k`` with ``max(softmax(z_k)) >= T``, else ``N``).

    Attributes:
        stage_examples: int64 variable ``[N]``: how many examples each stage
            has run on since the cascade was built (or loaded); stage ``k``
            runs only on the examples that no exit before ``k`` answered.
        num_exits, num_classes, threshold.

    Raises:
        ValueError: invalid ``threshold``, or a backbone `exit_segments`
            cannot cut.
    """

    def __init__(self, backbone: keras.Model, threshold: float, name: str | None = None,
                 temperatures: Sequence[float] | None = None):
        super().__init__(name=name)
        segments = exit_segments(backbone)
        self.stages = list(segments.stages)
        self.heads = list(segments.heads)
        self.num_exits = len(self.stages)
        self.num_classes = int(backbone.output["logits"][-1].shape[-1])
        self.threshold = check_threshold(threshold)
        self.temperatures = check_temperatures(temperatures, self.num_exits)
        self.stage_examples = tf.Variable(
            tf.zeros([self.num_exits], tf.int64), trainable=False, name="stage_examples")

    def __call__(self, images, threshold=None) -> dict[str, tf.Tensor]:
        threshold = tf.cast(self.threshold if threshold is None else threshold, tf.float32)
        # A threshold passed per call (e.g. by a serving client) is checked
        # in the graph, as `check_threshold` checks the default: NaN would
        # answer everything at the deepest exit, a negative value at exit 1.
        # Everything runs after the check, so a refused call counts no
        # examples in `stage_examples`.
        valid = tf.logical_and(threshold >= 0, tf.math.is_finite(threshold))
        with tf.control_dependencies([tf.debugging.Assert(
                valid, [_THRESHOLD_PROBLEM, "got", threshold])]):
            batch = tf.shape(images)[0]
            answers = (tf.zeros([batch, self.num_classes], tf.float32),
                       tf.zeros([batch], tf.int32))
            # No image runs no stage: oneDNN's kernels fail on an empty batch.
            logits, exit_ids = tf.cond(
                batch > 0,
                lambda: self._from_stage(0, images, tf.range(batch), answers, threshold),
                lambda: answers)
        return {"logits": logits, "exit_ids": exit_ids}

    def _from_stage(self, k, features, rows, answers, threshold):
        """Runs stage ``k + 1`` (0-based ``k``) and on, for the examples ``rows``."""
        self.stage_examples.assign_add(
            tf.one_hot(k, self.num_exits, dtype=tf.int64)
            * tf.cast(tf.shape(features)[0], tf.int64))
        features = self.stages[k](features, training=False)
        logits = tf.cast(self.heads[k](features, training=False), tf.float32)
        if self.temperatures is not None:
            logits = logits / self.temperatures[k]
        all_logits, exit_ids = answers
        if k == self.num_exits - 1:
            where = rows[:, None]
            return (tf.tensor_scatter_nd_update(all_logits, where, logits),
                    tf.tensor_scatter_nd_update(exit_ids, where, tf.fill(tf.shape(rows), k + 1)))
        sure = tf.reduce_max(tf.nn.softmax(logits), axis=-1) >= threshold
        answered, left = tf.where(sure)[:, 0], tf.where(tf.logical_not(sure))[:, 0]
        where = tf.gather(rows, answered)[:, None]
        answers = (
            tf.tensor_scatter_nd_update(all_logits, where, tf.gather(logits, answered)),
            tf.tensor_scatter_nd_update(exit_ids, where, tf.fill(tf.shape(answered), k + 1)),
        )
        features, rows = tf.gather(features, left), tf.gather(rows, left)
        # The branch not taken is not run: once every example has left, the
        # deeper stages cost nothing.
        return tf.cond(
            tf.size(rows) > 0,
            lambda: self._from_stage(k + 1, features, rows, answers, threshold),
            lambda: answers,
        )
