"""selfkd-export: one exit as a SavedModel that takes raw pixels, without the rest."""

import errno
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.models import costs as costs_lib
from selfkd_tf.models import multi_exit
from selfkd_tf import data
from selfkd_tf.serving import saved_model as export
from selfkd_tf.experiment.settings import TrainSettings
from support import SERVING_CLASSES, environment, last_line, run_cli, serving_input, serving_model


# Runs in a fresh interpreter that never imports selfkd_tf: what a serving
# client has.
LOADER = r"""
import sys
import numpy as np
import tensorflow as tf

out, images, *paths = sys.argv[1:]
images = np.load(images)
results = {}
for i, path in enumerate(paths):
    served = tf.saved_model.load(path)
    default = served.signatures["serving_default"]
    for name, outputs in [
        ("float", served.serve(tf.constant(images, tf.float32))),
        ("uint8", served.serve_uint8(tf.constant(images))),
        ("single", default(pixels_0_to_255=tf.constant(images[:1], tf.float32))),
    ]:
        for key, value in outputs.items():
            value = value.numpy()
            # Class names come back as objects, which np.load would not read.
            results[f"{i}/{name}/{key}"] = value.astype(bytes) if value.dtype == object else value
    results[f"{i}/classes"] = served.classes().numpy().astype(bytes)
assert "selfkd_tf" not in sys.modules
np.savez(out, **results)
"""


@pytest.fixture(scope="module")
def model():
    return serving_model(seed=1)


def _expected(model, images, exit):
    logits = [z.numpy() for z in model(serving_input(images), training=False)["logits"]]
    if exit == "ensemble":
        probs = np.mean([keras.ops.softmax(z).numpy() for z in logits], axis=0)
        return probs, np.log(probs)
    return keras.ops.softmax(logits[exit - 1]).numpy(), logits[exit - 1]


def _layer_prefixes(network):
    return {layer.name.split("_")[0] for layer in network.layers}


def test_classifier_holds_only_what_the_exit_needs(model):
    deepest = multi_exit.exit_model(model.backbone, 3)
    assert _layer_prefixes(deepest) == {"image", "stem", "stage1", "stage2", "stage3", "exit3"}
    shallowest = multi_exit.exit_model(model.backbone, 1)
    assert _layer_prefixes(shallowest) == {"image", "stem", "stage1", "exit1"}
    ensemble = multi_exit.exit_model(model.backbone, "ensemble")
    assert costs_lib.count_parameters(ensemble) == costs_lib.count_parameters(model.backbone)
    assert costs_lib.count_parameters(shallowest) < costs_lib.count_parameters(deepest)
    assert costs_lib.count_parameters(deepest) < costs_lib.count_parameters(model.backbone)


@pytest.mark.parametrize("exit", [4, "0", "x", "2.0"])
def test_unknown_exit_names_the_allowed_ones(exit):
    with pytest.raises(ValueError,
                       match=r"^exit: got .*; allowed: 1..3, deepest, ensemble, cascade$"):
        export.resolve_exit(exit, 3)


@pytest.mark.parametrize("exit, threshold, message", [
    ("cascade", None, "threshold: required with exit=cascade"),
    (2, 0.5, "threshold: required with exit=cascade"),
    ("cascade", -1, "threshold: must be a number >= 0"),
])
def test_threshold_goes_with_the_cascade_only(model, tmp_path, exit, threshold, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        export.export_saved_model(model, str(tmp_path / "out"), exit=exit, threshold=threshold)
    with pytest.raises(ValueError, match="^class_names: got 2 names for a model of 5 classes$"):
        export.export_saved_model(model, str(tmp_path / "out"), class_names=["a", "b"])
    assert not (tmp_path / "out").exists()


def test_export_serves_the_models_outputs_in_a_fresh_process(model, tmp_path):
    exits = [3, 1, "ensemble"]
    summaries = [export.export_saved_model(model, str(tmp_path / f"exit_{e}"),
                                           exit="deepest" if e == 3 else e,
                                           class_names=SERVING_CLASSES)
                 for e in exits]
    deepest, shallowest, ensemble = summaries
    assert deepest.exit == 3
    assert shallowest.flops < deepest.flops < deepest.training_flops
    assert shallowest.params < deepest.params < deepest.training_params
    assert (ensemble.params, ensemble.flops) == (ensemble.training_params,
                                                 ensemble.training_flops)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        export.export_saved_model(model, deepest.path)

    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path / "out.npz"),
         str(tmp_path / "images.npy"), *(s.path for s in summaries)],
        cwd=tmp_path, env=environment(), check=True, timeout=300)
    served = np.load(tmp_path / "out.npz")
    for i, exit in enumerate(exits):
        probs, logits = _expected(model, images, exit)
        for name, rows in (("float", slice(None)), ("uint8", slice(None)),
                           ("single", slice(0, 1))):
            key = f"{i}/{name}"
            np.testing.assert_allclose(served[f"{key}/probabilities"], probs[rows],
                                       atol=1e-5, err_msg=key)
            np.testing.assert_allclose(served[f"{key}/logits"], logits[rows],
                                       atol=1e-5, rtol=1e-5, err_msg=key)
            np.testing.assert_array_equal(served[f"{key}/class_ids"],
                                          probs[rows].argmax(-1), err_msg=key)
            assert [n.decode() for n in served[f"{key}/class_names"]] == [
                SERVING_CLASSES[c] for c in probs[rows].argmax(-1)], key
        assert [n.decode() for n in served[f"{i}/classes"]] == list(SERVING_CLASSES)


def test_other_image_sizes_are_resized_as_the_training_data_were(model, tmp_path):
    """28x28 images sent to a model of 16x16 images get the answer the model
    gives on those images resized by the data pipeline, not a confident
    answer for some corner of them."""
    rng = np.random.default_rng(3)
    large = rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "large.npz", x_train=large, y_train=np.arange(6) % 5,
             x_test=large, y_test=np.arange(6) % 5)
    resized = data.load_arrays(f"npz:{tmp_path / 'large.npz'}", image_size=16).x_test
    assert resized.shape == (6, 16, 16, 3)
    probs, logits = _expected(model, resized, 3)
    served = tf.saved_model.load(
        export.export_saved_model(model, str(tmp_path / "served")).path)
    for outputs in (served.serve_any_size(tf.constant(large, tf.float32)),
                    served.serve_any_size_uint8(large)):
        np.testing.assert_allclose(outputs["logits"], logits, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(outputs["class_ids"], probs.argmax(-1))
    # Images of the model's own size pass untouched, by either signature.
    for serve in (served.serve_uint8, served.serve_any_size_uint8):
        np.testing.assert_allclose(serve(resized)["logits"], logits, atol=1e-5)
    # The default signatures take the model's size only (TFLite cannot
    # convert the resize), and every signature refuses another number of
    # channels, naming the expected shape.
    with pytest.raises((ValueError, TypeError), match=r"\(None, 16, 16, 3\)"):
        served.serve(tf.constant(large, tf.float32))
    with pytest.raises((ValueError, TypeError), match=r"\(None, None, None, 3\)"):
        served.serve_any_size(tf.zeros([1, 28, 28, 1]))


def test_export_command_reports_params_and_flops(model, tmp_path):
    model.save(tmp_path / "model.keras")
    out = tmp_path / "served"
    result = run_cli("selfkd_tf.cli.export", f"--model={tmp_path / 'model.keras'}",
                     "--exit=2", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"Exported exit 2 of 3 to {out}"
    assert lines[1].split() == ["params", "FLOPs/image"]
    (export_params, export_flops), (train_params, train_flops) = [
        [int(v.replace(",", "")) for v in line.split()[-2:]] for line in lines[2:4]]
    assert lines[2].startswith("export") and lines[3].startswith("training model")
    assert export_params < train_params and export_flops < train_flops
    assert train_params == costs_lib.count_parameters(model.backbone)
    assert (out / "saved_model.pb").exists()


def test_cascade_export_command_names_the_runs_classes(model, tmp_path):
    """A run directory's export carries its dataset's class names."""
    images = np.zeros((5, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "data.npz", x_train=images, y_train=np.arange(5), x_test=images,
             y_test=np.arange(5), class_names=np.array(SERVING_CLASSES))
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    settings = TrainSettings(dataset=f"npz:{tmp_path / 'data.npz'}", model_dir=str(run))
    (run / "flags.json").write_text(json.dumps(settings.to_json()))
    out = tmp_path / "cascade"
    result = run_cli("selfkd_tf.cli.export", f"--model={run}", "--exit=cascade",
                     "--threshold=0.7", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"Exported the 3-exit cascade (threshold 0.7) to {out}"
    costs = costs_lib.exit_costs(model.backbone)
    assert [line.split()[:4] for line in lines[4:7]] == [
        ["answer", "at", "exit", str(k)] for k in (1, 2, 3)]
    assert [int(line.split()[-1].replace(",", "")) for line in lines[4:7]] == [
        costs.cascade_exit(k) for k in (1, 2, 3)]
    served = tf.saved_model.load(str(out))
    assert [n.decode() for n in served.classes().numpy()] == list(SERVING_CLASSES)


@pytest.mark.parametrize("args, message", [
    (["--exit=cascade"], "--threshold: required with exit=cascade"),
    (["--class_names=a,b"], "--class_names: got 2 names for a model of 5 classes"),
    (["--exit=cascade", "--threshold=nan"], "--threshold: must be a number >= 0"),
    # Beyond float32, which the graph holds it in.
    (["--exit=cascade", "--threshold=1e39"],
     "--threshold: got 1e+39; allowed: finite numbers within float32's range"),
])
def test_export_command_refuses_bad_flags_in_one_line(model, tmp_path, args, message):
    model.save(tmp_path / "model.keras")
    result = run_cli("selfkd_tf.cli.export", f"--model={tmp_path / 'model.keras'}",
                     f"--out={tmp_path / 'served'}", *args)
    assert result.returncode == 2
    assert last_line(result.stderr).startswith(f"selfkd-export: error: {message}")
    assert not (tmp_path / "served").exists()


def _listing(root):
    """Every path under ``root`` with its file's bytes: what a refused export must not change."""
    return {os.path.relpath(os.path.join(d, name), root): open(os.path.join(d, name), "rb").read()
            for d, _, files in os.walk(root) for name in files}


def test_overwrite_replaces_only_an_export_or_an_empty_directory(model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "history.csv").write_text("epoch,loss\n0,1.5\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine\n")
    (tmp_path / "afile").write_text("a file\n")
    before = _listing(tmp_path)
    keep = {"the model's run directory": str(run)}
    refused = [
        (run, keep, f"out: {run} is the model's run directory ({run}); export to another"),
        (tmp_path, keep, f"out: {tmp_path} contains the model's run directory"),
        (run, None, f"out: {run} is a directory holding other files than a SavedModel"),
        (work, None, f"out: {work} is a directory holding other files than a SavedModel"),
        (tmp_path / "afile", None, f"out: {tmp_path / 'afile'} is a file"),
        (tmp_path / "afile" / "sub", None, f"out: {tmp_path / 'afile'} is not a directory"),
    ]
    for path, kept, message in refused:
        for overwrite in (True, False):
            with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
                export.check_export_path(str(path), overwrite, keep=kept)
        if kept is None:
            with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
                export.export_saved_model(model, str(path), overwrite=True)
    # The current directory, even empty, and the directories holding it.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for path, relation in ((".", "is"), (str(empty), "is"), ("..", "contains")):
        with pytest.raises(ValueError,
                           match=f"^{re.escape(f'out: {path} {relation} the current directory')}"):
            export.export_saved_model(model, path, overwrite=True)
    assert _listing(tmp_path) == before and os.listdir(empty) == []
    monkeypatch.chdir(tmp_path)

    # An earlier export, an empty directory: replaced. A link to one: refused.
    served = tmp_path / "served"
    export.export_saved_model(model, str(served), exit=1)
    os.symlink(served, tmp_path / "link")
    with pytest.raises(ValueError, match="is a symbolic link"):
        export.export_saved_model(model, str(tmp_path / "link"), overwrite=True)
    images = np.zeros((1, 16, 16, 3), np.uint8)
    _, logits = _expected(model, images, 2)
    for path in (served, empty):
        export.export_saved_model(model, str(path), exit=2, overwrite=True)
        loaded = tf.saved_model.load(str(path))  # kept alive while its function runs
        np.testing.assert_allclose(loaded.serve_uint8(images)["logits"], logits,
                                   atol=1e-5, rtol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "link", "run", "served", "work"]


def test_failed_export_leaves_nothing_behind(model, tmp_path, monkeypatch):
    """A write that fails after the SavedModel is on disk (here: the disk
    fills up) removes the temporary export and the parents it created, and
    keeps the export it was to replace."""
    save = tf.saved_model.save

    def save_then_fail(obj, export_dir, *args, **kwargs):
        save(obj, export_dir, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", export_dir)

    served = tmp_path / "served"
    export.export_saved_model(model, str(served), exit=1)
    before = _listing(tmp_path)
    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    for path, overwrite in ((served, True), (tmp_path / "new" / "deeper" / "served", False)):
        with pytest.raises(OSError, match="No space left on device"):
            export.export_saved_model(model, str(path), overwrite=overwrite)
        assert _listing(tmp_path) == before
        assert sorted(os.listdir(tmp_path)) == ["served"]


def test_export_command_never_replaces_the_run_or_other_files(model, tmp_path):
    """--overwrite onto the run directory, a directory of other files, a
    file or a path under a file: one line, exit 2, nothing touched."""
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    afile = tmp_path / "afile"
    afile.write_text("a file\n")
    before = _listing(tmp_path)
    for out, message in [
        (run, f"--out: {run} is the model's run directory ({run}); export to another directory"),
        (run / "model.keras", f"--out: {run / 'model.keras'} is a file; a SavedModel is a directory"),
        (other, f"--out: {other} is a directory holding other files than a SavedModel; "
                "--overwrite replaces only a SavedModel or an empty directory"),
        (afile, f"--out: {afile} is a file; a SavedModel is a directory"),
        (afile / "sub", f"--out: {afile} is not a directory"),
    ]:
        result = run_cli("selfkd_tf.cli.export", f"--model={run}", f"--out={out}", "--overwrite")
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert last_line(result.stderr) == f"selfkd-export: error: {message}"
        assert _listing(tmp_path) == before
        assert sorted(os.listdir(tmp_path)) == ["afile", "other", "run"]
    # Checked before the model is looked for.
    result = run_cli("selfkd_tf.cli.export", f"--model={tmp_path / 'absent'}",
                     f"--out={afile / 'sub'}")
    assert last_line(result.stderr) == f"selfkd-export: error: --out: {afile} is not a directory"
