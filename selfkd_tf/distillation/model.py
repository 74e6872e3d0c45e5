"""`SelfKDModel`: a multi-exit network that trains itself with PS-KD, BYOT and DMFL.

The model wraps a functional multi-exit backbone (see
`selfkd_tf.models.build_multi_exit_resnet`) and overrides `train_step` and
`test_step`, so training is plain `model.fit` with callbacks.

PS-KD state lives in non-trainable variables of the model, so it is saved
and restored with the weights (`.keras`, `.weights.h5`, checkpoints):

- ``soft_target_table`` ``[num_train_examples, C]``: the teacher, i.e. the
  prediction for every training sample from the previous epoch;
- ``soft_target_valid`` ``[num_train_examples]``: 1 where a row holds a
  prediction (0 rows fall back to one-hot targets, e.g. during epoch 0);
- ``staged_predictions`` / ``staged_valid``: this epoch's predictions,
  written during the step and moved into the table at the end of the epoch,
  so a prediction made in epoch t is read only in epoch t + 1;
- ``pskd_alpha_t``: the current mixing weight, set at every epoch start.

`selfkd_tf.distillation.pskd` reads and writes them
(``model.pskd_table``, a `SoftTargetTable`; None without PS-KD), and its
`SoftTargetRefresh` callback drives the epochs.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf.distillation import batches
from selfkd_tf.distillation import losses
from selfkd_tf.distillation import pskd
from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distribution import replicas
# Imported for its side effect: a saved SelfKDModel's backbone uses layer
# classes registered there, so loading one must not depend on the caller
# having imported the models package.
from selfkd_tf import models  # noqa: F401
from selfkd_tf.models.multi_exit import as_multi_exit, check_multi_exit
from selfkd_tf.optimizers.weight_decay import decayed_variables
from selfkd_tf.distribution.multiworker import MultiWorkerTrainer, in_multi_worker_mode


def _holds_no_example(x) -> bool:
    """Whether ``x`` (arrays, tensors, a dict of them, a dataset of known
    length) is known to hold no example."""
    if isinstance(x, tf.data.Dataset):
        return int(x.cardinality()) == 0
    if isinstance(x, dict):
        x = x.get("image")
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) > 0 and shape[0] == 0


@keras.saving.register_keras_serializable(package="selfkd_tf")
class SelfKDModel(MultiWorkerTrainer, keras.Model):
    """A self-distilling multi-exit classifier.

    Args:
        backbone: functional model mapping images ``[B, H, W, C]`` to
            ``{"logits": [z_1..z_N], "features": [F_1..F_N]}``, the
            multi-exit contract (`selfkd_tf.models.multi_exit`;
            `selfkd_tf.models.attach_exits` gives any functional model
            exits), or a plain classifier from images to logits
            ``[B, classes]``, one exit (PS-KD, label smoothing).
        num_train_examples: size of the training split; the PS-KD table has
            one row per training sample index. Required with ``"pskd"``.
        config: a `selfkd_tf.distillation.SelfKDConfig` (or its dict form).
        weight_decay: coupled L2 weight decay, added to the gradient before
            momentum (PyTorch ``SGD`` semantics, as the reference trains).
        weight_decay_exclude: kinds of weights the decay leaves out
            (`selfkd_tf.optimizers.weight_decay`: ``"norm"``, ``"bias"``,
            ``"embedding"``); default none, every trainable weight decays.
        table_dtype: ``"float32"`` or ``"float16"`` (halves the table's
            probabilities' memory).
        table_top_k: keep each sample's ``K`` largest probabilities and
            their classes instead of all ``C`` (`pskd.SoftTargetTable`: 215
            MB instead of 10.3 GB for ImageNet with ``K = 10``); None: all.
        input_mean, input_std: the normalisation the data pipeline applied,
            per channel in [0, 1] pixel units; kept so an exported model can
            take raw pixels.

    Data: every element is ``({"image": [B, H, W, C], "index": [B]}, labels)``
    as produced by `selfkd_tf.data.make_datasets`; ``index`` is the stable
    sample index PS-KD needs (it rides inside ``x`` because Keras reads a
    3-tuple as ``(x, y, sample_weight)``). Labels are int class ids ``[B]``
    (or ``[B, 1]``). Evaluation also accepts plain image tensors as ``x``.

    Weights: ``(x, labels, sample_weight)`` elements, ``fit(...,
    sample_weight=w)`` with arrays and ``fit(..., class_weight={class: w})``
    weigh every per-example loss term as `selfkd_tf.distillation.losses` describes
    (Keras's ``"sum_over_batch_size"``); evaluation weighs its loss the same
    way. Accuracies stay unweighted, as Keras's ``compile(metrics=...)``
    are. The PS-KD table stores every example's prediction whatever its
    weight: a weight scales what an example teaches, not what the network
    predicts for it. Weighted examples still take part in the batch-norm
    statistics, as in any Keras model.

    Several replicas: any global batch size trains with any replica count,
    however `tf.distribute` shares a batch out (parts may be uneven or
    empty); see `selfkd_tf.distribution.replicas`. With ``sync_batchnorm`` the losses,
    gradients, table rows and metrics are one device's; with per-replica
    batch norm each replica normalises its own part, and the replicas'
    moving statistics are pooled after every step.

    Metrics (``model.metrics_names``, in this order): ``loss`` (the total
    objective), ``ce``, ``byot``, ``dmfl``, ``exit{i}_accuracy`` for every
    exit and ``ensemble_accuracy`` (mean of the exits' probabilities);
    training also logs ``alpha_t`` and ``lr``. ``lr`` is the rate the step
    applied and ``alpha_t`` the teacher's weight it applied: ``a_t`` times
    the share of the batch with a stored prediction, so 0 in epoch 0, whose
    targets are one-hot; an epoch's value is its last step's. Evaluation
    reports every metric, so ``evaluate`` returns one value per name: the
    loss terms are the objective's with the labels as the targets (the
    PS-KD teacher exists for training samples only; with label smoothing,
    the smoothed labels), averaged over every example; ``ce`` is then the
    deepest exit's cross-entropy with the labels, its NLL.

    Example:

    ```python
    backbone = skd.build_multi_exit_resnet("resnet18", num_classes=10)
    model = skd.SelfKDModel(backbone, num_train_examples=50000)
    model.compile(optimizer=skd.make_optimizer(epochs=200, steps_per_epoch=391))
    model.fit(train_ds, epochs=200, validation_data=test_ds)  # refresh callback added
    ```
    """

    def __init__(
        self,
        backbone: keras.Model,
        num_train_examples: int | None = None,
        config: SelfKDConfig | dict | None = None,
        weight_decay: float = 5e-4,
        weight_decay_exclude: tuple[str, ...] | list[str] = (),
        table_dtype: str = "float32",
        table_top_k: int | None = None,
        input_mean: tuple[float, ...] | None = None,
        input_std: tuple[float, ...] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = SelfKDConfig.from_config(config)
        self.selfkd_config = config or SelfKDConfig()
        backbone = as_multi_exit(backbone)
        self.backbone = backbone
        self.num_exits, self.num_classes, _ = check_multi_exit(backbone)
        if self.num_classes < 2:
            raise ValueError(
                f"backbone: a classifier needs at least 2 classes; its logits have "
                f"{self.num_classes}")
        self.selfkd_config.check_num_exits(self.num_exits)
        self.selfkd_config.shallow_byot_exits(self.num_exits)  # validates
        if weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0; got {weight_decay}.")
        self.weight_decay = weight_decay
        self.weight_decay_exclude = tuple(weight_decay_exclude)
        decayed_variables(backbone, self.weight_decay_exclude)  # validates
        self.table_dtype = table_dtype
        self.table_top_k = table_top_k
        self.num_train_examples = num_train_examples
        self.input_mean = tuple(input_mean) if input_mean is not None else None
        self.input_std = tuple(input_std) if input_std is not None else None

        self.pskd_alpha_t = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="pskd_alpha_t",
            aggregation="only_first_replica",
        )
        if table_dtype not in pskd.TABLE_DTYPES:
            raise ValueError(
                f"table_dtype: got {table_dtype!r}; allowed: "
                f"{', '.join(pskd.TABLE_DTYPES)}."
            )
        self.pskd_table = None
        if self.selfkd_config.uses("pskd"):
            self.pskd_table = pskd.SoftTargetTable(
                self, num_train_examples, self.num_classes, table_dtype, table_top_k)
            # Checkpoints and .keras files address the table's variables by
            # these attribute names (soft_target_table, soft_target_valid, ...).
            for name, variable in self.pskd_table.variables.items():
                setattr(self, name, variable)

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.term_trackers = {
            name: keras.metrics.Mean(name=name) for name in ("ce", "byot", "dmfl")
        }
        self.exit_accuracies = [
            keras.metrics.SparseCategoricalAccuracy(name=f"exit{i}_accuracy")
            for i in range(1, self.num_exits + 1)
        ]
        self.ensemble_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name="ensemble_accuracy"
        )

    # -- Keras plumbing -------------------------------------------------

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            *self.term_trackers.values(),
            *self.exit_accuracies,
            self.ensemble_accuracy,
        ]

    def call(self, inputs, training=None):
        images = inputs["image"] if isinstance(inputs, dict) else inputs
        return self.backbone(images, training=training)

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None,
                metrics=None, weighted_metrics=None, **kwargs):
        """`keras.Model.compile` without ``loss`` and ``metrics``.

        The objective and the logged metrics are the model's own (see the
        class docstring), so a compiled loss or metric would be ignored.

        Raises:
            ValueError: if ``loss``, ``loss_weights``, ``metrics`` or
                ``weighted_metrics`` is given.
        """
        given = [name for name, value in (
            ("loss", loss), ("loss_weights", loss_weights), ("metrics", metrics),
            ("weighted_metrics", weighted_metrics)) if value is not None]
        if given:
            raise ValueError(
                f"{given[0]}: SelfKDModel computes its own objective and "
                "metrics; compile it with the optimizer only (plus run_eagerly, "
                "steps_per_execution, jit_compile)."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        # Keras skips compiling a loaded model whose compile() is overridden;
        # this one takes Keras's arguments, so the saved optimizer (and its
        # state) comes back as it would for a plain model.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto",
            callbacks=None, class_weight=None, **kwargs):
        """`keras.Model.fit`, with the PS-KD table refresh guaranteed.

        With PS-KD on, a `SoftTargetRefresh` callback is added when missing
        and moved to the front of the list, so the table is refreshed before
        any checkpointing callback saves the epoch's state. ``class_weight``
        becomes per-example weights (Keras's conversion); classes it leaves
        out weigh 1.

        Epochs are checked against what was planned for them: a training
        dataset of `selfkd_tf.data.make_datasets` built with ``epochs=N``
        holds all its epochs back to back, so without ``steps_per_epoch``
        Keras would take all of them as every epoch; it then gives
        ``steps_per_epoch`` (its ``epoch_range``), and ``epochs`` or
        ``initial_epoch`` other than the dataset's are refused. An optimizer
        of `selfkd_tf.optimizers.make_optimizer` with a schedule spans a
        number of epochs and steps (``schedule_span``): more ``epochs``, or
        another number of steps per epoch than ``fit`` takes from the data
        (the dataset's cardinality when ``steps_per_epoch`` is left out), are
        refused, since the learning rate would follow another schedule (a
        cosine schedule would reach 0 early). In several ``fit`` calls,
        pass ``SoftTargetRefresh(epochs=T)`` so PS-KD's ``a_t`` spans all
        ``T`` epochs.

        Raises:
            ValueError: if compiled with ``jit_compile=True`` under a
                strategy with several replicas: Keras compiles the step of
                all replicas as one XLA program, which cannot reach the
                other devices' variables (it would fail at the first step
                with a device error); if the backbone mixes synchronised and
                per-replica batch norm under several replicas (an empty
                share can neither skip the forward pass, which the
                synchronised layers' all-reduce needs, nor run it, which
                gives the per-replica layers NaN statistics); if
                ``class_weight`` is not a mapping from class ids in
                ``[0, num_classes)`` to finite weights >= 0; if the epochs
                or steps differ from the dataset's or the schedule's (see
                above).
        """
        num_replicas = self.distribute_strategy.num_replicas_in_sync
        if num_replicas > 1 and getattr(self, "jit_compile", False):
            raise ValueError(
                f"jit_compile=True needs a single replica; the strategy has "
                f"{num_replicas}. Compile with jit_compile='auto' (XLA off) or "
                "train on one device."
            )
        if (num_replicas > 1 and replicas.per_replica_batch_norms(self.backbone)
                and replicas.has_synchronized_batch_norm(self.backbone)):
            raise ValueError(
                "sync_batchnorm: the backbone mixes synchronized and "
                f"per-replica batch normalization, which {num_replicas} replicas "
                "cannot train on uneven batches; synchronize all of them or none."
            )
        class_weight = batches.class_weight_for(class_weight, self.num_classes)
        if _holds_no_example(x):
            raise ValueError("x: no example to train on")
        kwargs["steps_per_epoch"] = self._planned_steps(
            x, epochs, kwargs.get("initial_epoch", 0), kwargs.get("steps_per_epoch"))
        callbacks = list(callbacks or [])
        if self.selfkd_config.uses("pskd"):
            refresh = [c for c in callbacks if isinstance(c, pskd.SoftTargetRefresh)]
            others = [c for c in callbacks if not isinstance(c, pskd.SoftTargetRefresh)]
            callbacks = (refresh or [pskd.SoftTargetRefresh()]) + others
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            # Without a strategy scope Keras builds the optimizer inside the
            # first trace of the train step; the slot variables created there
            # make tf.function trace the whole step a second time.
            with self.distribute_strategy.scope():
                optimizer.build(self.trainable_variables)
        return super().fit(x, y, batch_size=batch_size, epochs=epochs,
                           verbose=verbose, callbacks=callbacks,
                           class_weight=class_weight, **kwargs)

    def _planned_steps(self, x, epochs: int, initial_epoch: int,
                       steps_per_epoch: int | None) -> int | None:
        """``fit``'s ``steps_per_epoch``, checked against the data's and the
        optimizer's plans (see `fit`)."""
        span = getattr(x, "epoch_range", None)
        if span is not None:
            if (initial_epoch, epochs) != (span.initial_epoch, span.epochs):
                raise ValueError(
                    f"epochs: the dataset holds epochs {span.initial_epoch + 1}.."
                    f"{span.epochs} back to back (make_datasets(epochs={span.epochs}, "
                    f"initial_epoch={span.initial_epoch})); fit it with epochs={span.epochs},"
                    f" initial_epoch={span.initial_epoch}; got epochs={epochs}, "
                    f"initial_epoch={initial_epoch}")
            if steps_per_epoch is None:
                steps_per_epoch = span.steps_per_epoch
                self._check_schedule(epochs, steps_per_epoch, "the dataset's epochs")
                return steps_per_epoch
        elif steps_per_epoch is None and isinstance(x, tf.data.Dataset):
            whole = int(x.cardinality())
            if whole > 0:
                self._check_schedule(
                    epochs, whole, "the whole dataset as every epoch, since "
                    "steps_per_epoch was left out")
                return None
        self._check_schedule(epochs, None, "")
        return steps_per_epoch

    def _check_schedule(self, epochs: int, steps: int | None, source: str) -> None:
        """Refuses ``epochs`` of ``steps`` steps (None: not compared) that the
        optimizer's schedule does not span."""
        span = getattr(getattr(self, "optimizer", None), "schedule_span", None)
        if span is None:
            return
        planned_epochs, planned_steps = span
        # Fewer epochs are a run stopped early (a Hyperband trial, a resumed
        # segment); more would train past the schedule's end.
        if epochs > planned_epochs:
            raise ValueError(
                f"epochs: the optimizer's learning-rate schedule spans {planned_epochs} "
                f"epochs (make_optimizer(epochs={planned_epochs})); fit got epochs={epochs}")
        if steps is not None and steps != planned_steps:
            raise ValueError(
                f"steps_per_epoch: the optimizer's learning-rate schedule spans "
                f"{planned_steps} steps per epoch (make_optimizer(steps_per_epoch="
                f"{planned_steps})); fit would take {steps} ({source}); pass "
                f"steps_per_epoch={planned_steps}")

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`; data without an example is refused.

        Keras would return no value at all (``[]``), against the
        `metrics_names` a caller zips the values with.

        Raises:
            ValueError: ``x`` holds no example (``"x: no example to
                evaluate"``), also found once the data are read.
        """
        if _holds_no_example(x):
            raise ValueError("x: no example to evaluate")
        results = super().evaluate(x, y, *args, **kwargs)
        if results == [] or results == {}:
            raise ValueError("x: no example to evaluate")
        return results

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`; data without an example give outputs without rows.

        Keras fails on them (``UnboundLocalError``). Each output then has the
        backbone's shape with 0 rows: ``{"logits": [[0, C], ...], "features":
        [[0, D], ...]}``.
        """
        if _holds_no_example(x):
            return tf.nest.map_structure(
                lambda t: np.zeros([0, *t.shape[1:]], t.dtype), self.backbone.output)
        return super().predict(x, *args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds the model from the mean of the replicas' parts of the
        # first batch, which fails (AddN of different shapes) when the parts
        # differ in size: 16 examples on 3 replicas are 6 + 6 + 4. Building
        # needs only shapes, so the first replica's part serves. Multi-worker
        # strategies are MultiWorkerTrainer's.
        strategy = self.distribute_strategy
        if (iterator is not None and strategy.num_replicas_in_sync > 1
                and not in_multi_worker_mode(strategy)):
            data_batch, iterator = replicas.first_replica_batch(iterator, strategy), None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # -- PS-KD table ----------------------------------------------------

    def begin_pskd_epoch(self, epoch: int, epochs: int) -> float:
        """Sets ``a_t`` for the 0-based ``epoch`` of ``epochs``; returns it."""
        alpha_t = pskd.pskd_alpha_at(epoch, epochs, self.selfkd_config.pskd_alpha)
        self.pskd_alpha_t.assign(alpha_t if self.selfkd_config.uses("pskd") else 0.0)
        return alpha_t

    def refresh_soft_targets(self) -> None:
        """Moves this epoch's staged predictions into the teacher table
        (`SoftTargetTable.refresh`); nothing without PS-KD."""
        if self.pskd_table is not None:
            self.pskd_table.refresh()

    # -- steps ----------------------------------------------------------

    def _update_accuracies(self, labels, logits) -> None:
        probs = [tf.nn.softmax(tf.cast(z, tf.float32)) for z in logits]
        for tracker, p in zip(self.exit_accuracies, probs):
            tracker.update_state(labels, p)
        self.ensemble_accuracy.update_state(labels, tf.add_n(probs) / len(probs))

    def _forward(self, images: tf.Tensor, training: bool):
        """Outputs of this replica's examples, which may be none.

        An empty batch skips the network (see `replicas.forward_unless_empty`):
        in evaluation and prediction always (TensorFlow's oneDNN kernels fail
        on it even on one device: ``predict_on_batch`` of no image), in
        training on a replica of several, unless synchronised batch norm needs
        this replica in its all-reduces; then the network's layers must cope
        with an empty batch, as `selfkd_tf.models.primitives`' do.
        """
        forward = lambda: self(images, training=training)  # noqa: E731
        if training and (tf.distribute.get_replica_context().num_replicas_in_sync == 1
                         or replicas.has_synchronized_batch_norm(self.backbone)):
            return forward()
        return replicas.forward_unless_empty(
            forward, tf.shape(images)[0], self.backbone.output)

    def train_step(self, data):
        images, index, labels, sample_weight = batches.unpack(data)
        config = self.selfkd_config
        use_pskd = config.uses("pskd")
        if use_pskd and index is None:
            raise ValueError(
                "PS-KD needs the sample index: feed x as "
                "{'image': images, 'index': sample_indices}."
            )
        context = tf.distribute.get_replica_context()
        num_replicas = context.num_replicas_in_sync
        # Replicas' shares of a batch may differ in size, down to none:
        # every average divides by the global count, so each share weighs
        # what it holds.
        batch_size = tf.shape(labels)[0]
        global_batch_size = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.cast(batch_size, tf.float32)
        )
        teacher_probs = teacher_valid = None
        if use_pskd:
            teacher_probs, teacher_valid = self.pskd_table.teacher(index)

        with tf.GradientTape() as tape:
            outputs = self._forward(images, training=True)
            terms = losses.selfkd_loss(
                outputs["logits"], outputs["features"], labels, config,
                teacher_probs=teacher_probs, alpha_t=self.pskd_alpha_t.value,
                teacher_valid=teacher_valid, global_batch_size=global_batch_size,
                sample_weight=sample_weight,
            )
            objective = terms["total"]
            if self.weight_decay:
                # Replicas' gradients are summed, so each adds its share.
                objective += (0.5 * self.weight_decay / num_replicas) * tf.add_n(
                    [tf.reduce_sum(tf.square(v)) for v in
                     decayed_variables(self.backbone, self.weight_decay_exclude)]
                )
            scaled = self.optimizer.scale_loss(objective)
        gradients = tape.gradient(scaled, self.trainable_variables)
        # Exits without a training signal (e.g. the baseline's shallow heads)
        # get None; a zero gradient leaves them as they are without a warning.
        gradients = [
            tf.zeros_like(v) if g is None else g
            for g, v in zip(gradients, self.trainable_variables)
        ]
        if num_replicas > 1 and isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer
        ):
            gradients = replicas.share_overflow(gradients, context)
        # The rate this step applies: `apply` advances the schedule's step.
        learning_rate = tf.convert_to_tensor(self.optimizer.learning_rate)
        self.optimizer.apply(gradients, self.trainable_variables)
        if num_replicas > 1:
            replicas.pool_moving_statistics(
                replicas.per_replica_batch_norms(self.backbone),
                tf.cast(batch_size, tf.float32) / global_batch_size, context,
            )

        if use_pskd:
            self.pskd_table.stage(index, pskd.teacher_probabilities(
                outputs["logits"], config.pskd_teacher))
        # Each replica holds its part of a global-batch loss; scaled by the
        # replica count, the pooled mean over replicas is the global value.
        self.loss_tracker.update_state(terms["total"] * num_replicas)
        for name, tracker in self.term_trackers.items():
            tracker.update_state(terms[name] * num_replicas)
        self._update_accuracies(labels, outputs["logits"])
        logs = replicas.pooled_metric_results(self.metrics, context)
        # a_t as applied: rows without a stored prediction (all of epoch 0)
        # train on one-hot targets, whatever a_t's schedule says.
        alpha_t = tf.convert_to_tensor(self.pskd_alpha_t)
        if use_pskd:
            alpha_t *= context.all_reduce(
                tf.distribute.ReduceOp.SUM, tf.reduce_sum(teacher_valid)
            ) / global_batch_size
        logs["alpha_t"] = alpha_t
        logs["lr"] = learning_rate
        return logs

    def test_step(self, data):
        images, _, labels, sample_weight = batches.unpack(data)
        outputs = self._forward(images, training=False)
        context = tf.distribute.get_replica_context()
        global_batch_size = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(labels)[0], tf.float32))
        # The training objective with the labels as targets: the PS-KD
        # teacher exists for the training samples only.
        terms = losses.selfkd_loss(
            outputs["logits"], outputs["features"], labels, self.selfkd_config,
            global_batch_size=global_batch_size, sample_weight=sample_weight)
        # Weighted by the batch's examples, so the epoch's value is the mean
        # over every example, a short last batch included; scaled by the
        # replica count, as in training.
        num_replicas = context.num_replicas_in_sync
        for name, tracker in (("total", self.loss_tracker), *self.term_trackers.items()):
            tracker.update_state(terms[name] * num_replicas, sample_weight=global_batch_size)
        self._update_accuracies(labels, outputs["logits"])
        return replicas.pooled_metric_results(self.metrics, context)

    def predict_step(self, data):
        images, _, _, _ = batches.unpack(data)
        return self._forward(images, training=False)

    def export(self, filepath, format="tf_saved_model", verbose=None,  # noqa: A002
               input_signature=None, **kwargs):
        """Refused: Keras's export cannot serve a multi-exit model's outputs.

        Use ``selfkd_tf.export_saved_model(model, path)`` or ``selfkd-export``,
        which serve one exit (or the ensemble, or the early-exit cascade) on
        raw pixels with the training normalisation and the class names, as
        TF Serving, TFLite and ONNX converters take them.

        Raises:
            ValueError: always, in one line naming the library's export.
        """
        raise ValueError(
            "export: Keras's model.export cannot serve a multi-exit model; use "
            "selfkd_tf.export_saved_model(model, path, exit='deepest') or selfkd-export, "
            "which serve one exit (or the ensemble, or the cascade) on raw 0..255 pixels")

    # -- serialisation --------------------------------------------------

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_train_examples": self.num_train_examples,
            "config": self.selfkd_config.get_config(),
            "weight_decay": self.weight_decay,
            "weight_decay_exclude": list(self.weight_decay_exclude),
            "table_dtype": self.table_dtype,
            "table_top_k": self.table_top_k,
            "input_mean": self.input_mean,
            "input_std": self.input_std,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            models.upgrade_layers(config["backbone"]),
            custom_objects=custom_objects,
        )
        return cls(**config)
