"""One writer per run directory: a second trainer is refused, a killed one leaves no lock."""

import csv
import errno
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from selfkd_tf.rundir import lock as run_lock
from selfkd_tf.experiment.trained import reading_run
from selfkd_tf.rundir.lock import LOCK_FILE, LockError, RunDirectoryBusy, locked
from selfkd_tf.errors import SettingsError
from support import (
    CHILD_TIMEOUT_S,
    CONFIGS,
    REPO,
    command,
    environment,
    last_line,
    latest_checkpoint_number,
    run_cli,
    snapshot,
    write_learnable_npz,
)


def _pause_mid_training(trainer: subprocess.Popen, checkpoint_dir) -> int:
    """Freezes ``trainer`` (SIGSTOP) once it has written a checkpoint after
    its first step; returns that checkpoint's number."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        assert trainer.poll() is None, "training ended before it could be paused"
        number = latest_checkpoint_number(checkpoint_dir)
        if number:
            trainer.send_signal(signal.SIGSTOP)
            return number
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_a_second_trainer_is_refused_and_a_rerun_resumes_after_kill_9(tmp_path):
    dataset = write_learnable_npz(tmp_path / "data.npz", size=8)
    run_dir = tmp_path / "run"
    args = ["selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
            f"--dataset={dataset}", f"--model_dir={run_dir}", "--image_size=8",
            "--epochs=2", "--batch_size=16", "--save_every_steps=1"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command(*args), cwd=REPO, env=environment(),
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        _pause_mid_training(first, run_dir / "checkpoints")
        busy = (f"{run_dir} is being trained by another process (pid {first.pid}); "
                "wait for it or stop it")
        before = snapshot(run_dir)

        second = run_cli(*args)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip() == f"selfkd-train: error: {busy}"
        assert "Traceback" not in second.stderr
        assert snapshot(run_dir) == before
        # Evaluating the run while it trains is refused the same way.
        evaluation = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}")
        assert evaluation.returncode == 2
        assert last_line(evaluation.stderr) == f"selfkd-eval: error: {busy}"
        assert snapshot(run_dir) == before
    finally:
        first.kill()  # SIGKILL, also while it is stopped
        first.wait()

    # The kernel released the killed trainer's lock: the rerun resumes.
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming {run_dir} at epoch" in rerun.stdout
    with open(run_dir / "history.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    assert not (run_dir / LOCK_FILE).exists()


def test_a_writer_excludes_everyone_and_readers_only_writers(tmp_path):
    # flock locks belong to open files, so one process shows the conflicts.
    (tmp_path / "run").mkdir()
    run_dir = str(tmp_path / "run")
    with locked(run_dir, activity="trained"):
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record == {"pid": os.getpid(), "host": socket.gethostname(),
                          "activity": "trained"}
        for shared in (False, True):
            with pytest.raises(RunDirectoryBusy) as busy:
                with locked(run_dir, shared=shared):
                    pass
            assert str(busy.value) == (f"{run_dir} is being trained by another process "
                                       f"(pid {os.getpid()}); wait for it or stop it")
    with locked(run_dir, shared=True), locked(run_dir, shared=True):
        with pytest.raises(RunDirectoryBusy, match="is being read by another process"):
            with locked(run_dir, activity="tuned"):
                pass
    # The last holder removes the file.
    assert os.listdir(run_dir) == []


def test_a_refused_or_empty_run_leaves_no_directory(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    with locked(str(run_dir)):
        assert run_dir.is_dir()
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="invalid"):
        with locked(str(run_dir)):
            raise ValueError("invalid settings")
    assert not (tmp_path / "runs").exists()


def test_a_lock_file_left_by_a_killed_holder_is_taken_again(tmp_path):
    # As a trainer killed with -9 leaves it: its record, no lock.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text('{"pid": 1, "host": "gone", "activity": "trained"}\n')
    with locked(str(run_dir), activity="tuned"):
        record = json.loads((run_dir / LOCK_FILE).read_text())
        assert (record["pid"], record["activity"]) == (os.getpid(), "tuned")
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "directory"])
def test_a_lock_file_that_is_not_one_is_refused_not_written_through(tmp_path, plant):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock_path = run_dir / LOCK_FILE
    if plant == "symlink":
        lock_path.symlink_to(victim)
    elif plant == "hardlink":
        os.link(victim, lock_path)
    else:
        lock_path.mkdir()
    with pytest.raises(LockError, match=f"cannot write {lock_path}") as error:
        with locked(str(run_dir)):
            pass
    assert not isinstance(error.value, RunDirectoryBusy)
    assert "\n" not in str(error.value)
    assert victim.read_text() == "precious\n"


def test_a_filesystem_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch, capsys):
    # What flock answers on NFS mounted with nolock.
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    run_dir = tmp_path / "run"
    with locked(str(run_dir)):
        (run_dir / "flags.json").write_text("{}")
    assert last_line(capsys.readouterr().err) == (
        f"warning: cannot lock {run_dir} (No locks available); nothing stops "
        "another process from using it at the same time")
    assert os.listdir(run_dir) == ["flags.json"]


def test_evaluation_reads_a_run_beside_other_readers_but_not_while_it_trains(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "flags.json").write_text("{}")
    (run_dir / "model.keras").write_bytes(b"")
    with reading_run(str(run_dir)), reading_run(str(run_dir / "model.keras")):
        pass
    with locked(str(run_dir), activity="trained"):
        with pytest.raises(SettingsError, match="is being trained by another process") as error:
            with reading_run(str(run_dir)):
                pass
    assert error.value.flag is None
    # A lone model file has no run to lock.
    (tmp_path / "lone.keras").write_bytes(b"")
    with locked(str(tmp_path), activity="trained"):
        with reading_run(str(tmp_path / "lone.keras")):
            pass
    assert sorted(os.listdir(run_dir)) == ["flags.json", "model.keras"]
