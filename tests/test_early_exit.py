"""The early-exit curve: accuracy against cost per threshold, and picking a threshold."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from selfkd_tf.serving import early_exit
from selfkd_tf.experiment import training as experiment
from selfkd_tf.serving.early_exit import (DEFAULT_THRESHOLDS, early_exit_curve, first_confident_exit,
                                  select_threshold)
from selfkd_tf.models.costs import ExitCosts
from selfkd_tf.metrics.scores import top_k_error
from selfkd_tf.experiment.trained import evaluate_trained, load_trained_model
from selfkd_tf.experiment.settings import TrainSettings
from support import last_line, run_cli, tiny_backbone, write_learnable_npz

COSTS = ExitCosts(stage_flops=(100, 200, 300), head_flops=(10, 20, 5))


def test_first_confident_exit_by_hand():
    confidences = [[0.9, 0.2, 0.1], [0.95, 0.7, 0.1], [0.99, 0.99, 0.1]]
    assert first_confident_exit(confidences, 0.0).tolist() == [1, 1, 1]
    assert first_confident_exit(confidences, 0.6).tolist() == [1, 2, 3]
    assert first_confident_exit(confidences, 0.95).tolist() == [2, 3, 3]
    assert first_confident_exit(confidences, 1.01).tolist() == [3, 3, 3]


def test_curve_by_hand():
    # Four examples of two classes; label 0 throughout.
    probs = np.array([
        [[0.9, 0.1], [0.55, 0.45], [0.35, 0.65], [0.4, 0.6]],  # exit 1
        [[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.65, 0.35]],   # exit 2
        [[0.8, 0.2], [0.6, 0.4], [0.6, 0.4], [0.3, 0.7]],     # exit 3
    ])
    curve = early_exit_curve(probs, np.zeros(4, int), COSTS, thresholds=[2.0, 0.0, 0.68])
    assert [p["threshold"] for p in curve["cascade"]] == [0.0, 0.68, 2.0]
    t0, mid, never = curve["cascade"]
    # T = 0.68: exit 1 answers example 0 (0.9); exit 2 examples 1 (0.7) and
    # 2 (0.8); example 3 (0.6, 0.65) reaches exit 3.
    assert mid["exit_fractions"] == [0.25, 0.5, 0.25]
    assert mid["accuracy"] == pytest.approx(50.0)          # right on 0 and 1
    assert mid["mean_flops"] == pytest.approx((110 + 2 * 330 + 635) / 4)
    assert (t0["accuracy"], t0["mean_flops"]) == (pytest.approx(50.0), 110)
    assert (never["accuracy"], never["mean_flops"]) == (pytest.approx(75.0), 635)
    assert [e["accuracy"] for e in curve["exits"]] == pytest.approx([50.0, 75.0, 75.0])
    assert [e["flops"] for e in curve["exits"]] == [110, 320, 605]
    assert never["flops_vs_deepest"] == pytest.approx(635 / 605)
    assert mid["flops_vs_deepest"] == pytest.approx(mid["mean_flops"] / 605)


def test_curve_is_monotone_and_ends_at_the_single_exits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    # Deeper exits are sharper and more often right, as trained exits are.
    gammas = [rng.gamma(1.0 + 4 * k * np.eye(5)[labels]) for k in (1, 2, 3)]
    probs = [g / g.sum(axis=1, keepdims=True) for g in gammas]  # Dirichlet samples
    curve = early_exit_curve(probs, labels, COSTS)
    points = curve["cascade"]
    assert [p["threshold"] for p in points] == sorted(DEFAULT_THRESHOLDS)
    costs = [p["mean_flops"] for p in points]
    assert all(lower <= higher for lower, higher in zip(costs, costs[1:]))
    assert costs[0] == COSTS.cascade_exit(1) and costs[-1] == COSTS.cascade_exit(3)
    for point, exit_probs in ((points[0], probs[0]), (points[-1], probs[-1])):
        assert point["accuracy"] == pytest.approx(100 - top_k_error(exit_probs, labels))
    for exit_point, exit_probs in zip(curve["exits"], probs):
        assert exit_point["accuracy"] == pytest.approx(100 - top_k_error(exit_probs, labels))
    assert all(sum(p["exit_fractions"]) == pytest.approx(1) for p in points)
    with pytest.raises(ValueError, match="^threshold: must be a number >= 0"):
        early_exit_curve(probs, labels, COSTS, thresholds=[0.5, -1])


def _curve(*points):
    """Two exits, the deepest costing 200 FLOPs alone; points (T, accuracy, mean FLOPs)."""
    return {"exits": [{"exit": 1, "accuracy": 60.0, "flops": 90},
                      {"exit": 2, "accuracy": 80.0, "flops": 200}],
            "cascade": [{"threshold": t, "accuracy": a, "mean_flops": f}
                        for t, a, f in points]}


def test_select_threshold_takes_the_cheapest_that_keeps_the_accuracy():
    curve = _curve((0.0, 60.0, 100), (0.5, 79.4, 150), (0.8, 79.6, 170),
                   (0.9, 80.2, 160), (2.0, 80.0, 230))
    chosen = select_threshold(curve, max_accuracy_drop=0.5)
    assert (chosen["threshold"], chosen["required_accuracy"]) == (0.9, 79.5)
    assert select_threshold(curve, max_accuracy_drop=0.7)["threshold"] == 0.5
    assert select_threshold(curve, target_accuracy=50)["threshold"] == 0.0
    assert select_threshold(curve, max_accuracy_drop=0)["threshold"] == 0.9
    assert select_threshold(curve, target_accuracy=90) is None
    with pytest.raises(ValueError, match="^target_accuracy: give it or max_accuracy_drop"):
        select_threshold(curve, target_accuracy=50, max_accuracy_drop=1)
    with pytest.raises(ValueError, match="^max_accuracy_drop: must be a finite number >= 0"):
        select_threshold(curve, max_accuracy_drop=-1)


def test_select_threshold_never_picks_a_cascade_dearer_than_the_deepest_exit():
    """The cascade asks exit 1's head before exit 2 answers, so a threshold
    that sends (nearly) everything to exit 2 costs more than exit 2 alone:
    it keeps the accuracy and saves nothing."""
    curve = _curve((0.0, 60.0, 100), (0.1, 70.0, 150), (0.15, 80.0, 203.8),
                   (0.5, 80.0, 210), (1.01, 80.0, 210))
    assert select_threshold(curve, max_accuracy_drop=0.5) is None
    assert select_threshold(curve, target_accuracy=75) is None
    assert select_threshold(curve, max_accuracy_drop=10)["threshold"] == 0.1
    # Costing exactly as much as the deepest exit saves nothing either.
    at_par = _curve((0.0, 60.0, 100), (0.3, 80.0, 200))
    assert select_threshold(at_par, max_accuracy_drop=0) is None


@pytest.mark.parametrize("criterion", [
    dict(max_accuracy_drop=math.inf), dict(max_accuracy_drop=math.nan),
    dict(target_accuracy=math.nan), dict(target_accuracy=math.inf)])
def test_select_threshold_refuses_criteria_that_are_not_finite(criterion):
    curve = _curve((0.0, 60.0, 100), (0.5, 80.0, 150))
    with pytest.raises(ValueError, match=f"^{next(iter(criterion))}: must be"):
        select_threshold(curve, **criterion)


def test_measure_latency_times_every_exit_and_threshold():
    backbone = tiny_backbone(3, image_size=8, seed=0)
    images = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
    latency = early_exit.measure_latency(backbone, images, thresholds=[2.0, 0.0], rounds=1)
    assert (latency["examples"], latency["batch_sizes"], latency["rounds"]) == (6, [1, 6], 1)
    assert len(latency["exits"]) == 2 and len(latency["cascade"]) == 2
    for timing in latency["exits"] + latency["cascade"]:
        assert set(timing) == {"1", "6"} and all(ms > 0 for ms in timing.values())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished one-epoch run that held out a quarter of its training set."""
    root = tmp_path_factory.mktemp("early_exit")
    settings = TrainSettings(
        dataset=write_learnable_npz(root / "data.npz", n_train=96, n_test=32),
        validation_fraction=0.25,
        arch="resnet18", width_multiplier=0.0625, num_stages=2, epochs=1, batch_size=32,
        lr=0.05, lr_schedule="constant", methods=("byot",), model_dir=str(root / "run"))
    experiment.train(settings)
    return root / "run"


def test_eval_command_writes_the_curve_of_the_split(run_dir, tmp_path):
    thresholds = [0.0, 0.4, 0.6, 0.9, 1.01]
    result = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}", "--early_exit",
                     "--split=test", "--latency_examples=4",
                     f"--thresholds={','.join(map(str, thresholds))}", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.loads((tmp_path / "early_exit.json").read_text())
    assert (tmp_path / "early_exit.png").stat().st_size > 0
    assert (curve["split"], curve["num_examples"], curve["selected"]) == ("test", 32, None)
    assert [p["threshold"] for p in curve["cascade"]] == thresholds
    costs = [p["mean_flops"] for p in curve["cascade"]]
    assert all(lower <= higher for lower, higher in zip(costs, costs[1:]))
    metrics = evaluate_trained(load_trained_model(str(run_dir)),
                                          split="test")
    accuracies = [100 - e["top1_err"] for e in metrics["exits"]]
    assert [e["accuracy"] for e in curve["exits"]] == pytest.approx(accuracies)
    ends = curve["cascade"][0]["accuracy"], curve["cascade"][-1]["accuracy"]
    assert ends == pytest.approx((accuracies[0], accuracies[-1]))
    assert curve["latency"] == {"examples": 4, "batch_sizes": [1, 4], "rounds": 3}
    assert all(set(p["latency_ms"]) == {"1", "4"} for p in curve["cascade"] + curve["exits"])
    assert "T=0.6" in result.stdout and f"Wrote {tmp_path / 'early_exit.json'}" in result.stdout


def test_eval_command_picks_a_threshold_on_validation_only(run_dir, tmp_path):
    refused = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}", "--early_exit",
                      "--split=test", "--target_accuracy=50", f"--out={tmp_path}")
    assert refused.returncode == 2
    assert last_line(refused.stderr) == (
        "selfkd-eval: error: --split: a threshold is picked on the validation split "
        "only, never on test")
    assert list(tmp_path.iterdir()) == []

    # A drop of 100 points admits T = 0 (exit 1 alone costs less than the
    # deepest exit); a drop of 0 may admit no threshold that saves anything.
    for drop in (100, 0):
        result = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}", "--early_exit",
                         f"--max_accuracy_drop={drop}", "--latency_examples=0",
                         f"--out={tmp_path}")
        curve = json.loads((tmp_path / "early_exit.json").read_text())
        assert (curve["split"], curve["num_examples"]) == ("validation", 24)
        deepest = curve["exits"][-1]
        qualifying = [p for p in curve["cascade"]
                      if p["accuracy"] >= deepest["accuracy"] - drop - 1e-9
                      and p["mean_flops"] < deepest["flops"]]
        if drop == 100:
            assert curve["cascade"][0] in qualifying
        if not qualifying:
            assert (result.returncode, curve["selected"]) == (1, None), result.stderr[-3000:]
            assert last_line(result.stdout).startswith("No threshold keeps accuracy")
            assert last_line(result.stdout).endswith("; serve the deepest exit")
            continue
        assert result.returncode == 0, result.stderr[-3000:]
        chosen = curve["selected"]
        assert chosen["mean_flops"] == min(p["mean_flops"] for p in qualifying)
        assert chosen["flops_vs_deepest"] < 1
        assert last_line(result.stdout).startswith(
            f"Threshold {chosen['threshold']:g}: accuracy")


@pytest.mark.parametrize("args, message", [
    (["--early_exit", "--target_accuracy=nan"],
     "flag --target_accuracy=nan: must be a finite number"),
    (["--early_exit", "--max_accuracy_drop=nan"],
     "flag --max_accuracy_drop=nan: must be a finite number"),
    (["--early_exit", "--max_accuracy_drop=inf"],
     "flag --max_accuracy_drop=inf: must be a finite number"),
    (["--early_exit", "--thresholds="], "--thresholds: give at least one"),
    (["--early_exit", "--out={root}/afile/sub/ee.json"], "--out: {root}/afile is not a directory"),
    (["--early_exit", "--out={root}/afile/sub"], "--out: {root}/afile is not a directory"),
    (["--early_exit", "--out={root}/ee.json"],
     "--out: {root}/ee.json is a directory; give a .json file, or a directory to "
     "write early_exit.json in"),
    (["--out={root}/afile/metrics.json"], "--out: {root}/afile is not a directory"),
])
def test_eval_command_refuses_bad_flags_before_loading_the_model(tmp_path, args, message):
    """The model does not exist: each flag is refused before it is looked for."""
    (tmp_path / "afile").write_text("a file\n")
    (tmp_path / "ee.json").mkdir()
    result = run_cli("selfkd_tf.cli.evaluate", f"--model={tmp_path / 'absent'}",
                     *(arg.format(root=tmp_path) for arg in args))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr) == f"selfkd-eval: error: {message.format(root=tmp_path)}"
    assert sorted(os.listdir(tmp_path)) == ["afile", "ee.json"]
    assert os.listdir(tmp_path / "ee.json") == []


def test_eval_command_says_a_threshold_needs_a_validation_split(run_dir, tmp_path):
    """A run that held out no validation data: the criterion, not --split
    (which was not given), is what cannot be met."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    settings = json.loads((run / "flags.json").read_text())
    (run / "flags.json").write_text(json.dumps({**settings, "validation_fraction": 0.0}))
    files = sorted(os.listdir(run))
    result = run_cli("selfkd_tf.cli.evaluate", f"--model={run}", "--early_exit",
                     "--target_accuracy=80")
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result.stderr) == (
        "selfkd-eval: error: --target_accuracy: chooses the threshold on a validation "
        f"split, which needs a run trained with --validation_fraction; {run} held out none")
    assert sorted(os.listdir(run)) == files
