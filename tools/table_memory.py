r"""Memory of the PS-KD table on one machine with several replicas, and its cost per step.

Builds a `SelfKDModel` (a narrow ResNet-18, so the table dominates) under a
`tf.distribute.MirroredStrategy` of ``--replicas`` logical CPU devices and
reports the resident memory the model and one training step add, with the
table's size in bytes
and the number of copies the strategy holds of it and of a weight. Each
replica count runs in a process of its own (logical devices are fixed
when TensorFlow starts).

    python tools/table_memory.py --replicas=1,2,4 --num_examples=200000 \
        --num_classes=1000 --out_json=table_memory.json

With ``--time_steps=S`` it times the table's work in a training step
instead, on one replica: reading the teacher rows of a batch of
``--batch_size`` random samples (a gather, completed to ``C`` classes with
top-k) and writing the batch's predictions (top-k selection, scatter),
median of ``S`` steps after 3 untimed ones, and the once-per-epoch refresh
(the staged rows moved into the teacher), median of 3 after an untimed one.

    python tools/table_memory.py --time_steps=50 --batch_size=256 \
        --num_examples=1281167 --num_classes=1000 --table_top_k=10
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

import tool_io  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402

flags.DEFINE_list("replicas", ["1", "2", "4"], "Replica counts (logical CPU devices).")
flags.DEFINE_integer("num_examples", 200_000, "Rows of the table.", lower_bound=1)
flags.DEFINE_integer("num_classes", 1000, "Classes.", lower_bound=2)
flags.DEFINE_integer("table_top_k", None, "Keep the K largest probabilities.", lower_bound=1)
flags.DEFINE_string("out_json", None, "Where the report goes.")
flags.DEFINE_integer("time_steps", 0, "Time the table's gather and scatter over this "
                     "many steps instead of measuring memory.", lower_bound=0)
flags.DEFINE_integer("batch_size", 256, "Samples per timed step.", lower_bound=1)
flags.DEFINE_integer("child", None, "Internal: measure with this many replicas.")
FLAGS = flags.FLAGS


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(replicas: int) -> dict:
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    import selfkd_tf as skd

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    before = _resident_mb()
    with strategy.scope():
        backbone = skd.build_multi_exit_resnet(
            "resnet18", FLAGS.num_classes, input_shape=(8, 8, 3), num_stages=2,
            width_multiplier=0.0625)
        model = skd.SelfKDModel(backbone, num_train_examples=FLAGS.num_examples,
                                config=skd.SelfKDConfig(methods=("pskd",)),
                                **({"table_top_k": FLAGS.table_top_k}
                                   if FLAGS.table_top_k else {}))
    table = [v for v in model.non_trainable_weights
             if v.path.split("/")[-1].startswith(("soft_target", "staged"))]
    # Copies of a variable share their first value's buffer until written
    # apart: one training step writes its rows as training does.
    with strategy.scope():
        model.compile(optimizer="sgd")
    batch = 2 * replicas
    images = np.zeros((batch, 8, 8, 3), "float32")
    model.fit({"image": images, "index": np.arange(batch)}, np.zeros(batch, "int32"),
              batch_size=batch, epochs=1, verbose=0)
    after = _resident_mb()
    copies = lambda v: len(strategy.experimental_local_results(v.value))  # noqa: E731
    return {
        "replicas": replicas,
        "table_bytes": int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in table)),
        "table_copies": copies(table[0]),
        "weight_copies": copies(model.backbone.trainable_weights[0]),
        "resident_mb_added": round(after - before, 1),
    }


def _time_table() -> dict:
    """Median times of the table's per-step work and of one refresh, in ms."""
    import statistics
    import time

    import keras
    import tensorflow as tf

    from selfkd_tf.distillation.pskd import SoftTargetTable

    n, c, b = FLAGS.num_examples, FLAGS.num_classes, FLAGS.batch_size
    table = SoftTargetTable(keras.layers.Layer(), n, c, top_k=FLAGS.table_top_k)
    draws = tf.random.Generator.from_seed(0)

    @tf.function
    def step(index, logits):
        probs, valid = table.teacher(index)
        table.stage(index, tf.nn.softmax(logits))
        return tf.reduce_sum(probs) + tf.reduce_sum(valid)

    @tf.function
    def refresh():
        table.refresh()
        return table.teacher_valid.value[0]

    def timed(function, *args):
        start = time.perf_counter()
        function(*args).numpy()  # waits for the result
        return (time.perf_counter() - start) * 1000

    times = []
    for number in range(FLAGS.time_steps + 3):
        index = draws.uniform([b], maxval=n, dtype=tf.int32)
        logits = draws.normal([b, c])
        elapsed = timed(step, index, logits)
        if number >= 3:
            times.append(elapsed)
    timed(refresh)
    refreshes = [timed(refresh) for _ in range(3)]
    return {"num_examples": n, "num_classes": c, "table_top_k": FLAGS.table_top_k,
            "batch_size": b, "step_ms": round(statistics.median(times), 3),
            "refresh_ms": round(statistics.median(refreshes), 1)}


def main(argv: list[str]) -> int:
    del argv
    if FLAGS.child is not None:
        print(json.dumps(_measure(FLAGS.child)))
        return 0
    tool_io.check_output_file("out_json", FLAGS.out_json)
    if FLAGS.time_steps:
        report = _time_table()
        print(report)
        if FLAGS.out_json:
            tool_io.write_json(FLAGS.out_json, report)
        return 0
    rows = []
    for replicas in FLAGS.replicas:
        args = [sys.executable, __file__, f"--child={int(replicas)}",
                f"--num_examples={FLAGS.num_examples}", f"--num_classes={FLAGS.num_classes}"]
        if FLAGS.table_top_k:
            args.append(f"--table_top_k={FLAGS.table_top_k}")
        child = subprocess.run(args, capture_output=True, text=True)
        if child.returncode:
            raise program.CommandError(
                f"{replicas} replicas: {(child.stderr.strip().splitlines() or ['?'])[-1]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    if FLAGS.out_json:
        tool_io.write_json(FLAGS.out_json, {"num_examples": FLAGS.num_examples,
                                            "num_classes": FLAGS.num_classes,
                                            "table_top_k": FLAGS.table_top_k, "rows": rows})
    return 0


if __name__ == "__main__":
    program.run(main, "table_memory.py")
