"""Report tables and figures from synthetic run directories."""

import json
import logging
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from selfkd_tf.report import tables as report

from selfkd_tf.report import figures as report_figures

from selfkd_tf.report import runs as runs_lib
from selfkd_tf.rundir.reading import RunDirectoryError
from selfkd_tf.metrics.record import build_metrics_record, write_metrics_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(path, *, methods, num_exits, dataset="cifar100", seed=0,
             train_time_s=None, epochs=3, width=None, epoch_times=None,
             num_examples=120, image_size=None, first_epoch=1):
    """Writes a run directory and returns its metrics record.

    `flags.json` is written when `width` is given, `history.csv` when
    `epoch_times` is (one row per epoch, numbered from `first_epoch`).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=num_examples)
    exit_probs = []
    for depth in range(num_exits):
        # Deeper exits see a stronger signal, so they are more accurate.
        logits = rng.normal(size=(num_examples, 10))
        logits[np.arange(num_examples), labels] += 0.5 + depth
        probs = np.exp(logits)
        exit_probs.append(probs / probs.sum(axis=1, keepdims=True))
    record = build_metrics_record(
        exit_probs, labels, dataset=dataset, split="test", arch="resnet18",
        methods=methods, params=1000, train_time_s=train_time_s, epochs=epochs)
    os.makedirs(path)
    write_metrics_json(record, os.path.join(path, "metrics.json"))
    if width is not None:
        flags = {"arch": "resnet18", "methods": ",".join(methods),
                 "dataset": dataset, "width_multiplier": width,
                 "epochs": epochs, "seed": seed, "image_size": image_size}
        with open(os.path.join(path, "flags.json"), "w") as f:
            json.dump(flags, f)
    if epoch_times is not None:
        exits = range(1, num_exits + 1)
        terms = [m for m in ("byot", "dmfl") if m in methods]
        columns = ["epoch", "loss", "ce", *terms, "alpha_t", "lr",
                   *(f"exit{i}_accuracy" for i in exits), "ensemble_accuracy",
                   "val_loss", *(f"val_exit{i}_accuracy" for i in exits),
                   "val_ensemble_accuracy", "epoch_time_s"]
        lines = [",".join(columns)]
        for epoch, seconds in enumerate(epoch_times, start=first_epoch):
            values = [epoch, *rng.random(len(columns) - 2), seconds]
            lines.append(",".join(str(v) for v in values))
        with open(os.path.join(path, "history.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return record


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Three runs under `runs/`, plus a non-run directory.

    * `resnet18_baseline`: 1 exit, timing in metrics.json (3725 s, 5 epochs).
    * `resnet18_all`: 4 exits, width 0.5, timing only in history.csv.
    * `other/seed0`: CIFAR-10, 3 exits, no flags, no history, no timing.
    """
    root = tmp_path_factory.mktemp("report") / "runs"
    records = {
        "resnet18_baseline": make_run(
            root / "resnet18_baseline", methods=[], num_exits=1,
            train_time_s=3725.0, epochs=5, width=1.0,
            epoch_times=[700, 700, 790, 700, 700]),
        "resnet18_all": make_run(
            root / "resnet18_all", methods=["dmfl", "pskd", "byot"],
            num_exits=4, seed=1, width=0.5, epoch_times=[10.0, 11.0, 40.0]),
        "seed0": make_run(root / "other" / "seed0", methods=["pskd"],
                          num_exits=3, seed=2, dataset="cifar10"),
    }
    (root / "notes").mkdir()
    return root, records


def load(specs):
    """The runs `runs_lib.load_runs` reports, checking it skipped none."""
    found = runs_lib.load_runs(specs)
    assert found.skipped == []
    return found.runs


def parse_tables(markdown):
    """`{section heading: [row dict, ...]}` of a Markdown report."""
    tables, heading, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading, header = line[3:], None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[heading] = []
            elif set(cells) != {"---"} and set(cells) != {"---", "---:"}:
                tables[heading].append(dict(zip(header, cells, strict=True)))
    return tables


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_method_label():
    assert runs_lib.method_label([]) == "Baseline"
    assert runs_lib.method_label(["dmfl", "byot", "pskd"]) == "+PS-KD+BYOT+DMFL"
    assert runs_lib.method_label(["mixup", "BYOT"]) == "+BYOT+MIXUP"


def test_load_runs_finds_and_names_runs(runs_dir):
    root, _ = runs_dir
    runs = load([str(root)])
    # Sorted walk order; `notes` holds no run and is skipped.
    assert [r.name for r in runs] == ["seed0", "resnet18_all", "resnet18_baseline"]
    # Globs and repeated runs: first occurrence kept.
    runs = load([str(root / "resnet18_*"), str(root / "resnet18_all")])
    assert [r.name for r in runs] == ["resnet18_all", "resnet18_baseline"]
    assert runs[0].flags["width_multiplier"] == 0.5
    assert runs[0].history["epoch_time_s"].tolist() == [10.0, 11.0, 40.0]


def test_runs_sharing_a_base_name_get_longer_names(tmp_path):
    for parent in ("a", "b"):
        make_run(tmp_path / parent / "seed0", methods=[], num_exits=1)
    runs = load([str(tmp_path)])
    assert [r.name for r in runs] == ["a/seed0", "b/seed0"]
    assert [r.file_stem for r in runs] == ["a-seed0", "b-seed0"]


def test_table1_numbers(runs_dir):
    root, records = runs_dir
    text = report.table1_markdown(load([str(root)]))
    tables = parse_tables(text)
    assert list(tables) == ["cifar10 (test)", "cifar100 (test)"]
    rows = {row["Run"]: row for rows in tables.values() for row in rows}
    for name, record in records.items():
        deepest = record["exits"][-1]
        # Half a unit of the last printed digit: 2 decimals, NLL 3.
        for column, key, tolerance in [
            ("Top-1 err (%)", "top1_err", 0.005),
            ("Top-5 err (%)", "top5_err", 0.005),
            ("NLL", "nll", 0.0005),
            ("ECE (%)", "ece", 0.005),
            ("AURC (x1000)", "aurc", 0.005),
        ]:
            assert float(rows[name][column]) == pytest.approx(
                deepest[key], abs=tolerance), (name, column)
    baseline, combined, other = (rows[n] for n in records)
    assert (baseline["Model"], baseline["Method"]) == ("resnet18", "Baseline")
    # 3725 s = 1 h 2 min 5 s (metrics.json wins over history's sum); per
    # epoch the median of history's 700, 700, 790, 700, 700 s, not the mean.
    assert baseline["Train time (h:mm:ss)"] == "1:02:05"
    assert baseline["Time / epoch (s)"] == "700.0"
    assert combined["Model"] == "resnet18 (width 0.5)"
    assert combined["Method"] == "+PS-KD+BYOT+DMFL"
    # No timing in metrics.json: history's 10 + 11 + 40 s, median 11 s.
    assert combined["Train time (h:mm:ss)"] == "0:01:01"
    assert combined["Time / epoch (s)"] == "11.0"
    assert other["Train time (h:mm:ss)"] == other["Time / epoch (s)"] == "n/a"


def test_table2_numbers(runs_dir):
    root, records = runs_dir
    tables = parse_tables(report.table2_markdown(load([str(root)])))
    cifar100 = {row["Run"]: row for row in tables["cifar100 (test)"]}
    exit_columns = ["Exit 1 (stage 1)", "Exit 2 (stage 2)", "Exit 3 (stage 3)",
                    "Exit 4 (deepest)"]
    assert list(cifar100["resnet18_all"]) == [
        "Run", "Model", "Method", *exit_columns, "Ensemble"]
    record = records["resnet18_all"]
    accuracies = [float(cifar100["resnet18_all"][c]) for c in exit_columns]
    expected = [100 - e["top1_err"] for e in record["exits"]]
    assert accuracies == pytest.approx(expected, abs=0.005)
    assert float(cifar100["resnet18_all"]["Ensemble"]) == pytest.approx(
        100 - record["ensemble"]["top1_err"], abs=0.005)
    # The single-exit baseline sits under "deepest", with no ensemble.
    baseline = cifar100["resnet18_baseline"]
    assert [baseline[c] for c in exit_columns[:3]] == ["", "", ""]
    assert float(baseline["Exit 4 (deepest)"]) == pytest.approx(
        100 - records["resnet18_baseline"]["exits"][0]["top1_err"], abs=0.005)
    assert baseline["Ensemble"] == ""
    (cifar10,) = tables["cifar10 (test)"]
    assert list(cifar10)[3:] == ["Exit 1 (stage 1)", "Exit 2 (stage 2)",
                                 "Exit 3 (deepest)", "Ensemble"]


def test_write_report_outputs(runs_dir, tmp_path, caplog):
    root, _ = runs_dir
    runs = load([str(root)])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="selfkd_tf.report.tables"):
        written = report.write_report(runs, str(out))
    expected = {"table1.md", "table2.md", "figure2.png",
                "reliability_seed0.png", "reliability_resnet18_all.png",
                "reliability_resnet18_baseline.png",
                "curves_resnet18_all.png", "curves_resnet18_baseline.png"}
    assert {os.path.basename(p) for p in written} == expected
    assert set(os.listdir(out)) == expected
    for name in expected - {"table1.md", "table2.md"}:
        assert_png(out / name)
    # `seed0` has no history.csv: no curves, one warning naming the run.
    assert "seed0" in caplog.text and "curves_seed0.png" in caplog.text


def test_runs_without_timing_still_get_figure2(tmp_path):
    make_run(tmp_path / "run", methods=[], num_exits=1)
    report_figures.plot_figure2(load([str(tmp_path / "run")]),
                        str(tmp_path / "figure2.png"))
    assert_png(tmp_path / "figure2.png")


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "no metrics.json: training has not finished"),
        ("{not json", "is not valid JSON"),
        ('{"arch": "resnet18"}', "missing dataset, split, methods"),
    ],
)
def test_unusable_runs_are_skipped_with_the_reason(tmp_path, content, reason):
    make_run(tmp_path / "done", methods=[], num_exits=1)
    run = tmp_path / "broken"
    run.mkdir()
    (run / "history.csv").write_text("epoch,val_accuracy\n1,0.5\n")
    if content is not None:
        (run / "metrics.json").write_text(content)
    found = runs_lib.load_runs([str(tmp_path)])
    assert [r.name for r in found.runs] == ["done"]
    (skipped,) = found.skipped
    assert skipped.path == str(run)
    assert reason in skipped.reason and "\n" not in skipped.reason


def test_specs_without_runs_raise(runs_dir, tmp_path):
    root, _ = runs_dir
    with pytest.raises(RunDirectoryError, match="no run directory inside"):
        load([str(root / "notes")])
    with pytest.raises(RunDirectoryError, match="no such directory"):
        load([str(tmp_path / "absent")])
    with pytest.raises(RunDirectoryError, match="pattern matches no run"):
        load([str(root / "notes*")])


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "selfkd_tf.cli.report", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_writes_report(runs_dir, tmp_path):
    root, records = runs_dir
    out = tmp_path / "report"
    result = run_cli(f"--runs={root}/resnet18_*,{root}/other", f"--out={out}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(
        str(out / name) for name in os.listdir(out))
    assert len(os.listdir(out)) == 8
    assert_png(out / "figure2.png")
    rows = parse_tables((out / "table1.md").read_text())["cifar100 (test)"]
    row = next(r for r in rows if r["Run"] == "resnet18_all")
    assert float(row["Top-1 err (%)"]) == pytest.approx(
        records["resnet18_all"]["exits"][-1]["top1_err"], abs=0.005)


def test_cli_reports_finished_runs_and_names_the_skipped_ones(runs_dir, tmp_path):
    root, _ = runs_dir
    unfinished = tmp_path / "still_training"
    unfinished.mkdir()
    (unfinished / "flags.json").write_text('{"arch": "resnet18"}')
    out = tmp_path / "report"
    result = run_cli(f"--runs={root},{unfinished}", f"--out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"selfkd-report: skipped {unfinished}: no metrics.json: training has not "
        "finished (still running, or interrupted: rerun selfkd-train to resume)",
        f"selfkd-report: {root}/other/seed0: no accuracy column in history.csv, "
        "curves_seed0.png not written"]
    assert len(os.listdir(out)) == 8
    for table in ("table1.md", "table2.md"):
        text = (out / table).read_text()
        assert f"- `{unfinished}`: no metrics.json" in text
        assert "still_training" not in str(parse_tables(text))


def test_cli_without_a_reportable_run_fails_in_one_line(tmp_path):
    unfinished = tmp_path / "runs" / "a"
    unfinished.mkdir(parents=True)
    (unfinished / "flags.json").write_text("{}")
    out = tmp_path / "report"
    for spec, message in [
        (tmp_path / "runs", "selfkd-report: error: no run to report"),
        (tmp_path / "absent", f"selfkd-report: error: {tmp_path / 'absent'}: no such directory"),
    ]:
        result = run_cli(f"--runs={spec}", f"--out={out}", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1].startswith(message), result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists() and result.stdout == ""


def test_symbolic_links_are_followed_once_and_loops_end(tmp_path):
    real = tmp_path / "elsewhere"
    make_run(real / "seed0", methods=["pskd"], num_exits=2)
    root = tmp_path / "runs"
    make_run(root / "baseline", methods=[], num_exits=2)
    os.symlink(real, root / "linked")            # a directory of runs
    os.symlink(real / "seed0", root / "again")   # the same run a second time
    os.symlink(root, root / "baseline_loop")     # a loop back to the top
    found = runs_lib.load_runs([str(root)])
    assert found.skipped == []
    # Named by the path as found; the run reached twice is listed once.
    assert [r.name for r in found.runs] == ["again", "baseline"]
    assert found.runs[0].path == str(root / "again")


def test_tables_say_when_runs_are_not_comparable(tmp_path):
    make_run(tmp_path / "a", methods=[], num_exits=4, width=1.0, num_examples=120)
    make_run(tmp_path / "b", methods=["pskd"], num_exits=4, width=1.0, num_examples=60)
    make_run(tmp_path / "c", methods=["pskd"], num_exits=2, width=1.0, image_size=16)
    make_run(tmp_path / "d", methods=[], num_exits=4, dataset="cifar10")
    found = load([str(tmp_path)])
    assert report.incomparable([r for r in found if r.name in "ab"]) == [
        "numbers of scored examples differ (120: a; 60: b)"]
    for markdown in (report.table1_markdown(found), report.table2_markdown(found)):
        assert ("**Not comparable:** numbers of scored examples differ (120: a, c; "
                "60: b); image sizes differ (native: a, b; 16: c); numbers of exits "
                "differ (4: a, b; 2: c).") in markdown
        # The lone cifar10 run is compared with nothing; the tables are separate.
        assert markdown.count("Not comparable") == 1
        assert "numbers from different tables are not comparable" in markdown
    same = load([str(tmp_path / "b"), str(tmp_path / "b")])
    assert "not comparable" not in report.table1_markdown(same).lower()


def test_curves_number_epochs_from_1_in_old_and_new_histories(tmp_path):
    # Runs number history rows from 1; older runs (keras CSVLogger) from 0.
    make_run(tmp_path / "new", methods=[], num_exits=2, epoch_times=[1, 1, 1])
    make_run(tmp_path / "old", methods=[], num_exits=2, epoch_times=[1, 1, 1],
             first_epoch=0)
    new, old = load([str(tmp_path / "new"), str(tmp_path / "old")])
    assert new.history["epoch"].tolist() == [1, 2, 3]
    assert old.history["epoch"].tolist() == [0, 1, 2]
    assert new.epoch_numbers().tolist() == old.epoch_numbers().tolist() == [1, 2, 3]


def test_the_report_command_does_not_load_tensorflow():
    code = ("import sys; import selfkd_tf.cli.report; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def write_train_record(path, *, methods, num_exits, seed=0):
    """A training-split record beside a `make_run` run's metrics.json."""
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 10, size=200)
    probs = [np.eye(10)[labels] * 0.9 + 0.01 for _ in range(num_exits)]
    probs[0] = np.full((200, 10), 0.1)
    record = build_metrics_record(probs, labels, dataset="cifar100", split="train",
                                  arch="resnet18", methods=methods, params=1000,
                                  epochs=3)
    write_metrics_json(record, os.path.join(path, "metrics_train.json"))


@pytest.fixture
def two_studies(tmp_path):
    """`s1/{baseline,pskd}_seed0`, with training records, and `mix`, holding
    a run of its own."""
    root = tmp_path / "x"
    for name, methods, seed in [("s1/baseline_seed0", [], 0), ("s1/pskd_seed0", ["pskd"], 1),
                                ("mix/pskd_seed2", ["pskd"], 2)]:
        make_run(root / name, methods=methods, num_exits=2, seed=seed, width=1.0)
        write_train_record(root / name, methods=methods, num_exits=2, seed=seed)
    return root


@pytest.mark.parametrize("flag, value, problem", [
    # Every run would read one file: baseline_seed0's training accuracy.
    ("train_metrics_file", "{root}/s1/baseline_seed0/metrics_train.json",
     "a path, not a file name"),
    ("train_metrics_file", "../baseline_seed0/metrics_train.json",
     "a path, not a file name"),
    ("train_metrics_file", ".", "a directory, not a file name"),
    # The --runs folder itself would be a run holding another run's scores.
    ("metrics_file", "{root}/s1/baseline_seed0/metrics.json", "a path, not a file name"),
    ("metrics_file", "..", "a directory, not a file name"),
    ("metrics_file", "", "empty"),
    ("metrics_file", "metrics\n.json",
     "not a file name (it holds a control character)"),
])
def test_cli_refuses_a_path_as_a_record_name(two_studies, tmp_path, flag, value, problem):
    value = value.format(root=two_studies)
    out = tmp_path / "report"
    result = run_cli(f"--runs={two_studies}/mix", f"--{flag}={value}", f"--out={out}",
                     cwd=two_studies / "mix" / "pskd_seed2")
    shown = " ".join(value.split())  # one line
    assert (result.returncode, result.stderr.splitlines(), result.stdout) == (2, [
        f"selfkd-report: error: flag --{flag}={shown}: {problem}: give the name of "
        "a file inside each run directory, so that every run reads its own record"], "")
    assert not out.exists()


def test_read_train_metrics_refuses_a_path(two_studies):
    from selfkd_tf.report import seeds as seed_summary
    runs = load([str(two_studies / "mix")])
    path = str(two_studies / "s1" / "baseline_seed0" / "metrics_train.json")
    for name in (path, "../baseline_seed0/metrics_train.json"):
        with pytest.raises(ValueError, match="is a path, not a file name"):
            seed_summary.read_train_metrics(runs, name)


def test_cli_refuses_a_reported_record_of_another_run(two_studies, tmp_path):
    baseline = two_studies / "s1" / "baseline_seed0"
    # Methods in flags.json as older runs wrote them: a comma-separated string.
    assert json.loads((baseline / "flags.json").read_text())["methods"] == ""
    (baseline / "metrics.json").write_bytes(
        (two_studies / "mix" / "pskd_seed2" / "metrics.json").read_bytes())
    out = tmp_path / "report"
    result = run_cli(f"--runs={two_studies}/s1", f"--out={out}", cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        f"selfkd-report: error: --metrics_file: {baseline}/metrics.json: methods "
        "+PS-KD in the record, Baseline in the run's flags.json: the record is not "
        "of this run's model (copied from another run, or written before the run "
        "was trained again)"])
    assert not out.exists()


def write_history(path, rows):
    """history.csv as runs write it: `NA` where an epoch was not evaluated."""
    columns = ["epoch", "exit1_accuracy", "exit2_accuracy",
               "val_exit1_accuracy", "val_exit2_accuracy"]
    lines = [",".join(columns)] + [",".join(map(str, row)) for row in rows]
    (path / "history.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("flags, scored", [
    ({"validation_fraction": 0.0}, "test split"),
    ({"validation_fraction": 0.1}, "validation split"),
    ({"validation_fraction": 0.0, "eval_examples": 1000}, "test split (1000 examples)"),
    (None, "evaluation split"),   # no flags.json: unknown
])
def test_curves_name_the_split_scored_while_training(tmp_path, flags, scored):
    make_run(tmp_path / "run", methods=[], num_exits=2, epoch_times=[1, 1])
    if flags is not None:
        (tmp_path / "run" / "flags.json").write_text(json.dumps(
            {"arch": "resnet18", "methods": [], "epochs": 3, "seed": 0, **flags}))
    (run,) = load([str(tmp_path / "run")])
    figure = report_figures.plot_curves(run, str(tmp_path / "curves.png"))
    assert figure.axes[0].get_title().splitlines()[-1] == (
        f"solid: {scored}; dashed: training batches")
    assert_png(tmp_path / "curves.png")


def test_curves_of_two_epochs_have_whole_epoch_ticks(tmp_path):
    make_run(tmp_path / "run", methods=[], num_exits=2, epoch_times=[1, 1])
    figure = report_figures.plot_curves(load([str(tmp_path / "run")])[0],
                                        str(tmp_path / "curves.png"))
    axes = figure.axes[0]
    low, high = axes.get_xlim()
    ticks = [t for t in axes.get_xticks() if low <= t <= high]
    assert ticks == [1.0, 2.0]


def test_curves_join_the_epochs_that_were_evaluated(tmp_path):
    # Evaluated after epochs 1, 4 and 5 (--eval_every=4): the other rows
    # have no evaluation, which drew no solid line at all.
    make_run(tmp_path / "run", methods=[], num_exits=2)
    write_history(tmp_path / "run", [
        (1, 0.1, 0.2, 0.15, 0.25), (2, 0.2, 0.3, "NA", "NA"), (3, 0.3, 0.4, "NA", "NA"),
        (4, 0.4, 0.5, 0.35, 0.45), (5, 0.5, 0.6, 0.4, 0.5)])
    (run,) = load([str(tmp_path / "run")])
    figure = report_figures.plot_curves(run, str(tmp_path / "curves.png"))
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    deepest = lines["Exit 2 (deepest)"]
    assert deepest.get_xdata().tolist() == [1, 4, 5]
    assert deepest.get_ydata().tolist() == pytest.approx([25, 45, 50])
    assert deepest.get_marker() == "o"
    train = lines["Exit 2 (deepest) (train)"]
    assert train.get_xdata().tolist() == [1, 2, 3, 4, 5]
    assert (train.get_linestyle(), train.get_marker()) == ("--", "None")


def test_figures_name_the_scored_split(runs_dir, tmp_path):
    root, _ = runs_dir
    runs = load([str(root)])
    figure = report_figures.plot_reliability(runs[0], str(tmp_path / "r.png"))
    assert figure.axes[0].get_title().splitlines()[-1].startswith(
        "deepest exit, test split, ECE = ")
    figure = report_figures.plot_figure2(runs, str(tmp_path / "f.png"))
    assert figure.axes[0].get_title().splitlines()[-1] == "cifar10 (test); cifar100 (test)"
    assert ("errors on different data: not comparable (cifar10 (test); cifar100 (test))"
            in figure.get_supxlabel())


@pytest.mark.parametrize("metrics_file, command", [
    # selfkd-eval writes metrics_<split>.json of the split asked for; --out
    # alone would score the run's evaluation split under this name.
    ("metrics_train.json", "--split=train"),
    ("metrics_test.json", "--split=test"),
    ("scores.json", "--out={run}/scores.json"),
])
def test_a_missing_record_is_skipped_with_a_command_that_writes_it(
        tmp_path, metrics_file, command):
    run = tmp_path / "run"
    make_run(run, methods=[], num_exits=1)
    found = runs_lib.load_runs([str(run)], metrics_file)
    assert found.skipped == [runs_lib.SkippedRun(str(run), (
        f"no {metrics_file} (selfkd-eval --model={run} {command.format(run=run)} "
        "writes it)"))]
