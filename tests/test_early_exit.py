"""The early-exit curve: accuracy against cost per threshold, and picking a threshold."""

import json

import keras
import numpy as np
import pytest

from cli_support import last_line, run_cli, write_npz
from selfkd_tf import early_exit, experiment
from selfkd_tf.early_exit import (DEFAULT_THRESHOLDS, early_exit_curve, first_confident_exit,
                                  select_threshold)
from selfkd_tf.export import ExitCosts
from selfkd_tf.metrics import top_k_error
from selfkd_tf.models import build_multi_exit_resnet
from selfkd_tf.evaluation import evaluate_trained, load_trained_model
from selfkd_tf.settings import TrainSettings

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
    return {"exits": [{"exit": 1, "accuracy": 60.0}, {"exit": 2, "accuracy": 80.0}],
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
    with pytest.raises(ValueError, match="^max_accuracy_drop: must be >= 0"):
        select_threshold(curve, max_accuracy_drop=-1)


def test_measure_latency_times_every_exit_and_threshold():
    keras.utils.set_random_seed(0)
    backbone = build_multi_exit_resnet("resnet18", 3, input_shape=(8, 8, 3), num_stages=2,
                                       width_multiplier=0.0625)
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
        dataset=write_npz(root / "data.npz", n_train=96, n_test=32), validation_fraction=0.25,
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

    result = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}", "--early_exit",
                     "--max_accuracy_drop=0", "--latency_examples=0", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.loads((tmp_path / "early_exit.json").read_text())
    assert (curve["split"], curve["num_examples"]) == ("validation", 24)
    chosen = curve["selected"]
    deepest = curve["exits"][-1]
    assert chosen["accuracy"] >= deepest["accuracy"] - 1e-9
    assert chosen["mean_flops"] == min(p["mean_flops"] for p in curve["cascade"]
                                       if p["accuracy"] >= deepest["accuracy"] - 1e-9)
    assert last_line(result.stdout).startswith(f"Threshold {chosen['threshold']:g}: accuracy")
