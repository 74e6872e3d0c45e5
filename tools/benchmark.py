"""Times a training step of every method combination, the plain backbone and the input pipeline.

For one architecture, width and batch size, the tool builds each
configuration in this process, warms it up (tracing, XLA compilation) and
then times single training steps with `model.fit`, so the figures include
everything a real epoch pays per step (Keras's loop, callbacks, metrics):

- the 8 method combinations of `SelfKDModel` (``baseline`` is the multi-exit
  network trained with the deepest exit's cross-entropy only);
- ``backbone``: the same network without its exit heads (a sub-model up to
  the deepest logits) trained by `PlainBackbone`, a minimal
  `keras.Model.train_step` with the same structure as `SelfKDModel`'s:
  global-batch cross-entropy, coupled L2 weight decay, loss scaling, same
  optimizer;
- ``pipeline``: the training pipeline of `selfkd_tf.data.make_datasets`
  alone (augmentation and normalization, no model).

The models read a few fixed synthetic batches, so their step times exclude
the input pipeline, which is timed on its own. With ``--rounds`` above 1 the
configurations are timed round-robin, ``--steps`` steps each per round, so a
change of the machine's load during the run affects all of them alike.
Reported per configuration: the median step time, images/s, and the peak
memory (on GPU TensorFlow's peak allocation; on CPU the peak resident set
size of the process during the configuration's first run minus the size
before it was built).

Example:

    python tools/benchmark.py --arch resnet18 --width_multiplier 0.25 \\
        --batch_size 128 --steps 5 --warmup 2 --xla both \\
        --out_json bench.json --out_md bench.md
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf import losses
from selfkd_tf.data import make_datasets
from selfkd_tf.distribute import PRECISIONS, set_mixed_precision
from selfkd_tf.models import ARCHITECTURES, build_multi_exit_resnet
from selfkd_tf.optimizers import make_optimizer
from selfkd_tf.training import SelfKDModel

METHOD_COMBINATIONS = (
    "baseline", "byot", "dmfl", "pskd",
    "pskd+byot", "pskd+dmfl", "byot+dmfl", "pskd+byot+dmfl",
)
CONFIGURATIONS = METHOD_COMBINATIONS + ("backbone", "pipeline")
FULL_METHOD = "pskd+byot+dmfl"
XLA_MODES = {"none": (False,), "on": (True,), "both": (False, True)}
_SYNTHETIC_BATCHES = 4
_SYNTHETIC_PIPELINE_IMAGES = 10_000


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


@dataclasses.dataclass
class Measurement:
    """The timings of one configuration."""

    configuration: str
    xla: bool | None
    step_times_s: list[float] = dataclasses.field(default_factory=list)
    warmup_s: float = 0.0
    peak_memory_mb: float | None = None

    def summary(self, batch_size: int) -> dict:
        median = statistics.median(self.step_times_s)
        return {
            "configuration": self.configuration,
            "xla": self.xla,
            "step_time_s": median,
            "step_time_min_s": min(self.step_times_s),
            "step_time_max_s": max(self.step_times_s),
            "images_per_s": batch_size / median,
            "timed_steps": len(self.step_times_s),
            "step_times_s": self.step_times_s,
            "warmup_s": self.warmup_s,
            "peak_memory_mb": self.peak_memory_mb,
        }


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


class _PeakMemory:
    """Peak memory while the context is active, in MB.

    On GPU: TensorFlow's peak allocation on ``GPU:0``. On CPU: the peak
    resident set size of the process, sampled every 5 ms, minus
    ``baseline_bytes`` (the size before the configuration was built).
    """

    def __init__(self, baseline_bytes: int):
        self.baseline_bytes = baseline_bytes
        self.peak_mb = None

    def __enter__(self):
        self._gpu = bool(tf.config.list_logical_devices("GPU"))
        if self._gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
            return self
        self._peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _resident_bytes())

    def __exit__(self, *exc):
        if self._gpu:
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
            self.peak_mb = peak / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = (self._peak - self.baseline_bytes) / 2**20


def _release_free_memory() -> None:
    """Returns the C heap's free pages to the OS (glibc only), so that the next
    configuration's resident-size increase counts the memory it needs rather
    than what the previous ones freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # Not Linux: fall back to the (monotone) peak so far.
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def synthetic_batches(args) -> tf.data.Dataset:
    """A few fixed random batches, repeated forever, in the model's format."""
    rng = np.random.default_rng(0)
    shape = (_SYNTHETIC_BATCHES, args.batch_size, args.image_size, args.image_size, 3)
    images = rng.normal(size=shape).astype("float32")
    index = rng.choice(
        args.num_train_examples, size=shape[:2], replace=False
    ).astype("int32")
    labels = rng.integers(0, args.num_classes, size=shape[:2]).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices(({"image": images, "index": index}, labels))
    return ds.repeat().prefetch(2)


def build_model(configuration: str, xla: bool, args) -> keras.Model:
    """A compiled model for one configuration (not ``pipeline``)."""
    keras.utils.set_random_seed(0)
    network = build_multi_exit_resnet(
        args.arch, args.num_classes,
        input_shape=(args.image_size, args.image_size, 3),
        width_multiplier=args.width_multiplier,
    )
    if configuration == "backbone":
        model = PlainBackbone(
            keras.Model(network.input, network.output["logits"][-1]),
            weight_decay=args.weight_decay,
        )
    else:
        methods = () if configuration == "baseline" else configuration.split("+")
        model = SelfKDModel(
            network, num_train_examples=args.num_train_examples,
            config=losses.SelfKDConfig(methods=methods),
            weight_decay=args.weight_decay,
        )
    model.compile(optimizer=make_optimizer(schedule="constant"), jit_compile=xla)
    return model


def time_steps(model: keras.Model, data: tf.data.Dataset, steps: int) -> list[float]:
    timer = _StepTimer()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return timer.times


def benchmark_models(args, configurations: list[str]) -> list[Measurement]:
    """Warms up every (configuration, XLA) pair, then times them round-robin."""
    data = synthetic_batches(args)
    runs = []
    for xla in XLA_MODES[args.xla]:
        for configuration in configurations:
            gc.collect()
            _release_free_memory()
            measurement = Measurement(configuration, xla)
            start = time.perf_counter()
            with _PeakMemory(_resident_bytes()) as memory:
                model = build_model(configuration, xla, args)
                time_steps(model, data, args.warmup)
                measurement.warmup_s = time.perf_counter() - start
                measurement.step_times_s += time_steps(model, data, args.steps)
            measurement.peak_memory_mb = memory.peak_mb
            _log(measurement, args.batch_size)
            runs.append((measurement, model))
    for _ in range(args.rounds - 1):
        for measurement, model in runs:
            measurement.step_times_s += time_steps(model, data, args.steps)
            _log(measurement, args.batch_size)
    return [measurement for measurement, _ in runs]


def benchmark_pipeline(args) -> Measurement:
    """Times batches of the training pipeline with nothing consuming them."""
    gc.collect()
    _release_free_memory()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset
        if dataset is None:
            dataset = f"npz:{_synthetic_npz(tmp, args)}"
        measurement = Measurement("pipeline", None)
        start = time.perf_counter()
        with _PeakMemory(_resident_bytes()) as memory:
            train, _, _ = make_datasets(dataset, batch_size=args.batch_size)
            batches = iter(train.repeat())
            for _ in range(args.warmup):
                next(batches)
            measurement.warmup_s = time.perf_counter() - start
            for _ in range(args.steps * args.rounds):
                start = time.perf_counter()
                next(batches)
                measurement.step_times_s.append(time.perf_counter() - start)
        measurement.peak_memory_mb = memory.peak_mb
    _log(measurement, args.batch_size)
    return measurement


def _synthetic_npz(directory: str, args) -> str:
    """CIFAR-shaped random uint8 images, so no dataset is needed."""
    rng = np.random.default_rng(0)
    n = _SYNTHETIC_PIPELINE_IMAGES
    size = (args.image_size, args.image_size, 3)
    path = os.path.join(directory, "synthetic.npz")
    np.savez(
        path,
        x_train=rng.integers(0, 256, size=(n, *size), dtype=np.uint8),
        y_train=np.arange(n) % args.num_classes,
        x_test=rng.integers(0, 256, size=(args.num_classes, *size), dtype=np.uint8),
        y_test=np.arange(args.num_classes),
    )
    return path


def _log(measurement: Measurement, batch_size: int) -> None:
    summary = measurement.summary(batch_size)
    print(
        f"{summary['configuration']:>15} xla={summary['xla']!s:5} "
        f"{1000 * summary['step_time_s']:9.1f} ms/step "
        f"{summary['images_per_s']:9.1f} images/s "
        f"({summary['timed_steps']} steps, warm-up {summary['warmup_s']:.1f} s)",
        flush=True,
    )


def ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """Step time of the full method relative to the baseline and the backbone."""
    by_key = {(r["configuration"], r["xla"]): r["step_time_s"] for r in results}
    out = {}
    for xla in sorted({r["xla"] for r in results if r["xla"] is not None}):
        full = by_key.get((FULL_METHOD, xla))
        if full is None:
            continue
        key = "xla" if xla else "no_xla"
        out[key] = {
            f"{FULL_METHOD}/{reference}": full / by_key[(reference, xla)]
            for reference in ("baseline", "backbone")
            if (reference, xla) in by_key
        }
    return out


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"{meta['arch']}, width multiplier {meta['width_multiplier']}, batch "
        f"{meta['batch_size']}, {meta['image_size']}x{meta['image_size']} images, "
        f"{meta['num_classes']} classes, mixed precision {meta['mixed_precision']}; "
        f"median of {meta['steps']} x {meta['rounds']} timed steps after "
        f"{meta['warmup']} warm-up steps.",
        "",
        "| configuration | XLA | step time (ms) | images/s | peak memory (MB) "
        "| vs baseline | vs backbone |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(r["configuration"], r["xla"]): r for r in report["results"]}
    for r in report["results"]:
        relative = []
        for reference in ("baseline", "backbone"):
            ref = by_key.get((reference, r["xla"]))
            relative.append(
                f"{r['step_time_s'] / ref['step_time_s']:.3f}x"
                if ref and r["xla"] is not None else "")
        xla = {None: "n/a", False: "off", True: "on"}[r["xla"]]
        memory = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"| {r['configuration']} | {xla} | {1000 * r['step_time_s']:.1f} "
            f"| {r['images_per_s']:.1f} | {memory} | {relative[0]} | {relative[1]} |"
        )
    for key, values in report["ratios"].items():
        text = ", ".join(f"{name} = {value:.3f}" for name, value in values.items())
        lines.append(f"\n{'XLA' if key == 'xla' else 'Without XLA'}: {text}.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="round-robin passes over the configurations")
    parser.add_argument("--xla", default="none", choices=tuple(XLA_MODES))
    parser.add_argument(
        "--combinations", default="all",
        help="comma-separated subset of: " + ", ".join(CONFIGURATIONS),
    )
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_train_examples", type=int, default=50_000,
                        help="rows of the PS-KD table")
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--mixed_precision", default="none", choices=PRECISIONS)
    parser.add_argument("--dataset", default=None,
                        help="dataset string for the pipeline timing "
                             "(default: synthetic CIFAR-shaped images)")
    parser.add_argument("--out_json", default=None)
    parser.add_argument("--out_md", default=None)
    args = parser.parse_args(argv)
    args.combinations = (
        list(CONFIGURATIONS) if args.combinations == "all"
        else [c.strip() for c in args.combinations.split(",") if c.strip()]
    )
    unknown = sorted(set(args.combinations) - set(CONFIGURATIONS))
    if unknown:
        parser.error(f"--combinations: unknown {unknown}; allowed: {', '.join(CONFIGURATIONS)}")
    for name in ("batch_size", "steps", "warmup", "rounds"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name}: got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_mixed_precision(args.mixed_precision)
    models = [c for c in args.combinations if c != "pipeline"]
    measurements = benchmark_models(args, models) if models else []
    if "pipeline" in args.combinations:
        measurements.append(benchmark_pipeline(args))
    results = [m.summary(args.batch_size) for m in measurements]
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
            "machine": f"{os.cpu_count()} CPU cores, "
                       f"{len(tf.config.list_physical_devices('GPU'))} GPUs",
            **{k: v for k, v in vars(args).items() if k not in ("out_json", "out_md")},
        },
        "results": results,
        "ratios": ratios(results),
    }
    text = markdown(report)
    print(text)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=2)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(text)
    return report


if __name__ == "__main__":
    main()
