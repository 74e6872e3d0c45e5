"""selfkd-tune: search space, trial isolation, Hyperband schedules, resuming, CLI."""

import json
import os

import keras
import pytest
from absl import flags

from selfkd_tf.tuning import search_space
from selfkd_tf.tuning import search as tuning
from selfkd_tf.cli import flags as train_flags
from selfkd_tf.cli import tune as tune_cli
from selfkd_tf.tuning.search_space import TuneSettings
from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.errors import SettingsError
from support import last_line, run_cli, write_learnable_npz

NUM_TRAIN = 240
# 60 of the 240 training images score the trials; 180 train, 3 batches of 60.
VALIDATION_FRACTION, BATCH_SIZE = 0.25, 60
TRAINED = NUM_TRAIN - int(NUM_TRAIN * VALIDATION_FRACTION)
STEPS = TRAINED // BATCH_SIZE


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """``npz:`` flag value of 240 training and 64 test images, 16x16, 4 classes."""
    return write_learnable_npz(tmp_path_factory.mktemp("data") / "tiny.npz",
                     n_train=NUM_TRAIN, n_test=64)


def _settings(npz, **overrides) -> TrainSettings:
    values = dict(
        dataset=npz, arch="resnet18", num_stages=2, width_multiplier=0.0625,
        epochs=1, batch_size=BATCH_SIZE, validation_fraction=VALIDATION_FRACTION,
        lr_schedule="constant", methods=("pskd", "byot", "dmfl"),
    )
    return TrainSettings(**{**values, **overrides})


# Callbacks are deep-copied for every execution, so they log to the module.
EVENTS = []


class Probe(keras.callbacks.Callback):
    """Logs the model's state when a trial starts and at every epoch start."""

    def on_train_begin(self, logs=None):
        model = self.model
        EVENTS.append({
            "event": "train_begin",
            "rows": int(model.soft_target_table.shape[0]),
            "valid": float(model.soft_target_valid.numpy().sum()),
            "staged": float(model.staged_valid.numpy().sum()),
            "iterations": int(model.optimizer.iterations.numpy()),
            "config": model.selfkd_config,
        })

    def on_epoch_begin(self, epoch, logs=None):
        # SoftTargetRefresh runs first, so a_t is already this epoch's.
        EVENTS.append({
            "event": "epoch_begin", "epoch": epoch,
            "alpha_t": float(self.model.pskd_alpha_t.numpy()),
            "lr": float(self.model.optimizer.learning_rate.numpy()),
        })

    def on_train_end(self, logs=None):
        EVENTS.append({"event": "train_end",
                       "valid": float(self.model.soft_target_valid.numpy().sum())})


class InterruptSecondTrial(keras.callbacks.Callback):
    """Stops the process, as Ctrl-C would, when the second trial starts."""

    def on_train_begin(self, logs=None):
        if sum(e["event"] == "train_begin" for e in EVENTS) == 2:
            raise KeyboardInterrupt


def _events(kind):
    return [e for e in EVENTS if e["event"] == kind]


def test_random_search_isolates_trials_and_resumes_after_an_interruption(npz, tmp_path):
    settings = _settings(npz, methods=("pskd", "byot"))
    options = TuneSettings(max_trials=2, tuner_dir=str(tmp_path / "search"),
                           search=("pskd_alpha", "lr"))
    EVENTS.clear()
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(settings, options, callbacks=[Probe(), InterruptSecondTrial()],
                    verbose=0)
    first, second = _events("train_begin")
    # Trial 1 filled its table; trial 2 nevertheless started from scratch.
    assert _events("train_end")[0]["valid"] == TRAINED
    for start in (first, second):
        assert start["rows"] == TRAINED  # the validation split is held out
        assert (start["valid"], start["staged"], start["iterations"]) == (0, 0, 0)
    assert not os.path.exists(tmp_path / "search" / tuning.BEST_HYPERPARAMETERS_FILE)

    EVENTS.clear()
    result = tuning.tune(settings, options, callbacks=[Probe()], verbose=0)
    (rerun,) = _events("train_begin")  # only the interrupted trial runs again
    assert (rerun["valid"], rerun["iterations"]) == (0, 0)
    assert sorted(t.trial_id for t in result.trials) == ["0", "1"]

    # Each trial trained with its own values; the others kept theirs.
    assert second["config"].pskd_alpha != first["config"].pskd_alpha
    assert rerun["config"].pskd_alpha == second["config"].pskd_alpha
    by_id = {t.trial_id: t.hyperparameters for t in result.trials}
    assert by_id["0"]["pskd_alpha"] == first["config"].pskd_alpha
    assert _events("epoch_begin")[0]["lr"] == pytest.approx(by_id["1"]["lr"])
    for values in by_id.values():
        assert set(values) == {"pskd_alpha", "lr"}
        assert 0.1 <= values["pskd_alpha"] <= 0.9 and 0.01 <= values["lr"] <= 0.2
    assert rerun["config"].byot_alpha == settings.byot_alpha

    best = result.trials[0]
    assert result.objective == "val_exit2_accuracy"
    assert best.score == max(t.score for t in result.trials)
    record = json.loads((tmp_path / "search" / tuning.BEST_HYPERPARAMETERS_FILE).read_text())
    assert record["hyperparameters"] == best.hyperparameters
    assert record["trial_id"] == best.trial_id
    retrain = TrainSettings.from_json(record["retrain_settings"])
    assert retrain == result.retrain
    assert retrain.validation_fraction == 0.0
    assert retrain.pskd_alpha == best.hyperparameters["pskd_alpha"]
    assert retrain.model_dir == str(tmp_path / "search" / tuning.RETRAIN_DIR)


def test_hyperband_continues_trials_on_the_full_schedule(npz, tmp_path):
    # Bracket 1 of Hyperband(max_epochs=2, factor=2): two 1-epoch trials, then
    # the better one continues for its second epoch; capped there.
    settings = _settings(npz, epochs=2, lr_schedule="multistep", methods=("pskd",),
                         pskd_alpha=0.8, distribute="mirrored")
    options = TuneSettings(tuner="hyperband", hyperband_factor=2, max_trials=3,
                           search=("lr",), tuner_dir=str(tmp_path / "search"))
    EVENTS.clear()
    result = tuning.tune(settings, options, callbacks=[Probe()], verbose=0)

    trials = {t.trial_id: t for t in result.trials}
    assert [trials[i].epochs for i in "012"] == [1, 1, 2]
    starts, epochs = _events("train_begin"), _events("epoch_begin")
    assert [e["epoch"] for e in epochs] == [0, 0, 1]
    # a_t = a_T (t + 1) / T over the full T = 2 epochs, in every trial.
    assert [e["alpha_t"] for e in epochs] == pytest.approx([0.4, 0.4, 0.8])
    for start in starts[:2]:
        assert (start["valid"], start["iterations"]) == (0, 0)
    # The continued trial resumes its predecessor: table, step and a
    # learning rate already past the 50% decay of the 2-epoch schedule.
    assert (starts[2]["valid"], starts[2]["iterations"]) == (TRAINED, STEPS)
    assert epochs[2]["lr"] == pytest.approx(0.01 * trials["2"].hyperparameters["lr"])
    assert trials["2"].hyperparameters["lr"] in {
        trials[i].hyperparameters["lr"] for i in "01"}


def test_cli_search_writes_a_flagfile_that_retrains_the_winner(npz, tmp_path):
    tuner_dir = tmp_path / "search"
    common = [f"--dataset={npz}", "--num_stages=2", "--width_multiplier=0.0625",
              f"--batch_size={BATCH_SIZE}", "--lr_schedule=constant", "--methods=pskd"]
    # One trial: the 2-trial searches above run in-process, which is cheaper.
    search = run_cli("selfkd_tf.cli.tune", *common, "--epochs=1", "--max_trials=1",
                     f"--tuner_dir={tuner_dir}", "--search=pskd_alpha,byot_alpha,weight_decay")
    assert search.returncode == 0, search.stderr
    assert "val_exit2_accuracy" in search.stdout and "pskd_alpha" in search.stdout
    search_record = json.loads((tuner_dir / tuning.SEARCH_FILE).read_text())
    assert search_record["validation_fraction"] == search_space.DEFAULT_VALIDATION_FRACTION
    record = json.loads((tuner_dir / tuning.BEST_HYPERPARAMETERS_FILE).read_text())
    # byot is off, so byot_alpha is not searched.
    assert set(record["hyperparameters"]) == {"pskd_alpha", "weight_decay"}
    # One numbering: KerasTuner's log, the table, the record and best.flags
    # say trial 1, which lives in trials/trial_0.
    assert "Running Trial #1" in search.stdout
    header, row = search.stdout.split("higher is better):\n")[1].splitlines()[:2]
    assert header.split()[:2] == ["rank", "trial"] and header.split()[-1] == "directory"
    assert row.split()[:2] == ["1", "1"] and row.split()[-1] == "trials/trial_0"
    assert (record["trial"], record["trial_id"], record["trial_dir"]) == (
        1, "0", "trials/trial_0")
    assert (tuner_dir / record["trial_dir"]).is_dir()
    flagfile = tuner_dir / tune_cli.FLAGFILE
    lines = flagfile.read_text().splitlines()
    comment = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    # 240 training images: 24 (10%) held out to score the trials, 216 trained on.
    assert f"trial 1 of {tuner_dir} (trials/trial_0)" in comment
    assert ("Trials trained on 216 examples of the training set and were scored on "
            "24 held-out ones (--validation_fraction=0.1). This run retrains trial 1 "
            "on the whole training set, the held-out part included "
            "(--validation_fraction=0), and evaluates it on the test split.") in comment
    assert "--validation_fraction=0.0" in lines
    assert f"--pskd_alpha={record['hyperparameters']['pskd_alpha']!r}" in lines

    run_dir = tmp_path / "retrained"
    retrain = run_cli("selfkd_tf.cli.train", f"--flagfile={flagfile}", "--epochs=1",
                      f"--model_dir={run_dir}")
    assert retrain.returncode == 0, retrain.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"] == "test"
    used = json.loads((run_dir / "flags.json").read_text())
    assert used["pskd_alpha"] == record["hyperparameters"]["pskd_alpha"]
    assert used["validation_fraction"] == 0.0
    # As best.flags says: all 240 training images, one PS-KD table row each.
    retrained = keras.saving.load_model(run_dir / "model.keras", compile=False)
    assert retrained.soft_target_table.shape[0] == NUM_TRAIN


def test_cli_rejects_a_bad_flag_in_one_line_and_writes_nothing(tmp_path):
    result = run_cli("selfkd_tf.cli.tune", "--dataset=npz:/nonexistent.npz",
                     "--lr_range=0.2,0.01", f"--tuner_dir={tmp_path / 'search'}")
    assert result.returncode == 2
    assert last_line(result.stderr) == (
        "selfkd-tune: error: --lr_range: got '0.2,0.01'; allowed: numbers LOW,HIGH "
        "with LOW < HIGH, LOW > 0 (sampled log-uniformly)")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tune_overrides, settings_overrides, flag", [
    ({"tuner": "grid"}, {}, "tuner"),
    ({"max_trials": 0}, {}, "max_trials"),
    ({"executions_per_trial": 0}, {}, "executions_per_trial"),
    ({"tuner": "hyperband", "hyperband_factor": 1}, {}, "hyperband_factor"),
    ({"objective": "val_exit3_accuracy"}, {}, "objective"),
    ({"search": ("lr", "momentum")}, {}, "search"),
    ({"search": ("pskd_alpha",)}, {"methods": ("byot",)}, "search"),
    ({"pskd_alpha_range": (0.5, 1.5)}, {}, "pskd_alpha_range"),
    ({"byot_lambda_range": (0.0, 1e-4)}, {}, "byot_lambda_range"),
    ({"lr_range": (0.1,)}, {}, "lr_range"),
    ({"temperature_choices": (1.0, 1.0)}, {}, "temperature_choices"),
    ({"temperature_choices": (0.0, 2.0)}, {}, "temperature_choices"),
    ({}, {"validation_fraction": 0.0}, "validation_fraction"),
    ({}, {"distribute": "multiworker"}, "distribute"),
    ({}, {"epochs": 0}, "epochs"),
])
def test_invalid_settings_name_their_flag_and_write_nothing(
        npz, tmp_path, tune_overrides, settings_overrides, flag):
    options = TuneSettings(tuner_dir=str(tmp_path / "search"), **tune_overrides)
    with pytest.raises(SettingsError) as error:
        tuning.tune(_settings(npz, **settings_overrides), options, verbose=0)
    assert error.value.flag == flag
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_a_directory_holding_another_search_is_refused(npz, tmp_path):
    settings, options = _settings(npz), TuneSettings(tuner_dir=str(tmp_path))
    searched = options.searched(settings)
    record = {**settings.to_json(), **options.to_json(), "tuner_dir": str(tmp_path)}
    (tmp_path / tuning.SEARCH_FILE).write_text(
        json.dumps({**record, "lr": 1.0, "max_trials": 50}))
    # A searched field's fixed value and the budget may differ ...
    tuning._check_resumable(str(tmp_path), record, ignored=searched)
    # ... anything else may not.
    (tmp_path / tuning.SEARCH_FILE).write_text(json.dumps({**record, "epochs": 9}))
    with pytest.raises(SettingsError, match=r"--epochs: 9 -> 1.*--overwrite"):
        tuning._check_resumable(str(tmp_path), record, ignored=searched)


def test_searched_dimensions_follow_the_methods():
    options = TuneSettings()
    assert options.searched(TrainSettings(methods=())) == ("lr", "weight_decay")
    assert options.searched(TrainSettings(methods=("pskd",))) == (
        "pskd_alpha", "lr", "weight_decay")
    assert options.searched(TrainSettings(methods=("byot", "dmfl"))) == (
        "byot_alpha", "byot_lambda", "temperature", "lr", "weight_decay")
    assert options.objective_name(3) == "val_exit3_accuracy"
    assert TuneSettings(objective="val_loss").objective_direction() == "min"
    with pytest.raises(SettingsError, match="objective: got 'val_exit3_accuracy'; allowed: "
                                            "val_exit1_accuracy, val_exit2_accuracy, val_ens"):
        TuneSettings(objective="val_exit3_accuracy").check_objective(2)


def test_flagfile_reads_back_to_the_same_settings(tmp_path):
    settings = TrainSettings(
        dataset="folder:/data/with space", methods=(), byot_exits=(1, 2), augment=False,
        pskd_alpha=0.123456789012345, byot_lambda=3.3e-07, image_size=24,
        model_dir="/runs/best")
    path = tmp_path / "best.flags"
    path.write_text(tune_cli.flagfile_text(settings, "retrain\nthe winner"))
    flag_values = flags.FlagValues()
    train_flags.define_train_flags(flag_values)
    flag_values(["selfkd-train", f"--flagfile={path}"])
    assert train_flags.settings_from_flags(flag_values) == settings


@pytest.mark.parametrize("tune_overrides, flag, value", [
    # Trials that would train to NaN, or stop in an OverflowError traceback (T^2).
    ({"lr_range": (0.01, 1e39)}, "lr_range", "--lr=1e+39"),
    ({"temperature_choices": (3.0, 1e308)}, "temperature_choices", "--temperature=1e+308"),
    ({"weight_decay_range": (1e-46, 1e-3)}, "weight_decay_range", "--weight_decay=1e-46"),
])
def test_a_search_reaching_a_value_training_refuses_is_refused(tune_overrides, flag, value):
    settings = TrainSettings(dataset="npz:/data.npz", validation_fraction=0.1)
    options = TuneSettings(**tune_overrides)
    options.validate(settings)  # within what the search alone checks
    with pytest.raises(SettingsError) as error:
        tune_cli.check_search_values(settings, options)
    assert error.value.flag == flag
    assert error.value.problem.startswith(f"includes {value}, which selfkd-train refuses (")
    tune_cli.check_search_values(settings, TuneSettings())
