"""tools/study.py: the run plan, and a real two-run study with parallel runs."""

import json
import re
import subprocess
import sys

from cli_support import CONFIGS
from cli_support import REPO
from cli_support import environment
from cli_support import last_line
from cli_support import write_npz


def run_study(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "study.py"), *args], cwd=REPO,
        env=environment(), capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)


def test_plan_puts_the_main_comparison_first_and_extra_seeds_last(tmp_path):
    (tmp_path / "pskd_seed3").mkdir()
    for name in ("metrics_test.json", "metrics_train.json"):
        (tmp_path / "pskd_seed3" / name).write_text("{}")
    # Trained but not yet scored on the whole splits: still to do.
    (tmp_path / "byot_seed3").mkdir()
    (tmp_path / "byot_seed3" / "metrics.json").write_text("{}")
    result = run_study("--dry_run", "--seed=3", "--spread_seeds=4", f"--out={tmp_path}",
                       "--dataset=npz:/data/x.npz")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "pskd_seed3: done, skipped"
    plan = dict(line.split(": ", 1) for line in lines[1:])
    assert list(plan) == [
        "baseline_seed3", "pskd_byot_dmfl_seed3", "byot_seed3", "dmfl_seed3",
        "pskd_byot_seed3", "pskd_dmfl_seed3", "byot_dmfl_seed3",
        "baseline_seed4", "pskd_byot_dmfl_seed4",
    ]
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
    for bad in ("--spread_rows=basline", "--spread_seeds=0"):
        refused = run_study("--dry_run", bad, f"--out={tmp_path}")
        assert refused.returncode != 0 and last_line(refused.stderr).startswith("study: ")


def test_two_parallel_runs_then_report_and_skip_on_rerun(tmp_path):
    dataset = write_npz(tmp_path / "tiny.npz", n_test=96)
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
        assert "Epoch 2/2" in (run / "train.log").read_text()
        # smoke.flags evaluates on 64 test images while training; the study
        # scores the whole split and the training examples afterwards.
        scored = {split: json.loads((run / f"metrics_{split}.json").read_text())
                  for split in ("test", "train")}
        assert json.loads((run / "metrics.json").read_text())["num_examples"] == 64
        assert [(r["split"], r["num_examples"]) for r in scored.values()] == [
            ("test", 96), ("train", 64)]
    table = (out / "report" / "table1.md").read_text()
    assert "Baseline" in table and "+PS-KD+BYOT+DMFL" in table
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics*.json")}

    rerun = run_study(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count("done, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics*.json")} == stamps


def test_a_failed_run_fails_the_study_with_one_line(tmp_path):
    result = run_study(f"--run_flagfile={CONFIGS / 'smoke.flags'}",
                       f"--dataset=npz:{tmp_path / 'missing.npz'}", f"--out={tmp_path}",
                       "--only=baseline", "--spread_seeds=")
    assert result.returncode != 0
    assert last_line(result.stderr) == "study: runs failed: baseline_seed0"
    assert not (tmp_path / "report").exists()
    assert "missing.npz" in (tmp_path / "baseline_seed0" / "train.log").read_text()
