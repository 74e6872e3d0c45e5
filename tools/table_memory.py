r"""Memory of the PS-KD table on one machine with several replicas.

Builds a `SelfKDModel` (a narrow ResNet-18, so the table dominates) under a
`tf.distribute.MirroredStrategy` of ``--replicas`` logical CPU devices and
reports the resident memory the model and one training step add, with the
table's size in bytes
and the number of copies the strategy holds of it and of a weight. Each
replica count runs in a process of its own (logical devices are fixed
when TensorFlow starts).

    python tools/table_memory.py --replicas=1,2,4 --num_examples=200000 \
        --num_classes=1000 --out_json=table_memory.json
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


def main(argv: list[str]) -> int:
    del argv
    if FLAGS.child is not None:
        print(json.dumps(_measure(FLAGS.child)))
        return 0
    tool_io.check_output_file("out_json", FLAGS.out_json)
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
