"""Runs written before the package was laid out in subpackages still load,
evaluate, export and resume (``tests/fixtures/README.md`` says how they were made)."""

import dataclasses
import json
import pathlib
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.evaluation.scoring import predict_exit_probabilities
from selfkd_tf.experiment import training
from selfkd_tf.experiment.settings import read_settings
from selfkd_tf.experiment.trained import evaluate_trained, evaluation_data, load_trained_model
from selfkd_tf.serving.saved_model import export_saved_model

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "runs_2026_12_07.tar.gz"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("old_runs")
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(folder, filter="data")
    return folder


def test_a_finished_run_loads_and_scores_as_it_did(runs):
    saved = json.loads((runs / "finished" / "metrics.json").read_text())
    trained = load_trained_model(str(runs / "finished"))
    assert trained.model.num_exits == 3 and trained.settings.epochs == 2
    record = evaluate_trained(trained, eval_examples=saved["num_examples"])
    assert record["num_examples"] == 48
    for now, then in zip(record["exits"] + [record["ensemble"]],
                         saved["exits"] + [saved["ensemble"]]):
        assert now["top1_err"] == then["top1_err"]
        assert now["nll"] == pytest.approx(then["nll"], rel=1e-4)


def test_a_finished_run_exports_every_exit_and_the_cascade(runs, tmp_path):
    trained = load_trained_model(str(runs / "finished"))
    model = trained.model
    test_ds, _ = evaluation_data(trained, eval_examples=16)
    exit_probs, _ = predict_exit_probabilities(model, test_ds)
    images = np.concatenate([x["image"].numpy() for x, _ in test_ds])
    std, mean = np.float32(model.input_std), np.float32(model.input_mean)
    pixels = tf.constant(np.round((images * std + mean) * 255), tf.float32)
    expected = {1: exit_probs[0], 2: exit_probs[1], 3: exit_probs[2],
                "ensemble": np.mean(exit_probs, axis=0)}
    for exit, probs in expected.items():  # noqa: A001
        export_saved_model(model, str(tmp_path / str(exit)), exit=exit)
        served = tf.saved_model.load(str(tmp_path / str(exit)))
        np.testing.assert_allclose(served.serve(pixels)["probabilities"], probs, atol=2e-3)
    export_saved_model(model, str(tmp_path / "cascade"), exit="cascade", threshold=2.0)
    cascade = tf.saved_model.load(str(tmp_path / "cascade"))
    answer = cascade.serve(pixels)
    assert set(answer["exit_ids"].numpy()) == {3}
    np.testing.assert_allclose(answer["probabilities"], exit_probs[2], atol=2e-3)
    assert set(cascade.serve(pixels, threshold=0.0)["exit_ids"].numpy()) == {1}


def test_a_killed_run_resumes_where_it_stopped(runs, capsys):
    run_dir = runs / "killed"
    settings = read_settings(str(run_dir))
    assert not (run_dir / "model.keras").exists()
    record = training.train(dataclasses.replace(settings, model_dir=str(run_dir)))
    assert f"Resuming {run_dir} at epoch 2, step 2 of 3." in capsys.readouterr().out
    history = (run_dir / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2", "3"]
    assert len(record["exits"]) == 3 and (run_dir / "model.keras").exists()
    resumed = load_trained_model(str(run_dir)).model
    assert resumed.soft_target_valid.numpy().sum() == 96
