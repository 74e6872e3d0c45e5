"""Whether a metrics record belongs to its run (`selfkd_tf.report.provenance`)."""

import json

import pytest

from selfkd_tf.report import provenance

from selfkd_tf.report import runs as runs_lib
from selfkd_tf.rundir.reading import RunDirectoryError
from support import metrics_record


def run_with(tmp_path, flags, metrics):
    """A run directory holding ``flags`` (unless `None`) and ``metrics``."""
    if flags is not None:
        (tmp_path / "flags.json").write_text(json.dumps(flags))
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return runs_lib.load_run(str(tmp_path))


@pytest.mark.parametrize("name, problem", [
    ("metrics_train.json", None),
    ("metrics train (2).json", None),
    ("", "empty"),
    (".", "a directory, not a file name"),
    ("..", "a directory, not a file name"),
    ("/runs/a/metrics_train.json", "a path, not a file name"),
    ("../a/metrics_train.json", "a path, not a file name"),
    ("a/", "a path, not a file name"),
    ("metrics\n_train.json", "not a file name (it holds a control character)"),
    ("metrics\x00.json", "not a file name (it holds a control character)"),
])
def test_only_plain_file_names_name_a_record(name, problem):
    found = provenance.file_name_problem(name)
    assert (found and found.split(": ")[0]) == problem
    if problem:
        with pytest.raises(ValueError) as error:
            provenance.check_file_name(name)
        assert str(error.value) == f"{name!r} is {found}"
    else:
        provenance.check_file_name(name)


def test_methods_match_in_any_order_and_either_form(tmp_path):
    metrics = {**metrics_record("test", [40.0, 30.0]), "methods": ["byot", "pskd"]}
    for methods in ("pskd,byot", ["PSKD", "byot"], " byot , pskd"):
        flags = {"arch": "resnet18", "methods": methods, "epochs": 2}
        run = run_with(tmp_path, flags, metrics)
        provenance.check_record(run, run.metrics, "m.json", reference=run.metrics)


def test_fields_either_side_lacks_are_not_compared(tmp_path):
    older = {k: v for k, v in metrics_record("test", [40.0, 30.0]).items()
             if k not in ("epochs", "params")}
    run = run_with(tmp_path, None, older)   # no flags.json, an older record
    provenance.check_record(run, {**metrics_record("train", [5.0, 1.0]), "epochs": 9},
                            "m.json", reference=run.metrics)
    run = run_with(tmp_path, {"arch": "resnet18", "methods": []}, older)
    with pytest.raises(RunDirectoryError,
                       match=r"^m\.json: arch resnet50 in the record, resnet18 in "
                             r"the run's flags\.json: "):
        provenance.check_record(run, {**older, "arch": "resnet50"}, "m.json")


def test_first_copy_finds_records_with_the_very_same_scores():
    a, b = metrics_record("test", [40.0, 30.0]), metrics_record("test", [40.0, 30.5])
    assert provenance.first_copy([a, None, b]) is None
    assert provenance.first_copy([a, None, b, json.loads(json.dumps(a))]) == (0, 3)
    # The same scores on another split or number of examples are no copy.
    assert provenance.first_copy([a, {**a, "split": "train"}]) is None
    assert provenance.first_copy([a, {**a, "num_examples": 50}]) is None
