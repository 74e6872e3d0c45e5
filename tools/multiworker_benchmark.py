"""Times a training step of 2 local workers against 1 process at the same global batch.

The same `SelfKDModel` configuration as ``tools/benchmark.py`` (built by
``tools/step_timing.py``'s `build_model`, fed its fixed synthetic batches)
trains in one process with TensorFlow's default strategy, and in two
processes on this host that form a `tf.distribute.MultiWorkerMirroredStrategy`
cluster on 127.0.0.1; each worker reads its half of every global batch. Each
run warms up, then times single steps of `model.fit` (the chief's steps for
the cluster). With ``--rounds`` above 1 the two set-ups alternate, so a
change of the machine's load affects both alike. Reported: the median step
time of each and their ratio (2 workers / 1 process); ``--out_json`` is
written once every run has finished, whole.

On one host the two workers share its cores, so the ratio measures what
splitting one machine's work between two processes costs (gRPC collectives,
the replicas' synchronization, two input pipelines), not a speed-up; across
hosts each worker brings its own cores.

Example:

    python tools/multiworker_benchmark.py --arch resnet18 --width_multiplier 0.25 \\
        --batch_size 128 --steps 10 --warmup 3 --rounds 2 --out_json mw.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

import tool_io  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import step_timing  # noqa: E402
from selfkd_tf.distribution import cluster  # noqa: E402
from selfkd_tf.distribution.strategy import make_strategy  # noqa: E402

PROGRAM = "multiworker_benchmark.py"
CHILD_TIMEOUT_S = 3600
ROLES = ("single", "worker")

flags.DEFINE_enum("combination", step_timing.FULL_METHOD, step_timing.METHOD_COMBINATIONS,
                  "The method combination timed.")
step_timing.define_flags(width_multiplier=0.25,
                         batch_size_help="Global batch size, split between the workers.")
flags.DEFINE_integer("steps", 10, "Timed steps per run.", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed steps first.", lower_bound=0)
flags.DEFINE_integer("rounds", 2, "Runs of each set-up, alternating.", lower_bound=1)
flags.DEFINE_string("out_json", None, "Write the report (every step time, the medians, "
                    "their ratio) to this JSON file.")
flags.DEFINE_enum("role", None, ROLES, "Set by the tool for its child processes: train "
                  "in this process (single: default strategy; worker: one worker of "
                  "TF_CONFIG's cluster) and print the step times as JSON.")
flags.adopt_module_key_flags(step_timing)  # --help lists them
FLAGS = flags.FLAGS

# What a child process is told: the configuration and the timing of one run.
_CHILD_FLAGS = ("combination", "arch", "width_multiplier", "batch_size", "image_size",
                "num_classes", "num_train_examples", "weight_decay", "steps", "warmup")


def child() -> None:
    """Trains in this process (``--role``) and prints the step times as JSON."""
    strategy = make_strategy("multiworker" if FLAGS.role == "worker" else "none")
    with strategy.scope():
        model = step_timing.build_model(FLAGS.combination, False, FLAGS)
    data = step_timing.synthetic_batches(FLAGS)
    step_timing.time_steps(model, data, FLAGS.warmup)
    print(json.dumps({"step_times_s": step_timing.time_steps(model, data, FLAGS.steps)}))


def _run(role: str, workers: int) -> list[float]:
    """The step times of one run: one process, or the chief of ``workers``.

    Raises:
        ToolError: a process of the run failed.
    """
    addresses = cluster.local_addresses(workers)
    child_argv = [f"--{name}={FLAGS[name].value}" for name in _CHILD_FLAGS]
    processes = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if role == "worker":
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, __file__, f"--role={role}", *child_argv],
            env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=CHILD_TIMEOUT_S)[0] for p in processes]
    if any(p.returncode for p in processes):
        raise program.CommandError(
            f"a {role} run failed: exit {[p.returncode for p in processes]}")
    return json.loads(outputs[0].strip().splitlines()[-1])["step_times_s"]


def main(argv: list[str]) -> int:
    del argv  # tool_io.run rejects positional arguments
    if FLAGS.role:
        child()
        return 0
    tool_io.check_output_file("out_json", FLAGS.out_json)
    step_timing.build_network(FLAGS)  # refuses flags the network cannot take, at once
    times = {"1 process": [], "2 workers": []}
    for _ in range(FLAGS.rounds):
        times["1 process"] += _run("single", 1)
        times["2 workers"] += _run("worker", 2)
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "python": platform.python_version(), "cpu_cores": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "step_times_s": times, "median_step_s": medians,
        "ratio_2_workers_over_1_process": medians["2 workers"] / medians["1 process"],
    }
    print("| set-up | median step (ms) | images/s | steps timed |\n| --- | ---: | ---: | ---: |")
    for name, median in medians.items():
        print(f"| {name} | {1000 * median:.1f} | {FLAGS.batch_size / median:.1f} | "
              f"{len(times[name])} |")
    print(f"\n2 workers / 1 process: {report['ratio_2_workers_over_1_process']:.3f}")
    if FLAGS.out_json:
        tool_io.write_json(FLAGS.out_json, report)
    return 0


if __name__ == "__main__":
    program.run(main, PROGRAM)
