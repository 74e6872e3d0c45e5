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
the input pipeline, which is timed on its own (`tools/step_timing.py` builds
and times the models). With ``--rounds`` above 1 the configurations are
timed round-robin, ``--steps`` steps each per round, so a change of the
machine's load during the run affects all of them alike.
Reported per configuration: the median step time, images/s, and the peak
memory (on GPU TensorFlow's peak allocation; on CPU the peak resident set
size of the process during the configuration's first run minus the size
before it was built). ``--out_json`` and ``--out_md`` are written once every
configuration is timed, whole.

Example:

    python tools/benchmark.py --arch resnet18 --width_multiplier 0.25 \\
        --batch_size 128 --steps 5 --warmup 2 --xla both \\
        --out_json bench.json --out_md bench.md
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

import tool_io  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import step_timing  # noqa: E402
from selfkd_tf.data import make_datasets  # noqa: E402
from selfkd_tf.distribution.strategy import PRECISIONS, set_mixed_precision  # noqa: E402
from selfkd_tf.experiment.settings import as_settings_error  # noqa: E402
from selfkd_tf.errors import SettingsError  # noqa: E402
from step_timing import (  # noqa: E402
    FULL_METHOD, METHOD_COMBINATIONS, build_model, synthetic_batches, time_steps)

PROGRAM = "benchmark.py"
CONFIGURATIONS = METHOD_COMBINATIONS + ("backbone", "pipeline")
XLA_MODES = {"none": (False,), "on": (True,), "both": (False, True)}
_SYNTHETIC_PIPELINE_IMAGES = 10_000

step_timing.define_flags(width_multiplier=1.0, batch_size_help="Training batch size.")
flags.DEFINE_integer("steps", 5, "Timed steps per round.", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed steps first.", lower_bound=0)
flags.DEFINE_integer("rounds", 1, "Round-robin passes over the configurations.",
                     lower_bound=1)
flags.DEFINE_enum("xla", "none", list(XLA_MODES),
                  "Compile the train step with XLA: none, on, or both (every "
                  "configuration timed without and with).")
flags.DEFINE_list(
    "combinations", ["all"], "The configurations timed, comma-separated, from: "
    f"{', '.join(CONFIGURATIONS)}; or all.")
flags.DEFINE_enum("mixed_precision", "none", PRECISIONS, "Mixed-precision policy.")
flags.DEFINE_string(
    "dataset", None, "Dataset string for the pipeline timing (as selfkd-train "
    "--dataset); default: synthetic CIFAR-shaped images.")
flags.DEFINE_string("out_json", None, "Write the report (settings, every step time, "
                    "ratios) to this JSON file.")
flags.DEFINE_string("out_md", None, "Write the report's table to this Markdown file.")
flags.adopt_module_key_flags(step_timing)  # --help lists them
FLAGS = flags.FLAGS

# The settings recorded in the report, in the order of --help.
_SETTINGS = ("arch", "width_multiplier", "batch_size", "steps", "warmup", "rounds",
             "xla", "combinations", "num_classes", "image_size", "num_train_examples",
             "weight_decay", "mixed_precision", "dataset")


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
            with as_settings_error():  # e.g. --dataset's files do not decode
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



def configurations(names: list[str]) -> list[str]:
    """The configurations ``--combinations`` names, in its order.

    Raises:
        SettingsError: a name is unknown or repeated, or there is none.
    """
    names = [name for name in names if name]
    if names == ["all"]:
        return list(CONFIGURATIONS)
    if "all" in names:
        raise SettingsError("combinations", "all names every configuration; give it alone")
    unknown = [name for name in names if name not in CONFIGURATIONS]
    if unknown:
        raise SettingsError("combinations", f"unknown {unknown}; allowed: all, or "
                            f"a comma-separated subset of {', '.join(CONFIGURATIONS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SettingsError("combinations", f"{', '.join(repeated)} named twice")
    if not names:
        raise SettingsError("combinations", "empty; name configurations, or all")
    return names


def check_outputs() -> None:
    """Refuses ``--out_json`` and ``--out_md`` unless both can be written, apart."""
    for flag in ("out_json", "out_md"):
        tool_io.check_output_file(flag, FLAGS[flag].value)
    if (FLAGS.out_json and FLAGS.out_md
            and os.path.realpath(FLAGS.out_json) == os.path.realpath(FLAGS.out_md)):
        raise SettingsError("out_md", f"{FLAGS.out_md} is --out_json too; give two files")


def main(argv: list[str]) -> int:
    del argv  # tool_io.run rejects positional arguments
    timed = configurations(FLAGS.combinations)
    if FLAGS.dataset is not None:
        if "pipeline" not in timed:
            raise SettingsError("dataset", "only the pipeline configuration reads it; "
                                "add pipeline to --combinations")
        tool_io.check_dataset("dataset", FLAGS.dataset)
    check_outputs()
    set_mixed_precision(FLAGS.mixed_precision)
    models = [c for c in timed if c != "pipeline"]
    measurements = benchmark_models(FLAGS, models) if models else []
    if "pipeline" in timed:
        measurements.append(benchmark_pipeline(FLAGS))
    results = [m.summary(FLAGS.batch_size) for m in measurements]
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
            "machine": f"{os.cpu_count()} CPU cores, "
                       f"{len(tf.config.list_physical_devices('GPU'))} GPUs",
            **{name: FLAGS[name].value for name in _SETTINGS},
            "combinations": timed,
        },
        "results": results,
        "ratios": ratios(results),
    }
    text = markdown(report)
    print(text)
    if FLAGS.out_json:
        tool_io.write_json(FLAGS.out_json, report)
    if FLAGS.out_md:
        tool_io.write_text(FLAGS.out_md, text)
    return 0


if __name__ == "__main__":
    program.run(main, PROGRAM)
