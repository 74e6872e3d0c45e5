"""Temperature scaling: the fit, its protocol on held-out data, and the commands that use it."""

import json
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.data.splits import stratified_halves
from selfkd_tf.errors import SettingsError
from selfkd_tf.evaluation.scoring import predict_exit_probabilities
from selfkd_tf.experiment.trained import (
    evaluation_data, fit_temperature_scaling, load_trained_model)
from selfkd_tf.metrics import calibration, scores
from selfkd_tf.report import load_runs, write_report
from selfkd_tf.rundir.reading import RunDirectoryError, read_temperatures

from support import last_line, run_cli

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "runs_2026_12_07.tar.gz"


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def test_the_fit_recovers_the_temperature_the_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = 4 * rng.normal(size=(20000, 5))
    # Labels drawn from softmax(z / 2.5): a model whose logits are z is
    # overconfident, and T = 2.5 is its calibration.
    drawn = _softmax(logits / 2.5)
    labels = (drawn.cumsum(axis=1) > rng.random((20000, 1))).argmax(axis=1)
    fitted = calibration.fit_temperature(_softmax(logits), labels)
    assert fitted == pytest.approx(2.5, rel=0.05)
    # It is the NLL's minimum: 10% either way is worse.
    nll = lambda t: scores.negative_log_likelihood(  # noqa: E731
        calibration.apply_temperature(_softmax(logits), t), labels)
    assert nll(fitted) < min(nll(0.9 * fitted), nll(1.1 * fitted))


def test_scaling_keeps_the_prediction_and_one_is_the_identity():
    probs = _softmax(np.random.default_rng(1).normal(size=(50, 7)))
    np.testing.assert_allclose(calibration.apply_temperature(probs, 1.0), probs, atol=1e-12)
    scaled = calibration.apply_temperature(probs, 3.0)
    np.testing.assert_array_equal(scaled.argmax(1), probs.argmax(1))
    np.testing.assert_allclose(scaled.sum(1), 1.0)
    assert scaled.max() < probs.max()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="^temperature: must be"):
            calibration.apply_temperature(probs, bad)
    with pytest.raises(ValueError, match="^temperatures: got 1 for 2 exits"):
        calibration.apply_temperatures([probs, probs], [1.0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("temperature")
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(folder, filter="data")
    return folder / "finished"


def test_fitted_on_one_half_of_the_test_split_and_scored_on_the_other(run_dir):
    trained = load_trained_model(str(run_dir))
    record = fit_temperature_scaling(trained, split="test", seed=3)
    test_ds, _ = evaluation_data(trained, split="test")
    probs, labels = predict_exit_probabilities(trained.model, test_ds)
    first, second = stratified_halves(labels, 3)
    assert record["fitted_on"] == {"split": "test", "num_examples": len(first),
                                   "rows": "stratified half 1 of 2 (seed 3)"}
    assert record["reported_on"]["num_examples"] == len(second) == len(labels) - len(first)
    temperatures = record["temperatures"]
    assert temperatures == [calibration.fit_temperature(p[first], labels[first]) for p in probs]
    for k, (p, before, after) in enumerate(zip(probs, record["before"]["exits"],
                                               record["after"]["exits"])):
        assert before["nll"] == pytest.approx(
            scores.negative_log_likelihood(p[second], labels[second]), rel=1e-9)
        assert after["nll"] == pytest.approx(scores.negative_log_likelihood(
            calibration.apply_temperature(p[second], temperatures[k]), labels[second]),
            rel=1e-9)
        assert after["top1_err"] == before["top1_err"]
    with pytest.raises(SettingsError, match="a temperature is fitted on held-out data"):
        fit_temperature_scaling(trained, split="train")


def test_the_commands_fit_score_export_and_report_temperatures(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    own = (run / "metrics.json").read_text()
    fitted = run_cli("selfkd_tf.cli.evaluate", f"--model={run}", "--fit_temperature",
                     "--split=test")
    assert fitted.returncode == 0, fitted.stderr
    record = read_temperatures(str(run / "temperatures_test.json"))
    scored = run_cli("selfkd_tf.cli.evaluate", f"--model={run}",
                     f"--temperature_file={run / 'temperatures_test.json'}")
    assert scored.returncode == 0, scored.stderr
    calibrated = json.loads((run / "calibrated_metrics_test.json").read_text())
    assert calibrated["temperatures"] == record["temperatures"]
    assert not (run / "metrics_test.json").exists()  # the model's own scores stay
    assert (run / "metrics.json").read_text() == own
    exported = run_cli("selfkd_tf.cli.export", f"--model={run}", f"--out={tmp_path / 'e'}",
                       "--exit=ensemble", f"--temperature_file={run / 'temperatures_test.json'}")
    assert exported.returncode == 0, exported.stderr
    served = tf.saved_model.load(str(tmp_path / "e"))
    trained = load_trained_model(str(run))
    test_ds, _ = evaluation_data(trained, split="test", eval_examples=20)
    probs, _ = predict_exit_probabilities(trained.model, test_ds)
    images = np.concatenate([x["image"].numpy() for x, _ in test_ds])
    model = trained.model
    pixels = np.round((images * np.float32(model.input_std) + np.float32(model.input_mean)) * 255)
    expected = np.mean(calibration.apply_temperatures(probs, record["temperatures"]), axis=0)
    np.testing.assert_allclose(served.serve(tf.constant(pixels, tf.float32))["probabilities"],
                               expected, atol=2e-3)
    answer = served.calibration()
    np.testing.assert_allclose(answer["temperatures"], record["temperatures"], rtol=1e-6)
    assert answer["fitted_on"].numpy().decode().startswith("test split, stratified half 1")
    found = load_runs([str(run)])
    summary = write_report(found.runs, str(tmp_path / "report"),
                           temperature_file="temperatures_test.json")
    text = (tmp_path / "report" / "summary.md").read_text()
    assert any(p.endswith("summary.md") for p in summary)
    assert "## Temperature scaling" in text
    assert f"{record['temperatures'][-1]:.3f}" in text


def test_a_temperature_file_for_another_model_is_refused(run_dir, tmp_path):
    record = fit_temperature_scaling(load_trained_model(str(run_dir)), split="test")
    inconsistent = tmp_path / "inconsistent.json"
    inconsistent.write_text(json.dumps({**record, "temperatures": record["temperatures"][:2]}))
    with pytest.raises(RunDirectoryError, match="2 temperatures for 3 exits"):
        read_temperatures(str(inconsistent))
    # A whole record of a two-exit model: refused once the model is known.
    two_exits = {**record, "temperatures": record["temperatures"][:2],
                 **{k: {**record[k], "exits": record[k]["exits"][:2]}
                    for k in ("before", "after")}}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(two_exits))
    for command in ("selfkd_tf.cli.evaluate", "selfkd_tf.cli.export"):
        result = run_cli(command, f"--model={run_dir}", f"--out={tmp_path / 'x'}",
                         f"--temperature_file={other}")
        assert result.returncode == 2
        assert last_line(result.stderr).endswith(
            "holds 2 temperatures; the model has 3 exits"), result.stderr
        assert not (tmp_path / "x").exists()
