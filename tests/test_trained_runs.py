"""Trained runs (`selfkd_tf.experiment.trained`): selfkd-eval, and the model
loading it shares with selfkd-export."""

import json
import shutil

import pytest

from selfkd_tf.experiment import training as experiment
from selfkd_tf.metrics.scores import METRIC_KEYS
from selfkd_tf.experiment.trained import evaluate_trained, load_trained_model
from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.errors import SettingsError
from support import run_cli, write_learnable_npz


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished one-epoch run whose normalisation comes from a training subset,
    evaluated while training on 16 of the 32 test images."""
    root = tmp_path_factory.mktemp("evaluate")
    settings = TrainSettings(
        dataset=write_learnable_npz(root / "data.npz", n_train=96, n_test=32),
        train_examples=64, eval_examples=16, arch="resnet18", width_multiplier=0.0625, num_stages=2,
        epochs=1, batch_size=32, lr=0.05, lr_schedule="constant",
        model_dir=str(root / "run"))
    experiment.train(settings)
    return root / "run"


def _scores(record):
    return [e[k] for e in [*record["exits"], record["ensemble"]] for k in METRIC_KEYS]


def test_loads_a_run_directory_or_a_keras_file(run_dir, tmp_path):
    trained = load_trained_model(str(run_dir))
    assert trained.run_dir == str(run_dir)
    assert trained.settings.train_examples == 64
    assert trained.model.num_exits == 2
    beside = load_trained_model(str(run_dir / "model.keras"))
    assert beside.settings == trained.settings
    shutil.copy(run_dir / "model.keras", tmp_path / "lone.keras")
    lone = load_trained_model(str(tmp_path / "lone.keras"))
    assert (lone.settings, lone.run_dir) == (None, None)
    for missing in (tmp_path / "nothing", tmp_path):
        with pytest.raises(SettingsError) as error:
            load_trained_model(str(missing))
        assert error.value.flag == "model"


def test_lone_model_is_evaluated_with_its_own_normalisation(run_dir, tmp_path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    shutil.copy(run_dir / "model.keras", tmp_path / "lone.keras")
    lone = load_trained_model(str(tmp_path / "lone.keras"))
    with pytest.raises(SettingsError, match="dataset: required"):
        evaluate_trained(lone)
    # All 96 training images give other statistics than the run's 64; the
    # images are mapped onto the model's normalisation all the same.
    record = evaluate_trained(lone, dataset=metrics["dataset"],
                                         eval_examples=16)
    assert _scores(record) == pytest.approx(_scores(metrics), abs=1e-3)
    with pytest.raises(SettingsError) as error:
        evaluate_trained(lone, dataset=metrics["dataset"], split="tain")
    assert error.value.flag == "split" and "allowed: test, validation, train" in error.value.problem


def test_scores_the_whole_split_unless_asked_for_a_subset(run_dir):
    trained = load_trained_model(str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["split"], metrics["num_examples"]) == ("test", 16)
    whole = evaluate_trained(trained)
    assert (whole["split"], whole["num_examples"]) == ("test", 32)
    # The training split is the run's 64-image subset, unaugmented.
    train = evaluate_trained(trained, split="train")
    assert (train["split"], train["num_examples"]) == ("train", 64)
    subset = evaluate_trained(trained, eval_examples=16)
    assert _scores(subset) == pytest.approx(_scores(metrics), abs=1e-6)


def test_validation_split_needs_one_held_out(run_dir):
    with pytest.raises(SettingsError, match="held out none") as error:
        evaluate_trained(load_trained_model(str(run_dir)),
                                    split="validation")
    assert error.value.flag == "split"
    # The training split can be scored as well as the test split.
    assert error.value.problem.endswith("allowed: test, train")


def test_eval_examples_beyond_the_split_score_it_whole_and_say_so(run_dir, tmp_path):
    result = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}",
                     "--eval_examples=5000", f"--out={tmp_path / 'eval.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("--eval_examples=5000 is more than the test split holds; scored all "
            "32 examples") in result.stdout.splitlines()
    assert json.loads((tmp_path / "eval.json").read_text())["num_examples"] == 32


def test_eval_help_names_the_files_it_writes():
    result = run_cli("selfkd_tf.cli.evaluate", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    description = text.split(" flags: ")[0]
    # By default the record goes beside the model, one file per split.
    assert "writes the record (`selfkd_tf.metrics.record` schema) to ``metrics_<split>.json`` " \
        "beside the model" in description
    assert "``metrics.json`` record" not in description
    assert "--[no]early_exit: Instead of metrics_<split>.json, sweep" in text


def test_eval_command_reproduces_the_runs_metrics(run_dir, tmp_path):
    result = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}",
                     "--eval_examples=16", f"--out={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert _scores(written) == pytest.approx(_scores(metrics), abs=1e-6)
    keys = ("dataset", "split", "num_examples", "arch", "methods", "epochs", "params")
    assert {k: written[k] for k in keys} == {k: metrics[k] for k in keys}
    assert "(test split, 16 examples)" in result.stdout
    table = result.stdout.splitlines()
    assert table[1].split() == ["exit", *METRIC_KEYS]
    assert [row.split()[0] for row in table[2:5]] == ["1", "2", "ensemble"]
    assert table[-1] == f"Wrote {tmp_path / 'eval' / 'metrics.json'}"



def test_a_model_without_its_normalisation_is_refused(run_dir, tmp_path):
    trained = load_trained_model(str(run_dir))
    model = trained.model
    bare = type(model)(model.backbone, num_train_examples=model.num_train_examples,
                       config=model.selfkd_config)
    bare.save(tmp_path / "bare.keras")
    lone = load_trained_model(str(tmp_path / "bare.keras"))
    with pytest.raises(SettingsError, match="records no input normalisation") as error:
        evaluate_trained(lone, dataset=trained.settings.dataset)
    assert error.value.flag == "model"
