"""Times a training step of 2 local workers against 1 process at the same global batch.

The same `SelfKDModel` configuration as ``tools/benchmark.py`` (built by its
`build_model`, fed its fixed synthetic batches) trains in one process with
TensorFlow's default strategy, and in two processes on this host that form
a `tf.distribute.MultiWorkerMirroredStrategy` cluster on 127.0.0.1; each
worker reads its half of every global batch. Each run warms up, then times
single steps of `model.fit` (the chief's steps for the cluster). With
``--rounds`` above 1 the two set-ups alternate, so a change of the machine's
load affects both alike. Reported: the median step time of each and their
ratio (2 workers / 1 process).

On one host the two workers share its cores, so the ratio measures what
splitting one machine's work between two processes costs (gRPC collectives,
the replicas' synchronization, two input pipelines), not a speed-up; across
hosts each worker brings its own cores.

Example:

    python tools/multiworker_benchmark.py --arch resnet18 --width_multiplier 0.25 \\
        --batch_size 128 --steps 10 --warmup 3 --rounds 2 --out_json mw.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys

import keras
import tensorflow as tf

import benchmark  # tools/benchmark.py
from selfkd_tf import cluster
from selfkd_tf.distribute import make_strategy

FULL_METHOD = benchmark.FULL_METHOD
CHILD_TIMEOUT_S = 3600


def child(args) -> None:
    """Trains in this process (``--role``) and prints the step times as JSON."""
    strategy = make_strategy("multiworker" if args.role == "worker" else "none")
    with strategy.scope():
        model = benchmark.build_model(args.combination, False, args)
    data = benchmark.synthetic_batches(args)
    benchmark.time_steps(model, data, args.warmup)
    print(json.dumps({"step_times_s": benchmark.time_steps(model, data, args.steps)}))


def _run(args, role: str, workers: int) -> list[float]:
    """The step times of one run: one process, or the chief of ``workers``."""
    addresses = cluster.local_addresses(workers)
    processes = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if role == "worker":
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, __file__, "--role", role, *args.child_argv],
            env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=CHILD_TIMEOUT_S)[0] for p in processes]
    if any(p.returncode for p in processes):
        raise RuntimeError(f"a {role} run failed: exit {[p.returncode for p in processes]}")
    return json.loads(outputs[0].strip().splitlines()[-1])["step_times_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--role", choices=("single", "worker"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--combination", default=FULL_METHOD,
                        choices=benchmark.METHOD_COMBINATIONS)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width_multiplier", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=128, help="global batch")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--num_train_examples", type=int, default=50_000,
                        help="rows of the PS-KD table")
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each set-up, alternating")
    parser.add_argument("--out_json", default=None)
    args = parser.parse_args(argv)
    args.child_argv = [
        f"--{name}={getattr(args, name)}" for name in (
            "combination", "arch", "width_multiplier", "batch_size", "image_size",
            "num_classes", "num_train_examples", "weight_decay", "steps", "warmup")]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.role:
        child(args)
        return {}
    times = {"1 process": [], "2 workers": []}
    for _ in range(args.rounds):
        times["1 process"] += _run(args, "single", 1)
        times["2 workers"] += _run(args, "worker", 2)
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
        print(f"| {name} | {1000 * median:.1f} | {args.batch_size / median:.1f} | "
              f"{len(times[name])} |")
    print(f"\n2 workers / 1 process: {report['ratio_2_workers_over_1_process']:.3f}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
