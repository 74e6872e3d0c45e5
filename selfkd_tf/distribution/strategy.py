"""Distribution strategies and numeric precision, chosen by name.

`SelfKDModel` is written for data parallelism: its losses are reduced over
the global batch and its PS-KD table is written with all-gathered rows, so
any `tf.distribute` strategy gives the single-replica semantics. Build the
model, compile it and call `fit` inside ``strategy.scope()``, and batch the
dataset with the *global* batch size; Keras splits every batch between the
replicas.

Example:

```python
strategy = make_strategy("mirrored")
set_mixed_precision("bfloat16")
with strategy.scope():
    backbone = build_multi_exit_resnet("resnet18", 100, sync_batchnorm=True)
    model = SelfKDModel(backbone, num_train_examples=info.num_train)
    model.compile(optimizer=make_optimizer())
model.fit(train, epochs=200, steps_per_epoch=info.steps_per_epoch)
```
"""

from __future__ import annotations

import keras
import tensorflow as tf

from selfkd_tf.distribution import cluster

STRATEGIES = ("none", "mirrored", "multiworker")
PRECISIONS = ("none", "bfloat16", "float16")

_POLICIES = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def make_strategy(
    name: str = "none", *, collective_timeout: float | None = None
) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy called ``name``.

    - ``"none"``: TensorFlow's default strategy, one device.
    - ``"mirrored"``: one replica per local GPU; without GPUs, one per
      logical CPU device (a single one unless the process split its CPU with
      `tf.config.set_logical_device_configuration`).
    - ``"multiworker"``: `tf.distribute.MultiWorkerMirroredStrategy` over the
      cluster described by the ``TF_CONFIG`` environment variable (checked
      by `selfkd_tf.distribution.cluster.parse_tf_config`). It must be created before any
      other TensorFlow operation of the process runs. A worker that dies or
      stops responding is noticed by TensorFlow's coordination service
      (heartbeats, about 10 s), and the other workers' next collective
      operation fails.

    Args:
        name: one of `STRATEGIES`.
        collective_timeout: seconds after which a cross-worker collective that
            has not completed fails, also when its peers are alive but stuck
            (``"multiworker"`` only; ``None``: no limit). It must exceed the
            longest time one worker can legitimately run ahead of another,
            e.g. while the others still build their data.

    Returns:
        The strategy. Create the model and the optimizer, and call `compile`
        and `fit`, inside ``strategy.scope()``.

    Raises:
        ValueError: an unknown ``name``; ``collective_timeout`` without
            ``"multiworker"``; ``"multiworker"`` with ``TF_CONFIG`` unset or
            malformed, or naming an address this process cannot listen on
            (one line starting ``"TF_CONFIG: "``).

    Example:

    >>> make_strategy("none").num_replicas_in_sync
    1
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"distribute: got {name!r}; allowed: {', '.join(STRATEGIES)}."
        )
    if collective_timeout is not None and name != "multiworker":
        raise ValueError(
            "collective_timeout: only meaningful with 'multiworker'; "
            f"got distribute={name!r}."
        )
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multiworker":
        config = cluster.read_tf_config()
        if config is None:
            raise ValueError(
                f"{cluster.TF_CONFIG}: not set; distribute='multiworker' needs "
                "the cluster and this worker's task in it (see docs/multiworker.md)."
            )
        task = config["task"]
        address = config["cluster"][task["type"]][task["index"]]
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(
                communication_options=tf.distribute.experimental.CommunicationOptions(
                    timeout_seconds=collective_timeout
                )
            )
        except tf.errors.OpError as error:
            # "Could not start gRPC server": TensorFlow listens on the
            # address's port on every interface, and another process has it.
            port = address.rpartition(":")[2]
            raise ValueError(
                f"{cluster.TF_CONFIG}: cannot start {task['type']} {task['index']} "
                f"at {address} ({error.message.splitlines()[0]}); is port {port} "
                "free on this machine?"
            ) from error
    return tf.distribute.get_strategy()


def set_mixed_precision(mode: str = "none") -> keras.DTypePolicy:
    """Sets Keras's global dtype policy for the layers and models built next.

    ``"bfloat16"`` and ``"float16"`` compute the convolutions and batch
    norms' outputs in reduced precision while every variable stays float32.
    The exits' features and logits, all loss terms, the softmaxes and the
    PS-KD table stay float32. With ``"float16"``, `compile` wraps the
    optimizer in a `keras.optimizers.LossScaleOptimizer` (dynamic loss
    scaling; steps whose gradients overflow are skipped). ``"none"`` restores
    float32.

    Call it before building the model; layers keep the policy they were built
    with.

    Args:
        mode: one of `PRECISIONS`.

    Returns:
        The global policy now in force.

    Example:

    >>> set_mixed_precision("bfloat16").compute_dtype
    'bfloat16'
    >>> set_mixed_precision("none").name
    'float32'
    """
    if mode not in PRECISIONS:
        raise ValueError(
            f"mixed_precision: got {mode!r}; allowed: {', '.join(PRECISIONS)}."
        )
    keras.mixed_precision.set_global_policy(_POLICIES[mode])
    return keras.mixed_precision.global_policy()
