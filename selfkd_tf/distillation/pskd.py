"""PS-KD's soft targets: the label mixed with the network's own earlier prediction.

Progressive self-knowledge distillation (Kim et al., "Self-Knowledge
Distillation with Progressive Refinement of Targets", ICCV 2021, Eq. 3 and
Algorithm 1) trains epoch ``t`` of ``T`` on the targets

    y_soft = (1 - a_t) onehot(y) + a_t P_T(x),    a_t = a_T (t + 1) / T,

where ``P_T(x)`` is the network's prediction for the sample ``x`` made in
epoch ``t - 1`` (its deepest exit's softmax, or the exits' ensemble). This
module holds every part of it:

- the schedule `pskd_alpha_at` and the mix `soft_targets` (pure functions);
- `teacher_probabilities`, the prediction stored for the next epoch;
- `SoftTargetTable`, the stored predictions of every training sample (all
  ``C`` probabilities, or the ``K`` largest with their classes), kept once
  per machine: read during a step, written for the samples of the step,
  and moved from this epoch's staging rows into the teacher rows at the end
  of the epoch, so a prediction made in epoch ``t`` is read only in epoch
  ``t + 1``;
- `SoftTargetRefresh`, the Keras callback that sets ``a_t`` at every epoch
  start and refreshes the table at every epoch end.

Example:

```python
table = SoftTargetTable(model, num_examples=50000, num_classes=100)
teacher, valid = table.teacher(index)            # [B, C], [B]
targets = soft_targets(labels, 100, teacher, alpha_t, valid)
table.stage(index, tf.nn.softmax(logits))        # read from the next epoch on
table.refresh()                                  # at the epoch's end
```
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from selfkd_tf.distillation import batches

TABLE_DTYPES = ("float32", "float16")
"""Storage of the table: float16 halves its memory."""


def pskd_alpha_at(epoch: int, epochs: int, final_alpha: float) -> float:
    """``a_t = a_T * (t + 1) / T`` for the 0-based epoch ``t`` of ``T``."""
    return final_alpha * (epoch + 1) / epochs


def soft_targets(
    labels: tf.Tensor,
    num_classes: int,
    teacher_probs: tf.Tensor | None = None,
    alpha_t: tf.Tensor | float = 0.0,
    teacher_valid: tf.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tf.Tensor:
    """PS-KD targets ``y_soft = (1 - a_t) y + a_t P_T``.

    ``y`` is the one-hot label, or with ``label_smoothing = eps`` the
    smoothed label ``(1 - eps) onehot(y) + eps / C`` (Szegedy et al., 2016,
    Sec. 7); the controls use it without a teacher.

    Args:
        labels: class ids ``[B]`` or ``[B, 1]``, integers or whole-number
            floats (`selfkd_tf.distillation.batches.class_ids`).
        num_classes: ``C``.
        teacher_probs: ``[B, C]`` previous-epoch predictions, or ``None`` for
            the label alone.
        alpha_t: the current mixing weight.
        teacher_valid: optional ``[B]`` (or ``[B, 1]``) 0/1; rows with 0 have no stored
            prediction yet (epoch 0, or a sample not seen so far) and get the
            label.
        label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
        float32 ``[B, C]``.

    Raises:
        ValueError: labels of another shape (one-hot labels), or teacher
            rows that are not ``[B, C]``.
        tf.errors.InvalidArgumentError: if a label is outside
            ``[0, num_classes)`` (`tf.one_hot` would make its target all
            zeros, a loss of 0, without an error).
    """
    labels = batches.check_class_ids(batches.class_ids(labels), num_classes)
    one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    if label_smoothing:
        one_hot = (1.0 - label_smoothing) * one_hot + label_smoothing / num_classes
    if teacher_probs is None:
        return one_hot
    teacher_probs = tf.convert_to_tensor(teacher_probs)
    if teacher_probs.shape.rank != 2 or teacher_probs.shape[-1] not in (None, num_classes):
        raise ValueError(f"teacher_probs: one row of {num_classes} probabilities per "
                         f"example, shape [B, {num_classes}]; got {teacher_probs.shape}")
    weight = tf.cast(alpha_t, tf.float32) * tf.ones_like(one_hot[:, :1])
    if teacher_valid is not None:
        valid = batches.per_example_weights(teacher_valid, "teacher_valid")
        weight = weight * valid[:, None]
    return one_hot + weight * (tf.cast(teacher_probs, tf.float32) - one_hot)


def teacher_probabilities(logits: Sequence[tf.Tensor], teacher: str) -> tf.Tensor:
    """The prediction PS-KD stores for the next epoch, ``[B, C]``."""
    if teacher == "deepest":
        return tf.nn.softmax(logits[-1], axis=-1)
    return tf.add_n([tf.nn.softmax(z, axis=-1) for z in logits]) / len(logits)



def _one_copy_on_the_host(next_creator, **kwargs):
    """A variable creator that makes one plain variable on this machine's CPU.

    A strategy's own creator would make one copy per replica (a mirrored
    variable): the table of ImageNet (1.28M rows) on every GPU. This one
    bypasses it; `SoftTargetTable` then reads the rows on the host and
    writes them once per step (`tf.distribute.ReplicaContext.merge_call`).
    """
    del next_creator
    # tf.Variable would come back through the strategy's creator; the plain
    # variable class it ends in (TensorFlow's default creator) does not.
    with tf.device("/device:CPU:0"):
        return resource_variable_ops.ResourceVariable(
            initial_value=kwargs["initial_value"], trainable=False, name=kwargs.get("name"),
            dtype=kwargs.get("dtype"), shape=kwargs.get("shape"))


class SoftTargetTable:
    """Every training sample's stored prediction, the PS-KD teacher.

    The table's variables are weights of ``owner`` (the `SelfKDModel`), so
    they are saved and restored with the model's other weights (``.keras``,
    checkpoints); this object reads and writes them. Dense, a row is the
    whole prediction; with ``top_k = K`` it is the prediction's ``K``
    largest probabilities and their classes:

    - ``teacher_probs`` ``[N, C]`` (``[N, K]``; ``dtype``): the teacher, the
      prediction of every sample from the previous epoch;
    - ``teacher_classes`` (top-k only) int32 ``[N, K]``: their classes;
    - ``teacher_valid`` ``[N]`` float32: 1 where a row holds a prediction (0
      rows fall back to the label, e.g. during epoch 0);
    - ``staged_probs``, ``staged_classes`` and ``staged_valid``: this
      epoch's predictions, written during the steps and moved into the
      teacher rows by `refresh`.

    The teacher of a top-k row is the distribution that keeps the stored
    probabilities and spreads the rest of the mass, ``r = 1 - sum_k p_k``,
    evenly over the other ``C - K`` classes: of every distribution with those
    ``K`` probabilities, the one with the most entropy, so the table adds no
    confidence the network did not have. (Renormalising the ``K``
    probabilities to 1 would make the teacher more confident than the
    network was, the opposite of what PS-KD's soft targets are for.) For
    ``K = C - 1`` it is exact.

    Memory: the table is kept once per machine, on its CPU, whatever the
    number of replicas (a mirrored variable would be one copy per replica):
    ``2 N (C b + 4)`` bytes dense, ``2 N (K (b + 4) + 4)`` with top-k, for
    ``b`` bytes per probability (4 in float32, 2 in float16). For ImageNet
    (N = 1,281,167, C = 1000) that is 10.3 GB dense in float32, and 215 MB
    with ``K = 10`` in float32 (164 MB in float16). Every replica reads its
    rows from the host; the rows all replicas predicted are written once.

    Args:
        owner: the layer whose weights the variables become.
        num_examples: ``N``, the training split's size; the sample index
            addresses the rows.
        num_classes: ``C``.
        dtype: one of `TABLE_DTYPES`.
        top_k: ``K`` in ``[1, C)``, or None for the dense table.

    Raises:
        ValueError: ``num_examples`` below 1, an unknown ``dtype``, or a
            ``top_k`` outside ``[1, C)``.
    """

    def __init__(self, owner: keras.layers.Layer, num_examples: int, num_classes: int,
                 dtype: str = "float32", top_k: int | None = None):
        if not num_examples or num_examples < 1:
            raise ValueError(
                "num_train_examples: PS-KD needs the training split size "
                f"(one table row per sample); got {num_examples}."
            )
        if dtype not in TABLE_DTYPES:
            raise ValueError(
                f"table_dtype: got {dtype!r}; allowed: {', '.join(TABLE_DTYPES)}."
            )
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k < num_classes):
            raise ValueError(
                f"table_top_k: got {top_k!r}; allowed: integers in [1, {num_classes}) "
                f"(the classes of the prediction kept), or None for all {num_classes}")
        self.dtype = dtype
        self.num_examples = int(num_examples)
        self.num_classes = int(num_classes)
        self.top_k = top_k

        def weight(name, shape, weight_dtype):
            return owner.add_weight(shape=shape, initializer="zeros", dtype=weight_dtype,
                                    trainable=False, autocast=False, name=name)

        width = num_classes if top_k is None else top_k
        with tf.variable_creator_scope(_one_copy_on_the_host):
            self.teacher_probs = weight("soft_target_table", (num_examples, width), dtype)
            self.teacher_valid = weight("soft_target_valid", (num_examples,), "float32")
            self.staged_probs = weight("staged_predictions", (num_examples, width), dtype)
            self.staged_valid = weight("staged_valid", (num_examples,), "float32")
            if top_k is not None:
                self.teacher_classes = weight(
                    "soft_target_classes", (num_examples, top_k), "int32")
                self.staged_classes = weight("staged_classes", (num_examples, top_k), "int32")

    @property
    def variables(self) -> dict[str, keras.Variable]:
        """The table's variables by their name in the owner's checkpoints."""
        found = {"soft_target_table": self.teacher_probs,
                 "soft_target_valid": self.teacher_valid,
                 "staged_predictions": self.staged_probs, "staged_valid": self.staged_valid}
        if self.top_k is not None:
            found.update(soft_target_classes=self.teacher_classes,
                         staged_classes=self.staged_classes)
        return found

    def _rows(self, index: tf.Tensor) -> tf.Tensor:
        """``index`` as int32 ``[B]`` rows, checked to lie in ``[0, N)``.

        Checked on every device: on a GPU `tf.gather` returns zeros for an
        index out of range and a scatter drops it, so a wrong index would
        train against an empty teacher without an error.
        """
        index = tf.convert_to_tensor(index)
        if index.shape.rank == 2 and index.shape[-1] == 1:
            index = index[:, 0]
        if index.shape.rank != 1 or not index.dtype.is_integer:
            raise ValueError(f"index: one integer sample index per example, shape [B]; "
                             f"got {index.dtype.name} {index.shape}")
        index = tf.cast(index, tf.int32)
        message = (f"index: sample indices must be in [0, {self.num_examples}), the "
                   "rows of the PS-KD table (num_train_examples)")
        checks = [tf.debugging.assert_non_negative(index, message=message),
                  tf.debugging.assert_less(index, self.num_examples, message=message)]
        with tf.control_dependencies(checks):
            return tf.identity(index)

    def teacher(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The stored predictions of the samples ``index`` (int ``[B]``).

        Returns:
            ``(probs, valid)``: float32 ``[B, C]`` (with top-k, the completed
            distribution of the class docstring) and float32 ``[B]``, 1 where
            the row holds a prediction.

        Raises:
            tf.errors.InvalidArgumentError: when run, an index outside
                ``[0, N)``.
        """
        index = self._rows(index)
        probs = tf.cast(tf.gather(self.teacher_probs.value, index), tf.float32)
        valid = tf.gather(self.teacher_valid.value, index)
        if self.top_k is None:
            return probs, valid
        classes = tf.gather(self.teacher_classes.value, index)
        rest = tf.maximum(1.0 - tf.reduce_sum(probs, axis=-1, keepdims=True), 0.0)
        fill = rest / (self.num_classes - self.top_k)  # [B, 1]
        chosen = tf.one_hot(classes, self.num_classes, dtype=tf.float32)  # [B, K, C]
        return fill + tf.einsum("bk,bkc->bc", probs - fill, chosen), valid

    def stage(self, index: tf.Tensor, probs: tf.Tensor) -> None:
        """Stores this replica's predictions ``probs`` ``[B, C]`` of the samples ``index``.

        Runs in a replica context: every replica's rows are gathered, and
        written once.
        """
        context = tf.distribute.get_replica_context()
        # tf.identity (in _rows) places the index on this replica's device:
        # under MultiWorkerMirroredStrategy the tensor straight from the input
        # iterator has none, and all_gather then fails ("destinations can not
        # be empty").
        rows = {"index": context.all_gather(self._rows(index), axis=0)}
        if self.top_k is None:
            rows["probs"] = context.all_gather(probs, axis=0)
        else:
            top = tf.math.top_k(probs, k=self.top_k)
            rows["probs"] = context.all_gather(top.values, axis=0)
            rows["classes"] = context.all_gather(top.indices, axis=0)
        context.merge_call(self._write, kwargs=rows)

    def _write(self, strategy, index, probs, classes=None) -> None:
        """Writes the gathered rows once: every replica holds the same ones."""
        first = lambda value: strategy.experimental_local_results(value)[0]  # noqa: E731
        index = first(index)
        self.staged_probs.value.scatter_update(
            tf.IndexedSlices(tf.cast(first(probs), self.dtype), index))
        if classes is not None:
            self.staged_classes.value.scatter_update(tf.IndexedSlices(first(classes), index))
        self.staged_valid.value.scatter_update(
            tf.IndexedSlices(tf.ones_like(index, tf.float32), index))

    def refresh(self) -> None:
        """Moves this epoch's staged predictions into the teacher rows.

        Rows not predicted this epoch (partial epochs, dropped remainders)
        keep their previous content.
        """
        staged = self.staged_valid.value > 0
        pairs = [(self.teacher_probs, self.staged_probs)]
        if self.top_k is not None:
            pairs.append((self.teacher_classes, self.staged_classes))
        for teacher, new in pairs:
            teacher.assign(tf.where(staged[:, None], new.value, teacher.value))
        self.teacher_valid.assign(
            tf.maximum(self.teacher_valid.value, self.staged_valid.value)
        )
        self.staged_valid.assign(tf.zeros_like(self.staged_valid.value))


class SoftTargetRefresh(keras.callbacks.Callback):
    """Advances PS-KD by one epoch: sets ``a_t``, then refreshes the table.

    At the start of epoch ``t`` it sets ``a_t = a_T * (t + 1) / T``; at the
    end it moves the predictions made during the epoch into the teacher
    table (`SelfKDModel.refresh_soft_targets`), so epoch ``t + 1`` learns
    from them. `SelfKDModel.fit` adds this callback itself when PS-KD is on.

    Args:
        epochs: ``T``, the length of the schedule; defaults to the ``epochs``
            passed to `fit`. Set it when training in several `fit` calls.

    Example:

    >>> model.fit(train_ds, epochs=300, callbacks=[SoftTargetRefresh()])
    """

    def __init__(self, epochs: int | None = None):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.model.begin_pskd_epoch(epoch, self.epochs or self.params["epochs"])

    def on_epoch_end(self, epoch, logs=None):
        self.model.refresh_soft_targets()
