"""Mean ± standard deviation over seeds, training accuracy and the gap.

Run directories are written in the formats training and ``selfkd-eval``
write (flags.json, metrics_test.json, metrics_train.json, history.csv), with
scores chosen so that every expected number is computed by hand.
"""

import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from selfkd_tf.report import tables as report

from selfkd_tf.report import runs as runs_lib
from selfkd_tf.rundir.reading import RunDirectoryError

from selfkd_tf.report import seeds as seed_summary
from support import metrics_record

RECIPE = {
    "dataset": "cifar10", "data_dir": None, "arch": "resnet18", "num_stages": 2,
    "width_multiplier": 0.0625, "image_size": None, "methods": [], "epochs": 2,
    "lr": 0.1, "subset_seed": None, "jit_compile": False, "seed": 0,
}
"""flags.json of the base recipe (a subset of the trainer's fields)."""

_RUN_NUMBER = itertools.count(1)


def make_run(path, flags=None, test=None, train=None, **changes):
    """Writes a run directory: flags.json (`RECIPE` with `changes`) unless
    `flags` is False, metrics_test.json, metrics_train.json when given,
    history.csv. Runs without a `test` record get scores of their own (NLL
    1.001, 1.002, ...), as real runs do."""
    os.makedirs(path)
    if flags is not False:
        flags = {**RECIPE, "model_dir": str(path), **changes}
        (path / "flags.json").write_text(json.dumps(flags))
    if test is None:
        test = metrics_record("test", [40.0, 30.0], nll=1.0 + next(_RUN_NUMBER) / 1000)
    (path / "metrics_test.json").write_text(json.dumps(test))
    if train is not None:
        (path / "metrics_train.json").write_text(json.dumps(train))
    (path / "history.csv").write_text(
        "epoch,exit1_accuracy,exit2_accuracy,val_exit1_accuracy,val_exit2_accuracy\n"
        "1,0.2,0.3,0.2,0.25\n2,0.4,0.5,0.35,0.4\n")


def load(root):
    found = runs_lib.load_runs([str(root)], "metrics_test.json")
    assert found.skipped == []
    return found.runs


def tables(markdown):
    """`{heading: [row dict, ...]}` of the Markdown tables under `## ` headings."""
    result, heading = {}, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if heading not in result:
                header = cells
                result[heading] = []
            elif set(cells) - {"---", "---:"}:
                result[heading].append(dict(zip(header, cells, strict=True)))
    return result


def report_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "selfkd_tf.cli.report", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120)


# Three seeds of one recipe, chosen so that every number is computed by hand:
#   deepest top-1 error 30, 32, 34 %   -> mean 32.00, std 2.00
#   shallow top-1 error 50, 50, 56 %   -> accuracy 50, 50, 44: 48.00 ± 3.46
#                                         (s² = (4 + 4 + 16) / 2 = 12)
#   ensemble top-1 error 29, 31, 30 %  -> accuracy 71, 69, 70: 70.00 ± 1.00
#   NLL 1.0, 1.2, 1.7                  -> 1.300 ± 0.361 (s² = 0.26 / 2)
#   training top-1 error 1, 2, 6 %     -> accuracy 99, 98, 94: 97.00 ± 2.65
#                                         (s² = (4 + 1 + 9) / 2 = 7)
#   gap = train - test accuracy: 99 - 70, 98 - 68, 94 - 66 = 29, 30, 28
#                                      -> 29.00 ± 1.00
SEEDS = [  # (seed, deepest err, shallow err, ensemble err, nll, train err)
    (0, 30.0, 50.0, 29.0, 1.0, 1.0),
    (1, 32.0, 50.0, 31.0, 1.2, 2.0),
    (2, 34.0, 56.0, 30.0, 1.7, 6.0),
]


@pytest.fixture
def study(tmp_path):
    """`base_seed{0,1,2}` (the hand-computed seeds) and `lr_seed0` (another
    learning rate, no training record)."""
    root = tmp_path / "study"
    for seed, deepest, shallow, ensemble, nll, train in SEEDS:
        make_run(root / f"base_seed{seed}", seed=seed,
                 test=metrics_record("test", [shallow, deepest], nll=nll, ensemble_error=ensemble),
                 train=metrics_record("train", [10.0, train], num_examples=500))
    make_run(root / "lr_seed0", lr=0.05, test=metrics_record("test", [45.0, 35.0]))
    return root


def test_spread_is_the_mean_and_the_sample_standard_deviation():
    assert seed_summary.spread([30.0, 32.0, 34.0]) == seed_summary.Spread(32.0, 2.0, 3)
    # s² = ((1 - 7/3)² + (2 - 7/3)² + (4 - 7/3)²) / 2 = (16 + 1 + 25) / 18 = 7/3.
    one_two_four = seed_summary.spread([1, 2, 4])
    assert one_two_four.mean == pytest.approx(7 / 3)
    assert one_two_four.std == pytest.approx(math.sqrt(7 / 3))
    values = np.random.default_rng(0).normal(size=7)
    assert seed_summary.spread(values.tolist()).std == pytest.approx(np.std(values, ddof=1))
    single = seed_summary.spread([31.5])
    assert (single.std, single.format(".2f")) == (None, "31.50")
    assert seed_summary.spread([30.0, 32.0, 34.0]).format(".2f") == "32.00 ± 2.00"
    with pytest.raises(ValueError):
        seed_summary.spread([])


def test_runs_differing_only_in_seed_and_safe_fields_are_one_recipe(tmp_path):
    make_run(tmp_path / "base_seed0", seed=0)
    make_run(tmp_path / "base_seed1", seed=1, data_dir="/elsewhere", jit_compile=True)
    make_run(tmp_path / "base_seed2", seed=2)   # model_dir differs in every run
    make_run(tmp_path / "lr_seed0", lr=0.05)
    make_run(tmp_path / "sub_seed0", subset_seed=7)
    make_run(tmp_path / "sub_seed1", subset_seed=8, seed=1)
    older = {k: v for k, v in RECIPE.items() if k != "subset_seed"}
    make_run(tmp_path / "zolder_seed3", flags=False)
    (tmp_path / "zolder_seed3" / "flags.json").write_text(json.dumps({**older, "seed": 3}))
    make_run(tmp_path / "zz_noflags_a", flags=False)
    make_run(tmp_path / "zz_noflags_b", flags=False)
    groups = seed_summary.group_seeds(load(tmp_path))
    assert [(g.label, [r.name for r in g.runs], g.seeds) for g in groups] == [
        ("base", ["base_seed0", "base_seed1", "base_seed2"], [0, 1, 2]),
        # One run is labelled as a recipe too, not by its run name.
        ("lr", ["lr_seed0"], [0]),
        # An explicit subset_seed is part of the recipe (the training subset);
        # two recipes of one name are told apart by it.
        ("sub (subset_seed=7)", ["sub_seed0"], [0]),
        ("sub (subset_seed=8)", ["sub_seed1"], [1]),
        # A field missing from an older flags.json is a difference.
        ("zolder", ["zolder_seed3"], [3]),
        # Without flags.json the recipe is unknown: a row each.
        ("zz_noflags_a", ["zz_noflags_a"], [None]),
        ("zz_noflags_b", ["zz_noflags_b"], [None]),
    ]


def test_repeats_scored_on_other_numbers_of_examples_are_kept_apart(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path / f"base_seed{seed}", seed=seed)
    for seed in (2, 3):
        make_run(tmp_path / f"base_seed{seed}", seed=seed,
                 test=metrics_record("test", [40.0, 30.0 + seed], num_examples=50))
    groups = seed_summary.group_seeds(load(tmp_path))
    # Both groups would be "base": each says what sets it apart.
    assert [(g.label, g.n) for g in groups] == [
        ("base (100 examples)", 2), ("base (50 examples)", 2)]
    text = report.summary_markdown(groups)
    assert "**Not comparable:** numbers of scored examples differ" in text


def test_group_scores_and_gaps_match_the_hand_computed_values(study):
    runs = load(study)
    train = seed_summary.read_train_metrics(runs, "metrics_train.json")
    assert [t is None for t in train] == [False, False, False, True]
    base, other = seed_summary.group_seeds(runs, train)
    assert base.score("top1_err") == seed_summary.Spread(32.0, 2.0, 3)
    assert base.score("nll").std == pytest.approx(math.sqrt(0.13))
    shallow, deepest = base.exit_accuracies()
    assert (shallow.mean, shallow.std) == (48.0, pytest.approx(math.sqrt(12)))
    assert (deepest.mean, deepest.std) == (68.0, 2.0)
    assert base.ensemble_accuracy() == seed_summary.Spread(70.0, 1.0, 3)
    assert base.train_accuracies() == [99.0, 98.0, 94.0]
    assert base.gaps() == [29.0, 30.0, 28.0]
    assert base.gap() == seed_summary.Spread(29.0, 1.0, 3)
    assert base.train_accuracy().std == pytest.approx(math.sqrt(7))
    assert (other.n, other.gaps(), other.gap(), other.train_accuracy()) == (
        1, [None], None, None)


def test_summary_tables(study):
    runs = load(study)
    groups = seed_summary.group_seeds(
        runs, seed_summary.read_train_metrics(runs, "metrics_train.json"))
    text = report.summary_markdown(groups, train_metrics_file="metrics_train.json")
    parsed = tables(text)
    assert list(parsed) == [
        "Table 1 over seeds: deepest classifier, cifar10 (test)",
        "Table 2 over seeds: accuracy (%) of each classifier, cifar10 (test)",
        "Training accuracy and gap of each run, cifar10 (test)"]
    table1, table2, per_run = parsed.values()
    assert table1 == [
        {"Recipe": "base", "Model": "resnet18 (width 0.0625)", "Method": "Baseline",
         "n": "3", "Seeds": "0, 1, 2", "Top-1 err (%)": "32.00 ± 2.00",
         "Top-5 err (%)": "8.00 ± 0.50", "NLL": "1.300 ± 0.361",
         "ECE (%)": "3.20 ± 0.20", "AURC (x1000)": "64.00 ± 4.00",
         "Train acc (%)": "97.00 ± 2.65", "Gap (points)": "29.00 ± 1.00"},
        # One run: values alone, no ±; no training record: n/a.
        {"Recipe": "lr", "Model": "resnet18 (width 0.0625)", "Method": "Baseline",
         "n": "1", "Seeds": "0", "Top-1 err (%)": "35.00", "Top-5 err (%)": "8.75",
         "NLL": "1.000", "ECE (%)": "3.50", "AURC (x1000)": "70.00",
         "Train acc (%)": "n/a", "Gap (points)": "n/a"},
    ]
    assert [{k: row[k] for k in ("Recipe", "Exit 1 (stage 1)", "Exit 2 (deepest)",
                                 "Ensemble")} for row in table2] == [
        {"Recipe": "base", "Exit 1 (stage 1)": "48.00 ± 3.46",
         "Exit 2 (deepest)": "68.00 ± 2.00", "Ensemble": "70.00 ± 1.00"},
        {"Recipe": "lr", "Exit 1 (stage 1)": "55.00",
         "Exit 2 (deepest)": "65.00", "Ensemble": "65.00"},
    ]
    assert [list(row.values()) for row in per_run] == [
        ["base_seed0", "base", "0", "70.00", "99.00", "29.00"],
        ["base_seed1", "base", "1", "68.00", "98.00", "30.00"],
        ["base_seed2", "base", "2", "66.00", "94.00", "28.00"],
        ["lr_seed0", "lr", "0", "65.00", "n/a", "n/a"],
    ]
    assert "s = √(Σ(x − x̄)² / (n − 1))" in text
    assert "No metrics_train.json (n/a): lr_seed0." in text


def test_a_group_with_some_training_records_says_how_many(study):
    os.remove(study / "base_seed2" / "metrics_train.json")
    runs = load(study)
    groups = seed_summary.group_seeds(
        runs, seed_summary.read_train_metrics(runs, "metrics_train.json"))
    text = report.summary_markdown(groups, train_metrics_file="metrics_train.json")
    row = tables(text)["Table 1 over seeds: deepest classifier, cifar10 (test)"][0]
    # Train acc 99, 98: 98.50 ± 0.71; gaps 29, 30: 29.50 ± 0.71.
    assert (row["Train acc (%)"], row["Gap (points)"]) == (
        "98.50 ± 0.71 (n=2)", "29.50 ± 0.71 (n=2)")


def test_write_report_adds_summary_only_when_it_says_more(study, tmp_path):
    runs = load(study)
    single, repeated = tmp_path / "single", tmp_path / "repeated"
    report.write_report(runs[3:], str(single))   # lr_seed0 alone
    assert not (single / "summary.md").exists()
    written = report.write_report(runs, str(repeated))   # three seeds of `base`
    assert str(repeated / "summary.md") in written
    assert "Train acc" not in (repeated / "summary.md").read_text()
    # table1.md and table2.md still have a row per run.
    assert (repeated / "table1.md").read_text() == report.table1_markdown(runs)
    assert (repeated / "table2.md").read_text() == report.table2_markdown(runs)
    # One run with a training record: the summary is the only table of its gap.
    report.write_report(runs[:1], str(single), train_metrics_file="metrics_train.json")
    assert "| base_seed0 | base | 0 | 70.00 | 99.00 | 29.00 |" in (
        single / "summary.md").read_text()


def test_cli_writes_the_summary_with_training_accuracy(study, tmp_path):
    out = tmp_path / "report"
    result = report_cli(f"--runs={study}", "--metrics_file=metrics_test.json",
                        "--train_metrics_file=metrics_train.json", f"--out={out}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(out / "summary.md") in result.stdout.split()
    row = tables((out / "summary.md").read_text())[
        "Table 1 over seeds: deepest classifier, cifar10 (test)"][0]
    assert (row["Recipe"], row["Top-1 err (%)"], row["Gap (points)"]) == (
        "base", "32.00 ± 2.00", "29.00 ± 1.00")


NOT_THIS_MODEL = ("the record is not of this run's model (copied from another run, "
                  "or written before the run was trained again)")


@pytest.mark.parametrize("change, message", [
    (lambda train: {**train, "split": "test"},
     "split is 'test', not 'train'; selfkd-eval --model={run} --split=train "
     "writes the training-split record as {run}/metrics_train.json"),
    (lambda train: {**train, "dataset": "cifar100"},
     "data set cifar100; the run's reported scores: data set cifar10"),
    (lambda train: {**train, "exits": train["exits"][1:]},
     "num_exits 1 in the record, 2 in the run's reported scores: " + NOT_THIS_MODEL),
    # A baseline's record copied into a run of the full method.
    (lambda train: {**train, "methods": ["dmfl", "byot", "pskd"]},
     "methods +PS-KD+BYOT+DMFL in the record, Baseline in the run's flags.json: "
     + NOT_THIS_MODEL),
    (lambda train: {**train, "arch": "resnet34"},
     "arch resnet34 in the record, resnet18 in the run's flags.json: " + NOT_THIS_MODEL),
    # A record of the run before it was trained for longer.
    (lambda train: {**train, "epochs": 1},
     "epochs 1 in the record, 2 in the run's flags.json: " + NOT_THIS_MODEL),
    # Another width: flags.json and the record say the same but the size.
    (lambda train: {**train, "params": 4000},
     "params 4000 in the record, 1000 in the run's reported scores: " + NOT_THIS_MODEL),
])
def test_an_unusable_training_record_is_refused_and_nothing_written(
        study, tmp_path, change, message):
    run = study / "base_seed1"
    path = run / "metrics_train.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    expected = f"{path}: " + message.format(run=run)
    out = tmp_path / "report"
    out.mkdir()
    (out / "table1.md").write_text("an earlier report")
    with pytest.raises(RunDirectoryError) as error:
        report.write_report(load(study), str(out), train_metrics_file="metrics_train.json")
    assert str(error.value) == expected
    result = report_cli(f"--runs={study}", "--metrics_file=metrics_test.json",
                        "--train_metrics_file=metrics_train.json", f"--out={out}",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"selfkd-report: error: --train_metrics_file: {expected}"]
    assert result.stdout == ""
    assert os.listdir(out) == ["table1.md"]
    assert (out / "table1.md").read_text() == "an earlier report"


def test_training_records_that_cannot_give_a_gap_are_refused(study, tmp_path):
    runs = load(study)
    with pytest.raises(RunDirectoryError, match=r"^no run directory holds a m\.json$"):
        seed_summary.read_train_metrics(runs, "m.json")
    # Reporting the training split itself leaves no test accuracy to subtract.
    trained = runs_lib.load_runs([str(study / "base_seed0")], "metrics_train.json").runs
    with pytest.raises(RunDirectoryError, match="reported scores are of the training split"):
        seed_summary.read_train_metrics(trained, "metrics_train.json")
    out = tmp_path / "report"
    result = report_cli(f"--runs={study}", "--metrics_file=metrics_test.json",
                        "--train_metrics_file=metrics_trian.json", f"--out={out}",
                        cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        "selfkd-report: error: --train_metrics_file: no run directory holds a "
        "metrics_trian.json"])
    assert not out.exists()


def test_the_summary_loads_no_tensorflow():
    code = ("import sys; import selfkd_tf.report.seeds, selfkd_tf.report.tables; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_run_reported_twice_is_refused_not_counted_as_two_seeds(study, tmp_path):
    # Copies of runs (docs keep some under docs/results/.../runs/) given next
    # to the runs themselves: before, one recipe with n=5, "Seeds 0, 1, 2,
    # 0, 1" and a shrunken standard deviation.
    mix = tmp_path / "mix"
    for name in ("base_seed0", "base_seed1"):
        shutil.copytree(study / name, mix / name)
    runs = runs_lib.load_runs([str(study), str(mix)], "metrics_test.json").runs
    expected = (f"{study / 'base_seed0'} and {mix / 'base_seed0'} are runs of one "
                "recipe with one seed (0): the same run twice (a copy of its "
                "directory?); a mean ± std needs independent seeds: report one of them")
    with pytest.raises(seed_summary.RepeatedRunError) as error:
        seed_summary.group_seeds(runs)
    assert str(error.value) == expected
    out = tmp_path / "report"
    # With training records too, the run is named as repeated (not its
    # training record as held by two runs).
    for train in ([], ["--train_metrics_file=metrics_train.json"]):
        result = report_cli(f"--runs={study},{mix}", "--metrics_file=metrics_test.json",
                            *train, f"--out={out}", cwd=tmp_path)
        assert (result.returncode, result.stderr.splitlines(), result.stdout) == (
            2, [f"selfkd-report: error: --runs: {expected}"], "")
        assert not out.exists()


def test_two_runs_of_one_seed_are_refused_even_with_other_scores(study):
    # A rerun of seed 0 (another directory name, other scores): not a new seed.
    make_run(study / "base_again", seed=0, test=metrics_record("test", [45.0, 31.0]))
    with pytest.raises(seed_summary.RepeatedRunError,
                       match=f"^{study / 'base_again'} and {study / 'base_seed0'} "
                             r"are runs of one recipe with one seed \(0\)"):
        seed_summary.group_seeds(load(study))


def test_a_reported_record_copied_into_another_run_is_refused(study, tmp_path):
    # The same architecture, methods and epochs: only the scores give it away.
    shutil.copy(study / "base_seed0" / "metrics_test.json", study / "lr_seed0")
    expected = (f"{study / 'base_seed0'} and {study / 'lr_seed0'} report the very "
                "same scores: one run twice, or a record copied from one run "
                "directory into the other; report each run once, with its own record")
    with pytest.raises(seed_summary.RepeatedRunError) as error:
        report.write_report(load(study), str(tmp_path / "report"))
    assert str(error.value) == expected
    result = report_cli(f"--runs={study}", "--metrics_file=metrics_test.json",
                        f"--out={tmp_path / 'report'}", cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (
        2, [f"selfkd-report: error: --runs: {expected}"])
    assert not (tmp_path / "report").exists()


def test_a_training_record_copied_from_another_seed_is_refused(study, tmp_path):
    # Seeds of one recipe: every field of the record matches the run's flags.
    source = study / "base_seed0" / "metrics_train.json"
    shutil.copy(source, study / "base_seed2")
    expected = (f"{study / 'base_seed2' / 'metrics_train.json'}: the very same "
                f"scores as {source}: a record copied from one run directory "
                "into the other; give each run its own")
    with pytest.raises(RunDirectoryError) as error:
        seed_summary.read_train_metrics(load(study), "metrics_train.json")
    assert str(error.value) == expected
    result = report_cli(f"--runs={study}", "--metrics_file=metrics_test.json",
                        "--train_metrics_file=metrics_train.json",
                        f"--out={tmp_path / 'report'}", cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (
        2, [f"selfkd-report: error: --train_metrics_file: {expected}"])


def test_a_baseline_training_record_in_a_full_method_run_is_refused(tmp_path):
    full = ["pskd", "byot", "dmfl"]
    make_run(tmp_path / "baseline_seed0",
             train=metrics_record("train", [90.0, 5.0], num_examples=500))
    make_run(tmp_path / "full_seed0", methods=full,
             test={**metrics_record("test", [35.0, 25.0]), "methods": full})
    shutil.copy(tmp_path / "baseline_seed0" / "metrics_train.json", tmp_path / "full_seed0")
    result = report_cli(f"--runs={tmp_path}", "--metrics_file=metrics_test.json",
                        "--train_metrics_file=metrics_train.json",
                        f"--out={tmp_path / 'report'}", cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        f"selfkd-report: error: --train_metrics_file: "
        f"{tmp_path / 'full_seed0' / 'metrics_train.json'}: methods Baseline in the "
        "record, +PS-KD+BYOT+DMFL in the run's flags.json: " + NOT_THIS_MODEL])
    assert not (tmp_path / "report").exists()


def test_a_test_record_given_as_training_record_gets_a_hint_that_keeps_it(
        study, tmp_path):
    result = report_cli(f"--runs={study}", "--metrics_file=metrics_test.json",
                        "--train_metrics_file=metrics_test.json",
                        f"--out={tmp_path / 'report'}", cwd=tmp_path)
    run = study / "base_seed0"
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        f"selfkd-report: error: --train_metrics_file: {run}/metrics_test.json: "
        f"split is 'test', not 'train'; selfkd-eval --model={run} --split=train "
        f"writes the training-split record as {run}/metrics_train.json"])
    # Following the hint must not overwrite the test record.
    hint = result.stderr.partition("; ")[2]
    assert "metrics_test.json" not in hint and "--out" not in hint


def test_recipes_are_labelled_by_their_common_name(tmp_path):
    make_run(tmp_path / "baseline_seed0")
    make_run(tmp_path / "byot" / "seed0", methods=["byot"])
    make_run(tmp_path / "byot" / "seed1", methods=["byot"], seed=1)
    make_run(tmp_path / "dmfl_rerun_seed1", methods=["dmfl"], seed=1)
    make_run(tmp_path / "dmfl_seed0", methods=["dmfl"])
    make_run(tmp_path / "pskd_seed0", methods=["pskd"])
    make_run(tmp_path / "pskd_seed1", methods=["pskd"], seed=1)
    make_run(tmp_path / "pskd_seed2", methods=["pskd"], seed=2, lr=0.05)
    groups = seed_summary.group_seeds(load(tmp_path))
    assert [(g.label, [r.name for r in g.runs]) for g in groups] == [
        # A lone run is labelled like a recipe of several seeds.
        ("baseline", ["baseline_seed0"]),
        # Runs named by their seed alone: their directory names the recipe.
        ("byot", ["seed0", "seed1"]),
        ("dmfl", ["dmfl_rerun_seed1", "dmfl_seed0"]),
        # Two recipes of one name: told apart by the flag that differs.
        ("pskd (lr=0.1)", ["pskd_seed0", "pskd_seed1"]),
        ("pskd (lr=0.05)", ["pskd_seed2"]),
    ]
    rows = tables(report.summary_markdown(groups))[
        "Table 1 over seeds: deepest classifier, cifar10 (test)"]
    assert [(row["Recipe"], row["n"], row["Seeds"]) for row in rows] == [
        ("baseline", "1", "0"), ("byot", "2", "0, 1"), ("dmfl", "2", "1, 0"),
        ("pskd (lr=0.1)", "2", "0, 1"), ("pskd (lr=0.05)", "1", "2")]
