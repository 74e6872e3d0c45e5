"""Clusters of worker processes on 127.0.0.1 for the multi-worker tests.

Each worker is a subprocess with its own ``TF_CONFIG``; every wait is
bounded, and a child that overruns it is killed with the others.
"""

import fcntl
import json
import os
import pathlib
import signal
import subprocess
import time

import pytest
import tensorflow as tf

CHILD_TIMEOUT_S = 300


def tf_config(cluster: list[str], index: int) -> dict[str, str]:
    """The environment that makes a process worker ``index`` of ``cluster``."""
    return {"TF_CONFIG": json.dumps({
        "cluster": {"worker": cluster}, "task": {"type": "worker", "index": index},
    })}


def wait_all(processes: list[subprocess.Popen], timeout: float = CHILD_TIMEOUT_S) -> list[str]:
    """Every child's output (stdout and stderr merged); kills all on overrun."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(
                timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.communicate()
        pytest.fail(f"a child process ran longer than {timeout} s")
    return outputs


def run_once(tmp_path_factory, name: str, produce) -> pathlib.Path:
    """``produce(folder)`` run once per test session, also under pytest-xdist.

    Each pytest-xdist worker sets up session fixtures on its own; the
    session's shared folder and a lock let the first one produce the result
    and the others read it. Returns the folder.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            produce(folder)
            (folder / "done").touch()
    return folder


def latest_checkpoint_number(checkpoint_dir) -> int | None:
    path = tf.train.latest_checkpoint(str(checkpoint_dir))
    return None if path is None else int(path.rsplit("-", 1)[1])


def kill_at_checkpoint(victim: subprocess.Popen, checkpoint_dir, wanted,
                       timeout: float = CHILD_TIMEOUT_S) -> int:
    """SIGKILLs ``victim`` once its latest checkpoint number satisfies ``wanted``.

    Once a candidate shows up the victim is frozen (SIGSTOP) and the number
    read again, so the checkpoint reported is the last one it wrote.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert victim.poll() is None, "the worker ended before it could be killed"
        if wanted(latest_checkpoint_number(checkpoint_dir)):
            victim.send_signal(signal.SIGSTOP)
            number = latest_checkpoint_number(checkpoint_dir)
            if wanted(number):
                victim.kill()
                victim.wait()
                return number
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    victim.kill()
    raise AssertionError("the wanted checkpoint never appeared")
