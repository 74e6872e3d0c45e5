"""The commands: settings, flags, help, flagfiles, run directories, output and bad input."""

import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import stat
import subprocess
import sys

import pytest
from absl import flags

from selfkd_tf.experiment import training as experiment
from selfkd_tf.cli import flags as train_flags
from selfkd_tf.cli import program
from selfkd_tf.rundir.layout import RUN_FILES
from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.errors import SettingsError
from support import (
    CONFIGS,
    REPO,
    environment,
    last_line,
    run_cli,
    tensorboard_scalars,
    write_learnable_npz,
)

# TensorFlow's C++ start-up messages on a machine without a GPU.
TF_NOISE = re.compile(r"absl::InitializeLog|cudart_stub|cuda drivers|cuInit|oneDNN|"
                      r"cpu_feature_guard|rebuild TensorFlow|^[IWEF]\d{4} ", re.M)


def users_environment(**changes) -> dict:
    """The environment of a user who set none of TensorFlow's variables."""
    quiet = ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", "SELFKD_VERBOSE_TF")
    return {**{k: v for k, v in os.environ.items() if k not in quiet}, **changes}

TINY = dict(arch="resnet18", width_multiplier=0.0625, num_stages=2, image_size=16,
            batch_size=32, epochs=1, lr=0.05, lr_schedule="constant")


def _parse(*argv) -> TrainSettings:
    flag_values = flags.FlagValues()
    train_flags.define_train_flags(flag_values)
    flag_values(["selfkd-train", *argv])
    return train_flags.settings_from_flags(flag_values)


def test_settings_round_trip_through_json():
    settings = TrainSettings(dataset="npz:/x.npz", methods=("byot",), byot_exits=(1, 2),
                             model_dir="/runs/a")
    assert TrainSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    with pytest.raises(SettingsError, match="unknown settings"):
        TrainSettings.from_json({"arch": "resnet18", "depth": 3})
    # Runs written before --stem existed used the CIFAR stem; new runs follow
    # the image size.
    old = settings.to_json()
    del old["stem"]
    assert TrainSettings.from_json(old).stem == "cifar" and settings.stem == "auto"


def test_every_float_setting_refuses_infinity_and_nan():
    """``inf`` passes a ``> 0`` check and trains to NaN (``--lr=inf`` did)."""
    floats = [f.name for f in dataclasses.fields(TrainSettings)
              if isinstance(getattr(TrainSettings(), f.name), float)]
    assert {"lr", "momentum", "weight_decay", "width_multiplier"} <= set(floats)
    for name in floats:
        for value in (math.inf, -math.inf, math.nan):
            with pytest.raises(SettingsError, match=f"^{name}: got .*finite") as error:
                dataclasses.replace(TrainSettings(), **{name: value}).validate()
            assert error.value.flag == name


@pytest.mark.parametrize("change, flag, allowed", [
    (dict(arch="resnet19"), "arch", "resnet18"),
    (dict(methods=("pskd", "kd")), "methods", "pskd, ls, byot, ds, dmfl"),
    (dict(num_stages=3, byot_exits=(3,)), "byot_exits", "1..2"),
    (dict(num_stages=5), "num_stages", "2, 3, 4"),
    (dict(epochs=-1), "epochs", "integers in [1, 1000000]"),
    (dict(batch_size=0), "batch_size", "integers in [1, 2147483647]"),
    # Huge numbers: tracebacks from NumPy and TensorFlow, or memory for
    # 2^31 evaluation epochs, before these bounds.
    (dict(seed=2**32), "seed", "integers in [0, 4294967295]"),
    (dict(seed=10**30), "seed", "integers in [0, 4294967295]"),
    (dict(subset_seed=2**63), "subset_seed", "integers in [0, 4294967295]"),
    (dict(epochs=2**31), "epochs", "integers in [1, 1000000]"),
    (dict(batch_size=2**63), "batch_size", "integers in [1, 2147483647]"),
    (dict(image_size=2**31), "image_size", "integers in [1, 4096]"),
    (dict(image_size=0), "image_size", "integers in [1, 4096]"),
    (dict(train_examples=0), "train_examples", "integers >= 1"),
    (dict(width_multiplier=1e30), "width_multiplier", "(0, 16]"),
    # Beyond float32 a setting becomes infinite; below it, 0 (frozen weights).
    (dict(lr=1e39), "lr", "within float32's range"),
    (dict(weight_decay=1e39), "weight_decay", "within float32's range"),
    (dict(byot_lambda=-1e39), "byot_lambda", "within float32's range"),
    (dict(lr=1e-46), "lr", "which float32 holds as 0"),
    # T^2 trained to NaN at 1e30 (an OverflowError traceback at 1e308).
    (dict(temperature=1e30), "temperature", "[0.01, 100]"),
    (dict(temperature=1e-30), "temperature", "[0.01, 100]"),
    (dict(exit_head="dense"), "exit_head", "bottleneck"),
    (dict(lr_schedule="step"), "lr_schedule", "multistep"),
    (dict(distribute="tpu"), "distribute", "mirrored"),
    (dict(mixed_precision="fp8"), "mixed_precision", "bfloat16"),
    (dict(dataset=""), "dataset", "folder:PATH"),
    (dict(pskd_alpha=2.0), "pskd_alpha", "[0, 1]"),
    (dict(methods=("byot",), table_top_k=2), "table_top_k", "keeps none"),
    (dict(stem="resnet"), "stem", "auto, cifar, imagenet"),
    (dict(augmentation="autoaugment"), "augmentation", "cifar, imagenet, none"),
    (dict(augment=False, augmentation="imagenet"), "augment", "give one of them"),
    (dict(cache="disk"), "cache", "auto, memory, none"),
])
def test_validate_names_the_flag_and_the_allowed_values(change, flag, allowed):
    with pytest.raises(SettingsError) as error:
        dataclasses.replace(TrainSettings(), **change).validate()
    assert error.value.flag == flag
    assert allowed in error.value.problem
    assert "\n" not in str(error.value)


def test_the_largest_allowed_numbers_are_valid():
    dataclasses.replace(
        TrainSettings(), seed=2**32 - 1, subset_seed=2**32 - 1, epochs=10**6,
        batch_size=2**31 - 1, image_size=4096, width_multiplier=16.0,
        train_examples=10**30, eval_examples=10**30, eval_every=10**30,
        save_every_steps=10**30, lr=1e38, byot_lambda=1e-40, temperature=100.0).validate()


def test_every_setting_is_a_flag_with_its_default():
    assert _parse() == TrainSettings()
    settings = _parse("--methods=", "--byot_exits=2,1", "--epochs=7", "--noaugment",
                      "--exit_head=attention", "--width_multiplier=0.5")
    assert settings.methods == ()
    assert settings.byot_exits == (2, 1)
    assert (settings.epochs, settings.augment) == (7, False)
    assert settings.effective_augmentation() == "none"
    assert _parse("--augmentation=imagenet").effective_augmentation() == "imagenet"
    assert (settings.exit_head, settings.width_multiplier) == ("attention", 0.5)
    with pytest.raises(SettingsError, match="byot_exits"):
        _parse("--byot_exits=1,x")


TRAIN_CONFIGS = ("cifar100_resnet18.flags", "cifar100_resnet50.flags",
                 "cifar100_resnext50.flags", "smoke.flags", "cifar10_cpu.flags",
                 "imagenet_resnet50.flags")


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_flagfiles_parse_to_valid_settings(config):
    settings = _parse(f"--flagfile={CONFIGS / config}", "--dataset=npz:/data.npz")
    settings.validate()
    if config.startswith("cifar100_"):
        assert (settings.epochs, settings.batch_size, settings.lr) == (300, 128, 0.1)
        assert (settings.lr_schedule, settings.nesterov, settings.weight_decay) == (
            "multistep", True, 5e-4)
        assert settings.methods == ("pskd", "byot", "dmfl")
        assert _parse(f"--flagfile={CONFIGS / config}", "--methods=").methods == ()
    # Data-less configs make the user name the data: no surprise downloads.
    if config in ("smoke.flags", "cifar10_cpu.flags"):
        with pytest.raises(SettingsError, match="dataset"):
            _parse(f"--flagfile={CONFIGS / config}").validate()


def test_bad_data_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    settings = TrainSettings(dataset=f"npz:{tmp_path / 'missing.npz'}",
                             model_dir=str(run_dir), **TINY)
    with pytest.raises(SettingsError) as error:
        experiment.train(settings)
    assert error.value.flag == "dataset" and "does not exist" in error.value.problem
    assert not run_dir.exists()


def test_train_writes_a_run_and_never_overwrites_it_silently(tmp_path):
    dataset = write_learnable_npz(tmp_path / "tiny.npz")
    run_dir = tmp_path / "run"
    # As a user runs it: no variable quiets TensorFlow, no GPU is hidden.
    result = run_cli(
        "selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
        f"--dataset={dataset}", f"--model_dir={run_dir}", "--save_every_steps=1",
        env=users_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not TF_NOISE.search(result.stderr), result.stderr
    assert sorted(os.listdir(run_dir)) == sorted(RUN_FILES)
    # Every run file readable like any other output (model.keras was owner-only).
    modes = {name: stat.S_IMODE(os.stat(run_dir / name).st_mode)
             for name in ("flags.json", "data.json", "metrics.json", "model.keras")}
    assert set(modes.values()) == {0o644}, modes

    # The one-line epoch summaries, numbered as the history and TensorBoard.
    summaries = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in summaries] == ["1/2", "2/2"]
    assert "val acc exit1" in summaries[-1] and "ensemble" in summaries[-1]
    # a_t = 0.4 in the first epoch, but with no stored prediction yet the
    # targets are one-hot: the teacher's weight applied is 0.
    assert summaries[0].endswith("| lr 0.05 alpha_t 0")
    assert "byot" in summaries[-1] and summaries[-1].endswith("| lr 0.05 alpha_t 0.8")
    # Not a terminal: no progress bar, whose colour codes and line per step
    # filled log files.
    assert "\x1b[" not in result.stdout and "\r" not in result.stdout
    assert not re.search(r"^\s*\d+/\d+ ", result.stdout, re.M)
    # smoke.flags asks for 128 training and 64 test images of 64 and 32.
    assert result.stdout.splitlines()[:2] == [
        "--train_examples=128 is more than the training split holds; using all 64 examples",
        "--eval_examples=64 is more than the test split holds; using all 32 examples"]

    # The final table, then where the run is and what to do next.
    lines = result.stdout.splitlines()
    table_end = next(i for i, line in enumerate(lines) if line.startswith("ensemble"))
    assert lines[table_end + 1:] == ["", *f"""\
Run directory: {run_dir}
  model:    {run_dir}/model.keras
  metrics:  {run_dir}/metrics.json
  history:  {run_dir}/history.csv
Next:
  selfkd-eval --model={run_dir}  # every exit on the whole evaluation split
  selfkd-export --model={run_dir} --out={run_dir}/export  # SavedModel of the deepest exit
  selfkd-report --runs={run_dir} --out={run_dir}/report  # tables and figures
  tensorboard --logdir={run_dir}/tensorboard""".splitlines()]
    assert f"{dataset} (test split, 32 examples):" in lines

    flags_json = json.loads((run_dir / "flags.json").read_text())
    assert flags_json["dataset"] == dataset and flags_json["epochs"] == 2
    # The numbers of examples used, not asked for.
    assert (flags_json["train_examples"], flags_json["eval_examples"]) == (64, 32)
    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert [float(row["alpha_t"]) for row in history] == [0.0, pytest.approx(0.8)]
    scalars = tensorboard_scalars(str(run_dir / "tensorboard"))
    assert sorted(scalars["train/epoch_alpha_t"]) == [1, 2]
    assert not any("learning_rate" in tag for tag in scalars)
    assert all(float(row["epoch_time_s"]) > 0 for row in history)
    assert {"loss", "ce", "byot", "dmfl", "lr", "alpha_t", "exit1_accuracy",
            "val_exit2_accuracy", "val_ensemble_accuracy"} <= set(history[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["num_exits"], metrics["epochs"], metrics["split"]) == (2, 2, "test")
    assert metrics["methods"] == ["pskd", "byot", "dmfl"]
    assert metrics["train_time_s"] > 0 and metrics["params"] > 0
    assert [e["exit"] for e in metrics["exits"]] == [1, 2]

    # Rerunning the finished run returns its metrics, untouched.
    settings = TrainSettings.from_json(flags_json)
    mtime = os.path.getmtime(run_dir / "metrics.json")
    assert experiment.train(settings) == metrics
    # So does the command as it was given, asking for more than there is.
    assert experiment.train(dataclasses.replace(
        settings, train_examples=128, eval_examples=64)) == metrics
    assert os.path.getmtime(run_dir / "metrics.json") == mtime
    # Settings that change the result are refused, naming the differences.
    with pytest.raises(SettingsError) as error:
        experiment.train(dataclasses.replace(settings, arch="resnet34", lr=0.1))
    assert error.value.flag == "model_dir"
    assert "--arch: 'resnet18' -> 'resnet34'" in error.value.problem
    assert "--lr" in error.value.problem and "--overwrite" in error.value.problem
    assert json.loads((run_dir / "flags.json").read_text()) == flags_json
    # Files of a run without its flags.json are not adopted either.
    (run_dir / "flags.json").unlink()
    with pytest.raises(SettingsError, match="no flags.json"):
        experiment.train(settings)


@pytest.mark.parametrize("flag, message", [
    ("--arch=resnet19", "--arch: got 'resnet19'; allowed: resnet18, resnet34"),
    # Was a 35-line traceback from NumPy's seeding, exit status 1.
    ("--seed=4294967296", "--seed: got 4294967296; allowed: integers in [0, 4294967295]"),
])
def test_bad_flag_is_one_error_line_and_exit_status_2(tmp_path, flag, message):
    run_dir = tmp_path / "run"
    result = run_cli("selfkd_tf.cli.train", flag, "--dataset=npz:/x.npz",
                     f"--model_dir={run_dir}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "FATAL" not in result.stderr
    assert last_line(result.stderr).startswith(f"selfkd-train: error: {message}")
    assert not run_dir.exists()


COMMANDS = [
    # (module, program, a flag of its own with a piece of its help text)
    ("train", "selfkd-train", "--pskd_alpha: PS-KD: final weight a_T"),
    ("evaluate", "selfkd-eval", "--model: A run directory or a .keras file."),
    ("export", "selfkd-export", "--out: The SavedModel directory to write."),
    ("tune", "selfkd-tune", "--max_trials: Trials to run."),
    ("report", "selfkd-report", "--metrics_file: The scores of each run to report"),
]


def run_installed(module: str, program_name: str, *args: str) -> subprocess.CompletedProcess:
    """Runs a command as its installed console script does: ``run()`` of an
    imported module, with the program's name as ``sys.argv[0]``."""
    code = (f"import sys; sys.argv[0] = {program_name!r}; "
            f"from selfkd_tf.cli.{module} import run; run()")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO,
                          env=users_environment(), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("module, program_name, own_flag", COMMANDS)
def test_help_lists_the_commands_own_flags_and_exits_0(module, program_name, own_flag):
    result = run_installed(module, program_name, "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"``{program_name}``: ")  # the description
    assert f"\n{program_name} flags:\n" in result.stdout
    assert own_flag in result.stdout
    # absl's, TensorFlow's and absltest's flags are left to --helpfull.
    for foreign in ("--pdb_post_mortem", "--verbosity", "--tpu", "--test_srcdir",
                    "--helpxml"):
        assert foreign not in result.stdout
    assert "--helpfull" in result.stdout


def test_helpshort_and_helpfull_exit_0():
    short = run_cli("selfkd_tf.cli.tune", "--helpshort")
    assert (short.returncode, short.stderr) == (0, "")
    # selfkd-tune takes every selfkd-train flag too.
    assert "--pskd_alpha_range: LOW,HIGH" in short.stdout and "--arch:" in short.stdout
    assert "--pdb_post_mortem" not in short.stdout
    full = run_cli("selfkd_tf.cli.tune", "--helpfull")
    assert (full.returncode, full.stderr) == (0, "")
    assert "--pskd_alpha_range" in full.stdout and "--pdb_post_mortem" in full.stdout


def test_tensorflow_start_up_messages_only_on_request(tmp_path):
    # A command that imports TensorFlow, then stops at a bad flag.
    args = (f"--model={tmp_path / 'absent'}", f"--out={tmp_path / 'export'}")
    quiet = run_cli("selfkd_tf.cli.export", *args, env=users_environment())
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [last_line(quiet.stderr)]
    assert last_line(quiet.stderr).startswith("selfkd-export: error: --model:")
    for switch in ({"SELFKD_VERBOSE_TF": "1"}, {"TF_CPP_MIN_LOG_LEVEL": "0"}):
        verbose = run_cli("selfkd_tf.cli.export", *args, env=users_environment(**switch))
        assert verbose.returncode == 2
        assert TF_NOISE.search(verbose.stderr), (switch, verbose.stderr)
        assert last_line(verbose.stderr) == last_line(quiet.stderr)


BAD_FLAGFILES = [
    # (content, what the one-line error says after "<file>")
    (b"\xff\xfe--epochs=3\n", ": not UTF-8 text (byte 0xff at offset 0)"),
    (b"--epochs=3\n\x00\x00\n", ":2: control character '\\x00'"),
    (b"# a comment\n\nepochs=3\n", ":3: 'epochs=3' is not a flag"),
    (b"--epochs=3\n" * (program.FLAGFILE_MAX_BYTES // 11 + 1),
     f": larger than {program.FLAGFILE_MAX_BYTES} bytes"),
]


@pytest.mark.parametrize("content, problem", BAD_FLAGFILES)
def test_flagfile_that_is_not_flags_is_refused_by_name(tmp_path, content, problem):
    path = tmp_path / "bad.flags"
    path.write_bytes(content)
    with pytest.raises(program.FlagfileError) as error:
        program.check_flagfiles(["--epochs=1", f"--flagfile={path}"])
    assert str(error.value).startswith(f"{path}{problem}")
    assert "\n" not in str(error.value)


def test_flagfile_includes_are_checked_and_loops_refused(tmp_path, monkeypatch):
    a, b = tmp_path / "a.flags", tmp_path / "b.flags"
    a.write_text(f"--epochs=2\n--flagfile={b}\n")
    b.write_text("# loops back\n--flagfile=a.flags\n")
    monkeypatch.chdir(tmp_path)  # nested names are relative to the directory, as in absl
    with pytest.raises(program.FlagfileError, match=r"a.flags: includes itself \(.*a.flags -> "
                       r".*b.flags -> .*a.flags\)"):
        program.check_flagfiles(["--flagfile", str(a)])
    b.write_text("--flagfile=missing.flags\n")
    with pytest.raises(program.FlagfileError, match="missing.flags: no such file"):
        program.check_flagfiles([f"--flagfile={a}"])
    with pytest.raises(program.FlagfileError, match="is a directory"):
        program.check_flagfiles([f"-flagfile={tmp_path}"])
    # Every shipped config passes, nested includes (relative to the root) too.
    monkeypatch.chdir(REPO)
    program.check_flagfiles([f"--flagfile={path}" for path in CONFIGS.glob("*.flags")])


@pytest.mark.parametrize("module", ["report", "train"])
def test_bad_flagfile_is_one_error_line_and_exit_status_2(tmp_path, module):
    flagfile = tmp_path / "bad.flags"
    flagfile.write_bytes(b"--epochs=2\n\x89PNG\r\n\x1a\n\x00\x00")
    out = tmp_path / "out"
    result = run_cli(f"selfkd_tf.cli.{module}", f"--flagfile={flagfile}",
                     f"--runs={tmp_path}" if module == "report" else "--dataset=digits",
                     f"--out={out}" if module == "report" else f"--model_dir={out}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"selfkd-{'report' if module == 'report' else 'train'}: error: --flagfile: "
        f"{flagfile}: not UTF-8 text (byte 0x89 at offset 11); a flagfile holds one "
        "--name=value per line"]
    assert not out.exists()


def test_ctrl_c_in_any_command_is_one_line_and_exit_130():
    # The wrapper every selfkd-* command runs through, with a main that is
    # interrupted (as Ctrl-C in selfkd-eval's or selfkd-export's work would).
    script = (
        "from selfkd_tf.cli import program\n"
        "def main(argv):\n"
        "    raise KeyboardInterrupt\n"
        "program.run(main, 'selfkd-thing')\n")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=environment(),
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 130
    assert result.stderr.strip() == "selfkd-thing: error: interrupted"


def test_readme_lists_every_training_flag():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = "\n".join(line for line in readme.splitlines()
                      if line.startswith("- **") and "`--" in line)
    listed = set(re.findall(r"`--(\w+)`", block))
    missing = [f.name for f in dataclasses.fields(TrainSettings) if f.name not in listed]
    assert not missing, f"README's flag list lacks --{', --'.join(missing)}"


def test_a_1000_class_folder_trains_evaluates_and_exports(tmp_path):
    """ImageNet's class count end to end, on 3,000 tiny JPEGs read from their
    files as training goes; training ends with its evaluation on the test
    split (selfkd-eval of a run: tests/test_trained_runs.py)."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", 2), ("test", 1)):
        for label in range(1000):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{number}.JPEG", quality=90)
    run_dir = tmp_path / "run"
    trained = run_cli(
        "selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
        f"--dataset=folder:{root}", f"--model_dir={run_dir}", "--cache=none",
        "--image_size=8", "--epochs=1", "--batch_size=500", "--train_examples=2000",
        "--eval_examples=1000", "--methods=pskd,byot,dmfl")
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["num_examples"], metrics["split"]) == (1000, "test")
    data_record = json.loads((run_dir / "data.json").read_text())
    assert (data_record["num_train"], data_record["num_classes"]) == (2000, 1000)

    exported = run_cli("selfkd_tf.cli.export", f"--model={run_dir}",
                       f"--out={tmp_path / 'export'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    served = tf.saved_model.load(str(tmp_path / "export"))
    answer = served.serve(tf.zeros([2, 8, 8, 3]) + 128.0)
    assert answer["probabilities"].shape == (2, 1000)
    assert answer["class_names"].numpy()[0].decode() in {
        f"n{label:08d}" for label in range(1000)}
