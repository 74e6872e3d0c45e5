"""The README's Quickstart: its two commands, and its training run."""

import json
import re
import shlex

from support import REPO, run_cli

QUICKSTART_TRAINING = "pip install -e . && selfkd-train --flagfile=configs/quickstart.flags"


def quickstart_commands():
    """The command lines of the code block under README's `## Quickstart`."""
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README.md has no Quickstart section"
    block = re.search(r"^```(?:bash|sh)\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the Quickstart section has no code block"
    return [
        line.strip()
        for line in block.group(1).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def ci_command():
    """The install-and-test command `.ci/run` runs."""
    (line,) = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith("pip install")
    ]
    return line


def test_readme_quickstart_is_the_training_run_and_the_ci_command():
    assert quickstart_commands() == [QUICKSTART_TRAINING, ci_command()]


def test_quickstart_flagfile_trains_every_exit_through_the_cli(tmp_path):
    # The README's command, minus the install, with a shortened budget.
    train_args = shlex.split(QUICKSTART_TRAINING.partition("&&")[2])[1:]
    run_dir = tmp_path / "quickstart"
    result = run_cli(
        "selfkd_tf.cli.train", *train_args, "--epochs=1", "--train_examples=300",
        "--eval_examples=100", "--width_multiplier=0.125",
        f"--model_dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    flags = json.loads((run_dir / "flags.json").read_text())
    assert flags["dataset"] == "digits"
    assert flags["methods"] == ["pskd", "byot", "dmfl"]
    assert flags["num_stages"] == 4 and not flags["augment"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["split"]) == ("digits", "test")
    assert metrics["num_examples"] == 100 and metrics["num_exits"] == 4
    errors = [entry["top1_err"] for entry in metrics["exits"]]
    errors.append(metrics["ensemble"]["top1_err"])
    assert [entry["exit"] for entry in metrics["exits"]] == [1, 2, 3, 4]
    assert all(0 <= error <= 100 for error in errors)
