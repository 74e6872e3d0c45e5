"""tools/study.py: the run plan, and a real two-run study with parallel runs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from support import CONFIGS, REPO, environment, last_line, write_learnable_npz


def run_study(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "study.py"), *args], cwd=REPO,
        env=environment(), capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)


def test_plan_puts_the_main_comparison_first_and_extra_seeds_last(tmp_path):
    for run in ("pskd_seed3", "dmfl_seed3"):
        (tmp_path / run).mkdir()
        for split in ("test", "train"):
            (tmp_path / run / f"metrics_{split}.json").write_text(json.dumps({"split": split}))
        (tmp_path / run / "temperatures_test.json").write_text(
            json.dumps({"fitted_on": {"split": "test"}}))
    # A record cut short is no record: the run is still to score.
    (tmp_path / "dmfl_seed3" / "metrics_test.json").write_text('{"split": "te')
    # Trained but not yet scored on the whole splits: still to do.
    (tmp_path / "byot_seed3").mkdir()
    (tmp_path / "byot_seed3" / "metrics.json").write_text("{}")
    result = run_study("--dry_run", "--seed=3", "--spread_seeds=4", f"--out={tmp_path}",
                       "--dataset=npz:/data/x.npz")
    assert result.returncode == 0, result.stderr
    plan = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert list(plan) == [
        "baseline_seed3", "pskd_byot_dmfl_seed3", "byot_seed3", "dmfl_seed3",
        "pskd_seed3", "pskd_byot_seed3", "pskd_dmfl_seed3", "byot_dmfl_seed3",
        "baseline_seed4", "pskd_byot_dmfl_seed4",
    ]
    assert plan.pop("pskd_seed3") == "done, checked only"
    methods = {name: re.search(r"--methods=(\S*)", command).group(1)
               for name, command in plan.items()}
    assert methods["baseline_seed4"] == "" and methods["byot_dmfl_seed3"] == "byot,dmfl"
    assert methods["pskd_byot_dmfl_seed4"] == "pskd,byot,dmfl"
    assert "--seed=4" in plan["baseline_seed4"] and "--seed=3" in plan["dmfl_seed3"]
    assert f"--model_dir={tmp_path / 'dmfl_seed3'}" in plan["dmfl_seed3"]
    assert all("--dataset=npz:/data/x.npz" in command for command in plan.values())
    assert not (tmp_path / "baseline_seed3").exists()


def test_seed_lists_and_rows_of_a_small_data_study(tmp_path):
    result = run_study("--dry_run", "--spread_rows=baseline,pskd,byot,pskd_byot_dmfl",
                       "--spread_seeds=1,2", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    plan = [line.split(": ", 1)[0] for line in result.stdout.splitlines()]
    first = ["baseline", "byot", "pskd", "pskd_byot_dmfl"]
    assert plan == (
        [f"{row}_seed0" for row in first]
        + [f"{row}_seed0" for row in ("dmfl", "pskd_byot", "pskd_dmfl", "byot_dmfl")]
        + [f"{row}_seed{seed}" for seed in (1, 2) for row in first])
    # The controls train only when named, like any row --only names.
    controls = run_study("--dry_run", "--only=ls,ds", "--spread_rows=ds",
                         "--spread_seeds=1", f"--out={tmp_path}")
    assert controls.returncode == 0, controls.stderr
    plan = dict(line.split(": ", 1) for line in controls.stdout.splitlines())
    assert list(plan) == ["ds_seed0", "ls_seed0", "ds_seed1"]
    assert "--methods=ls " in plan["ls_seed0"] + " " and "--seed=1" in plan["ds_seed1"]


def test_bad_flags_are_one_line_with_exit_2_and_nothing_written(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = tmp_path / "out"
    cases = {
        "--spread_rows=basline": "--spread_rows: unknown rows ['basline']; allowed: baseline, ",
        "--only=nope": "--only: unknown rows ['nope']; allowed: baseline, ",
        "--spread_seeds=0": "--spread_seeds [0] repeat a seed (--seed is 0)",
        "--spread_seeds=1,1": "--spread_seeds [1, 1] repeat a seed (--seed is 0)",
        "--spread_seeds=a": "--spread_seeds: 'a' is not an integer",
        "--spread_seeds=4294967296": "--spread_seeds: 4294967296 is outside 0..4294967295",
        "--spread_seeds=-1": "--spread_seeds: -1 is outside 0..4294967295",
        "--seed=4294967296": "flag --seed=4294967296: 4294967296 is not an integer in the range",
        "--parallel=0": "flag --parallel=0: 0 is not a positive integer",
        f"--run_flagfile={tmp_path / 'missing.flags'}": (
            f"--run_flagfile: {tmp_path / 'missing.flags'}: no such file or directory"),
        f"--out={a_file}": f"--out: {a_file} is not a directory",
        f"--out={a_file / 'sub'}": f"{a_file} is not a directory",
    }
    for bad, message in cases.items():
        for extra in ([], ["--dry_run"]) if bad == "--only=nope" else ([],):
            refused = run_study(f"--out={out}", bad, *extra)
            assert refused.returncode == 2, (bad, refused.stderr)
            assert refused.stderr.count("\n") == 1, (bad, refused.stderr)
            assert refused.stderr.startswith("study.py: error: "), (bad, refused.stderr)
            assert message in refused.stderr, (bad, refused.stderr)
            assert refused.stdout == "" and not out.exists(), bad
    missing = run_study("--dry_run")
    assert missing.returncode == 2 and "--out" in last_line(missing.stderr)


def test_two_parallel_runs_then_report_and_skip_on_rerun(tmp_path):
    dataset = write_learnable_npz(tmp_path / "tiny.npz", n_train=128, n_test=96)
    out = tmp_path / "study"
    args = [f"--run_flagfile={CONFIGS / 'smoke.flags'}", f"--dataset={dataset}",
            f"--out={out}", "--only=baseline,pskd_byot_dmfl", "--spread_seeds=",
            "--parallel=2"]
    result = run_study(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, methods in (("baseline_seed0", []), ("pskd_byot_dmfl_seed0", ["pskd", "byot", "dmfl"])):
        run = out / name
        assert json.loads((run / "flags.json").read_text())["methods"] == methods
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
        assert "epoch 2/2" in (run / "train.log").read_text().lower()
        # smoke.flags evaluates on 64 test images while training; the study
        # scores the whole split and the training examples afterwards.
        scored = {split: json.loads((run / f"metrics_{split}.json").read_text())
                  for split in ("test", "train")}
        assert json.loads((run / "metrics.json").read_text())["num_examples"] == 64
        assert [(r["split"], r["num_examples"]) for r in scored.values()] == [
            ("test", 96), ("train", 128)]
    table = (out / "report" / "table1.md").read_text()
    assert "Baseline" in table and "+PS-KD+BYOT+DMFL" in table
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics*.json")}

    # Rerun: scored runs are only checked (by selfkd-train), nothing is
    # scored again but a record cut short.
    cut = out / "baseline_seed0" / "metrics_test.json"
    cut.write_text(cut.read_text()[:40])
    del stamps[cut]
    rerun = run_study(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(rerun.stdout.splitlines()[:2]) == [
        "baseline_seed0: finished", "pskd_byot_dmfl_seed0: finished"]
    assert json.loads(cut.read_text())["num_examples"] == 96
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Another recipe in the same --out is refused, not taken as done.
    changed = tmp_path / "changed.flags"
    changed.write_text(f"--flagfile={CONFIGS / 'smoke.flags'}\n--epochs=3\n")
    refused = run_study(*args, f"--run_flagfile={changed}", "--parallel=1")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    first = refused.stdout.splitlines()[0]
    assert first.startswith("baseline_seed0: FAILED (exit status 2): selfkd-train: error: "), first
    assert "(--epochs: 2 -> 3)" in first
    assert last_line(refused.stderr) == (
        "study.py: error: runs failed: baseline_seed0; not started: pskd_byot_dmfl_seed0")
    assert json.loads((out / "baseline_seed0" / "flags.json").read_text())["epochs"] == 2


def test_a_refused_run_is_named_with_its_reason_and_leaves_nothing(tmp_path):
    result = run_study(f"--run_flagfile={CONFIGS / 'smoke.flags'}",
                       f"--dataset=npz:{tmp_path / 'missing.npz'}", f"--out={tmp_path}",
                       "--only=baseline,byot", "--spread_seeds=")
    assert result.returncode == 2
    assert result.stdout.startswith("baseline_seed0: FAILED (exit status 2): selfkd-train: error: ")
    assert "missing.npz" in result.stdout.splitlines()[0]
    assert last_line(result.stderr) == (
        "study.py: error: runs failed: baseline_seed0; not started: byot_seed0")
    assert sorted(os.listdir(tmp_path)) == []


def _trainers_of(run_dir) -> list[int]:
    """Pids of the processes whose command line names ``run_dir``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"--model_dir={run_dir}".encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="lists processes in /proc")
def test_sigterm_stops_the_runs_with_one_line_and_leaves_them_resumable(tmp_path):
    dataset = write_learnable_npz(tmp_path / "tiny.npz", n_train=128)
    recipe = tmp_path / "recipe.flags"
    recipe.write_text(f"--flagfile={CONFIGS / 'smoke.flags'}\n--epochs=3\n"
                      "--batch_size=8\n--save_every_steps=1\n")
    out = tmp_path / "study"
    args = [str(REPO / "tools" / "study.py"), f"--run_flagfile={recipe}",
            f"--dataset={dataset}", f"--out={out}", "--only=pskd", "--spread_seeds="]
    study = subprocess.Popen([sys.executable, *args], cwd=REPO, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    checkpoints = out / "pskd_seed0" / "checkpoints"
    deadline = time.monotonic() + 300
    while study.poll() is None and time.monotonic() < deadline and not (
            (checkpoints / "checkpoint").exists()):  # the first checkpoint is written
        time.sleep(0.01)
    study.send_signal(signal.SIGTERM)
    stdout, stderr = study.communicate(timeout=300)
    assert study.returncode == 130, stdout + stderr
    assert stderr == ("study.py: error: interrupted; rerun the same command to resume "
                      "(each run from its last checkpoint)\n")
    assert re.fullmatch(r"pskd_seed0: stopped: selfkd-train: error: interrupted at epoch "
                        r"\d+ step \d+; rerun the same command to resume \(from the "
                        r"checkpoint at .*\)\n", stdout), stdout
    assert _trainers_of(out / "pskd_seed0") == []  # no trainer left behind
    assert not (out / "pskd_seed0" / "metrics_test.json").exists()
    # What a rerun resumes from (resuming itself: tests/test_interrupt.py).
    assert (checkpoints / "checkpoint").exists()
    assert not [n for n in os.listdir(out / "pskd_seed0") if n.startswith(".") and n != ".lock"]
