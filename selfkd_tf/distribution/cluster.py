"""One worker of a multi-worker run: its cluster, its role and where it writes.

Every worker of a `tf.distribute.MultiWorkerMirroredStrategy` run executes the
same program; ``TF_CONFIG`` (a JSON environment variable) tells each one the
cluster and which task it is. The *chief* (the ``chief`` task, or worker 0
when there is none) writes the results; the other workers must still run
every step that reads distributed variables, saving included, because those
reads are collective operations. TensorFlow's multi-worker guide therefore
has them write into throw-away folders (`worker_directory`).

Example:

```python
read_tf_config()  # {"cluster": {"worker": [...]}, "task": {...}}, or None
strategy = selfkd_tf.distribution.strategy.make_strategy("multiworker")
check_workers_agree(strategy, {"lr": 0.1}, Position(epoch=3, step=0))
out = worker_directory("runs/a", strategy)  # "runs/a" on the chief
```
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import weakref
import zlib

import tensorflow as tf

TF_CONFIG = "TF_CONFIG"
JOBS = ("chief", "worker")
"""The task types of a MultiWorkerMirroredStrategy cluster."""

_KEYS = ("cluster", "task", "rpc_layer", "environment")


def _fail(problem: str):
    raise ValueError(f"{TF_CONFIG}: {problem}")


def _check_address(job: str, index: int, address) -> None:
    host, colon, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not (host and colon and port.isdigit() and 0 < int(port) < 65536):
        _fail(f"cluster.{job}[{index}] is {address!r}; allowed: 'host:port' "
              "with a port in 1..65535")


def parse_tf_config(text: str) -> dict:
    """Checks a ``TF_CONFIG`` value for a MultiWorkerMirroredStrategy cluster.

    Args:
        text: the JSON text, e.g. ``'{"cluster": {"worker": ["h1:2222",
            "h2:2222"]}, "task": {"type": "worker", "index": 0}}'``.

    Returns:
        The parsed dict.

    Raises:
        ValueError: one line starting ``"TF_CONFIG: "`` that names the first
            problem: not JSON, an unknown key, a job other than ``chief`` and
            ``worker`` (no parameter servers or evaluators), an empty job, an
            address that is not ``host:port``, an address listed twice, more
            than one chief, or a task that is not in the cluster.

    Example:

    >>> parse_tf_config('{"cluster": {"worker": ["localhost:2222"]}, '
    ...                 '"task": {"type": "worker", "index": 0}}')["task"]
    {'type': 'worker', 'index': 0}
    """
    try:
        config = json.loads(text)
    except ValueError as error:
        _fail(f"not valid JSON ({error})")
    if not isinstance(config, dict):
        _fail(f"must be a JSON object; got {type(config).__name__}")
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        _fail(f"unknown keys {unknown}; allowed: {', '.join(_KEYS)}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        _fail("'cluster' must map job names to lists of 'host:port' addresses")
    jobs = sorted(set(cluster) - set(JOBS))
    if jobs:
        _fail(f"jobs {jobs} are not supported; allowed: {', '.join(JOBS)}")
    addresses = []
    for job, members in cluster.items():
        if not isinstance(members, list) or not members:
            _fail(f"cluster.{job} must be a non-empty list of 'host:port' addresses")
        for index, address in enumerate(members):
            _check_address(job, index, address)
        addresses += members
    if len(cluster.get("chief", [])) > 1:
        _fail(f"cluster.chief lists {len(cluster['chief'])} tasks; allowed: 1")
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        _fail(f"addresses listed more than once: {', '.join(repeated)}")
    if not isinstance(task, dict) or set(task) != {"type", "index"}:
        _fail("'task' must be {\"type\": <job>, \"index\": <int>}")
    kind, index = task["type"], task["index"]
    if not isinstance(kind, str) or kind not in cluster:
        _fail(f"task.type is {kind!r}, not a job of the cluster ({', '.join(cluster)})")
    if isinstance(index, bool) or not isinstance(index, int) or not (
            0 <= index < len(cluster[kind])):
        _fail(f"task.index is {index!r}; allowed: 0..{len(cluster[kind]) - 1} "
              f"for the {len(cluster[kind])} {kind} tasks")
    for key in ("rpc_layer", "environment"):
        if key in config and not isinstance(config[key], str):
            _fail(f"{key} must be a string; got {config[key]!r}")
    return config


def local_addresses(count: int) -> list[str]:
    """``count`` free ``127.0.0.1:port`` addresses, for workers on this machine.

    The ports are free when this returns; another process may still take one
    before the worker starts, so use them at once (tests, trials on one host).

    Example:

    >>> cluster = local_addresses(2)  # e.g. ['127.0.0.1:40513', '127.0.0.1:35177']
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


def read_tf_config() -> dict | None:
    """The checked ``TF_CONFIG`` of this process (`parse_tf_config`), or None if unset."""
    text = os.environ.get(TF_CONFIG)
    return None if text is None else parse_tf_config(text)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's results (always, outside a cluster)."""
    return strategy.extended.should_checkpoint


def worker_directory(run_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker writes the files of the run in ``run_dir``.

    The chief writes into ``run_dir``. Any other worker gets a new empty
    folder in the system's temporary directory (``$TMPDIR``), removed when
    ``strategy`` is garbage-collected or the process exits, so the collective
    saves it takes part in leave nothing behind (a killed worker's folder
    stays until the system clears its temporary files).

    Example:

    >>> worker_directory("runs/a", tf.distribute.get_strategy())
    'runs/a'
    """
    if is_chief(strategy):
        return run_dir
    resolver = strategy.cluster_resolver
    path = tempfile.mkdtemp(prefix=f"selfkd-{resolver.task_type}{resolver.task_id}-")
    weakref.finalize(strategy, shutil.rmtree, path, ignore_errors=True)
    return path


def _fingerprint(value) -> int:
    """A 32-bit checksum of a JSON-serialisable value (key order ignored)."""
    return zlib.crc32(json.dumps(value, sort_keys=True).encode())


def check_workers_agree(strategy: tf.distribute.Strategy, settings: dict, position) -> None:
    """Raises unless every worker starts the same run at the same position.

    Workers started with different settings, or from different checkpoints
    (a worker that cannot see the chief's run directory starts afresh),
    would run different collective operations: they would hang or train
    something other than asked. One all-gather compares them before anything
    is built; every worker raises the same error.

    Args:
        strategy: the run's strategy; nothing is checked outside multi-worker
            mode (`selfkd_tf.distribution.multiworker.in_multi_worker_mode`).
        settings: the JSON form of the settings that must agree.
        position: where this worker resumes, with ``epoch`` and ``step``
            (a `selfkd_tf.experiment.checkpointing.Position`).

    Raises:
        ValueError: one line saying what differs from the chief's.

    Example:

    >>> from selfkd_tf.experiment.checkpointing import Position
    >>> check_workers_agree(tf.distribute.get_strategy(), {"lr": 0.1}, Position(3, 0))
    """
    # Imported here: selfkd_tf.distillation.model needs multiworker while it imports.
    from selfkd_tf.distribution.multiworker import in_multi_worker_mode

    if not in_multi_worker_mode(strategy):
        return
    local = tf.constant([[_fingerprint(settings), position.epoch, position.step]], tf.int64)

    @tf.function  # strategy.run outside a function is slow and says so
    def gather():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_gather(
            tf.identity(local), axis=0))

    # Replicas are gathered in worker order, so row 0 is the chief's.
    rows = strategy.experimental_local_results(gather())[0].numpy()
    if (rows[:, 0] != rows[0, 0]).any():
        raise ValueError(
            "the workers were started with different settings; run the same "
            "command (the same flags and --dataset) on every worker")
    differs = (rows[:, 1:] != rows[0, 1:]).any(axis=1)
    if differs.any():
        (epoch, step), (other_epoch, other_step) = rows[0, 1:], rows[differs][0, 1:]
        raise ValueError(
            f"the chief resumes after {epoch} epochs and {step} steps, another worker "
            f"after {other_epoch} epochs and {other_step} steps; every worker must "
            "see the chief's --model_dir (a filesystem they share)")


LOST_WORKER_EXIT = 75
"""Exit status of ``selfkd-train`` when the cluster lost a worker: ``EX_TEMPFAIL``
(sysexits.h), a failure that rerunning every worker resolves."""

WORKER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                   tf.errors.AbortedError, tf.errors.CancelledError)
"""What a collective operation raises when a peer died, stopped responding or
ran past the collective timeout."""

_TASK = re.compile(r"/job:\w+/replica:\d+/task:\d+")
_CAUSE = re.compile(r"aborted by: ([^\n]+)")


def describe_worker_failure(error: tf.errors.OpError) -> str:
    """One line for a collective that failed because a worker was lost.

    Args:
        error: one of `WORKER_FAILURES`.

    Returns:
        E.g. ``"lost contact with /job:worker/replica:0/task:1 (Connection
        reset by peer); rerun every worker with the same command to resume
        from the last checkpoint"``.
    """
    message = error.message or ""
    task = _TASK.search(message)
    cause = _CAUSE.search(message)
    peer = task.group(0) if task else "a worker of the cluster"
    reason = cause.group(1).strip() if cause else type(error).__name__
    return (f"lost contact with {peer} ({reason}); rerun every worker with the "
            "same command to resume from the last checkpoint")
