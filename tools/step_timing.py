"""Timing of single training steps of one configuration, shared by the benchmarks.

`build_model` builds and compiles one configuration: a `SelfKDModel` with
one of the 8 method combinations (``baseline`` is the multi-exit network
trained with the deepest exit's cross-entropy only), or ``backbone``, the
same network without its exit heads trained by `PlainBackbone`.
`synthetic_batches` feeds it a few fixed random batches, so the step times
exclude the input pipeline, and `time_steps` times single steps of
`model.fit`, including everything a real epoch pays per step (Keras's loop,
callbacks, metrics).

The configuration is read from the flags `define_flags` defines
(``--arch``, ``--width_multiplier``, ``--batch_size``, ``--image_size``,
``--num_classes``, ``--num_train_examples``, ``--weight_decay``), used by
``tools/benchmark.py`` and ``tools/multiworker_benchmark.py``.

Example:

```python
define_flags(width_multiplier=0.25, batch_size_help="Global batch size.")
...  # once the flags are parsed:
model = build_model("pskd+byot+dmfl", False, flags.FLAGS)
step_times_s = time_steps(model, synthetic_batches(flags.FLAGS), steps=5)
```
"""

from __future__ import annotations

import contextlib
import time

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

import tool_io  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from selfkd_tf.data import DatasetInfo  # noqa: E402
from selfkd_tf.errors import SettingsError  # noqa: E402
from selfkd_tf.experiment.builders import build_backbone, compile_model  # noqa: E402
from selfkd_tf.experiment.builders import build_model as build_selfkd_model  # noqa: E402
from selfkd_tf.experiment.settings import TrainSettings  # noqa: E402
from selfkd_tf.models import ARCHITECTURES  # noqa: E402

METHOD_COMBINATIONS = (
    "baseline", "byot", "dmfl", "pskd",
    "pskd+byot", "pskd+dmfl", "byot+dmfl", "pskd+byot+dmfl",
)
FULL_METHOD = "pskd+byot+dmfl"
SYNTHETIC_BATCHES = 4
"""Distinct batches `synthetic_batches` repeats; their examples have distinct indices."""


def define_flags(*, width_multiplier: float, batch_size_help: str) -> None:
    """Defines the flags of the configuration `build_model` and `synthetic_batches` read.

    Call it once, from the tool's module; the tool lists them in its
    ``--help`` with ``flags.adopt_module_key_flags(step_timing)``. Bad values
    are refused when the flags are parsed.

    Args:
        width_multiplier: the tool's default ``--width_multiplier``.
        batch_size_help: what ``--batch_size`` is, for the tool's help.
    """
    flags.DEFINE_enum("arch", "resnet18", ARCHITECTURES, "Backbone architecture.")
    flags.DEFINE_float("width_multiplier", width_multiplier,
                       "Scales every channel count; > 0.")
    tool_io.register_finite("width_multiplier", 0, inclusive=False)
    flags.DEFINE_integer("batch_size", 128, batch_size_help, lower_bound=1)
    flags.DEFINE_integer("image_size", 32, "Height and width of the synthetic images.",
                         lower_bound=1)
    flags.DEFINE_integer("num_classes", 100, "Classes of the synthetic labels.",
                         lower_bound=2)
    flags.DEFINE_integer(
        "num_train_examples", 50_000, "Rows of the PS-KD table; at least "
        f"{SYNTHETIC_BATCHES} x --batch_size, the examples of the synthetic "
        "batches, each with its own row.", lower_bound=1)
    flags.DEFINE_float("weight_decay", 5e-4, "Coupled L2 weight decay; >= 0.")
    tool_io.register_finite("weight_decay", 0)
    flags.register_multi_flags_validator(
        ["batch_size", "num_train_examples"],
        lambda values: values["num_train_examples"] >= SYNTHETIC_BATCHES * values["batch_size"],
        message=f"--num_train_examples must be at least {SYNTHETIC_BATCHES} x --batch_size "
                f"(the synthetic batches' examples, each with its own row)")


class PlainBackbone(keras.Model):
    """A single-exit network trained with cross-entropy and coupled L2 decay.

    The reference point for the cost of the exit heads and the
    self-distillation terms: its `train_step` follows `SelfKDModel`'s step
    by step (global-batch loss, weight decay divided among replicas,
    ``optimizer.scale_loss`` / ``optimizer.apply``, loss and accuracy
    metrics), minus everything specific to the multi-exit objective.

    Example:

    ```python
    network = build_multi_exit_resnet("resnet18", 100)
    plain = PlainBackbone(keras.Model(network.input, network.output["logits"][-1]))
    plain.compile(optimizer=make_optimizer())
    ```
    """

    def __init__(self, network: keras.Model, weight_decay: float = 5e-4, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.weight_decay = weight_decay
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, inputs, training=None):
        images = inputs["image"] if isinstance(inputs, dict) else inputs
        return self.network(images, training=training)

    def train_step(self, data):
        x, labels = data
        context = tf.distribute.get_replica_context()
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch_size = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(labels)[0], tf.float32)
        )
        with tf.GradientTape() as tape:
            logits = tf.cast(self(x, training=True), tf.float32)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            ) / global_batch_size
            objective = loss + (0.5 * self.weight_decay / num_replicas) * tf.add_n(
                [tf.reduce_sum(tf.square(v)) for v in self.trainable_variables]
            )
            scaled = self.optimizer.scale_loss(objective)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(loss * num_replicas)
        self.accuracy.update_state(labels, tf.nn.softmax(logits))
        logs = {m.name: m.result() for m in self.metrics}
        logs["lr"] = tf.convert_to_tensor(self.optimizer.learning_rate)
        return logs


class _StepTimer(keras.callbacks.Callback):
    """Records the wall time of every training step."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Reading a log value makes sure the step has finished on the device.
        float(logs["loss"])
        self.times.append(time.perf_counter() - self._start)


def synthetic_batches(args) -> tf.data.Dataset:
    """A few fixed random batches, repeated forever, in the model's format."""
    rng = np.random.default_rng(0)
    shape = (SYNTHETIC_BATCHES, args.batch_size, args.image_size, args.image_size, 3)
    images = rng.normal(size=shape).astype("float32")
    index = rng.choice(
        args.num_train_examples, size=shape[:2], replace=False
    ).astype("int32")
    labels = rng.integers(0, args.num_classes, size=shape[:2]).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices(({"image": images, "index": index}, labels))
    return ds.repeat().prefetch(2)


def _settings(configuration: str, xla: bool, args) -> TrainSettings:
    """The `TrainSettings` of a configuration: its methods, the flags'
    network, and a constant learning rate."""
    methods = () if configuration in ("baseline", "backbone") else configuration.split("+")
    return TrainSettings(
        arch=args.arch, width_multiplier=args.width_multiplier, methods=tuple(methods),
        weight_decay=args.weight_decay, lr_schedule="constant", jit_compile=xla,
        mixed_precision=getattr(args, "mixed_precision", "none"))


def _synthetic_info(args) -> DatasetInfo:
    """What `selfkd_tf.experiment.builders` needs to know of `synthetic_batches`."""
    return DatasetInfo(
        name="synthetic", num_classes=args.num_classes, num_train=args.num_train_examples,
        num_eval=0, eval_split="test", image_shape=(args.image_size, args.image_size, 3),
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        class_names=tuple(map(str, range(args.num_classes))), steps_per_epoch=1)


@contextlib.contextmanager
def _refused_as_flags(args):
    """Words a network the builders refuse as this tool's flags' fault."""
    try:
        yield
    except SettingsError as err:
        raise SettingsError(
            None, f"cannot build {args.arch} from these flags: {err.problem}") from err


def build_network(args) -> keras.Model:
    """The configuration's multi-exit network (``args`` as for `build_model`).

    Raises:
        SettingsError: the network cannot be built from the flags' values
            (e.g. an ``--image_size`` its exit heads cannot take).
    """
    info = _synthetic_info(args)
    with _refused_as_flags(args):
        return build_backbone(_settings("baseline", False, args), info.num_classes,
                              info.image_shape)


def build_model(configuration: str, xla: bool, args) -> keras.Model:
    """A compiled model for one configuration, built by `selfkd_tf.experiment.builders`.

    Args:
        configuration: a method combination (``"+"``-joined, ``"baseline"``
            for none) or ``"backbone"``.
        xla: whether the train step is compiled with XLA.
        args: the parsed flags of `define_flags` (or any object with those
            attributes), and ``mixed_precision`` when it has one.

    Raises:
        SettingsError: see `build_network`.
    """
    keras.utils.set_random_seed(0)
    settings = _settings(configuration, xla, args)
    with _refused_as_flags(args):
        model = build_selfkd_model(settings, _synthetic_info(args))
    if configuration == "backbone":
        network = model.backbone
        model = PlainBackbone(
            keras.Model(network.input, network.output["logits"][-1]),
            weight_decay=args.weight_decay,
        )
    compile_model(model, settings, steps_per_epoch=1)
    return model


def time_steps(model: keras.Model, data: tf.data.Dataset, steps: int) -> list[float]:
    """The wall times (s) of ``steps`` training steps of ``model`` on ``data``, in order."""
    timer = _StepTimer()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return timer.times
