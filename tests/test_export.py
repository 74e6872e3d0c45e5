"""selfkd-export: one exit as a SavedModel that takes raw pixels, without the rest."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from cli_support import environment, run_cli
from selfkd_tf import export, losses
from selfkd_tf.models import build_multi_exit_resnet
from selfkd_tf.training import SelfKDModel

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)

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
        ("single", default(images=tf.constant(images[:1], tf.float32))),
    ]:
        for key, value in outputs.items():
            results[f"{i}/{name}/{key}"] = value.numpy()
assert "selfkd_tf" not in sys.modules
np.savez(out, **results)
"""


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1)
    backbone = build_multi_exit_resnet("resnet18", 5, input_shape=(16, 16, 3),
                                       num_stages=3, width_multiplier=0.0625)
    return SelfKDModel(backbone, num_train_examples=8, config=losses.SelfKDConfig(),
                       input_mean=MEAN, input_std=STD)


def _expected(model, images, exit):
    normalized = (images.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    logits = [z.numpy() for z in model(normalized, training=False)["logits"]]
    if exit == "ensemble":
        probs = np.mean([keras.ops.softmax(z).numpy() for z in logits], axis=0)
        return probs, np.log(probs)
    return keras.ops.softmax(logits[exit - 1]).numpy(), logits[exit - 1]


def _layer_prefixes(network):
    return {layer.name.split("_")[0] for layer in network.layers}


def test_classifier_holds_only_what_the_exit_needs(model):
    deepest = export.classifier(model.backbone, 3)
    assert _layer_prefixes(deepest) == {"image", "stem", "stage1", "stage2", "stage3", "exit3"}
    shallowest = export.classifier(model.backbone, 1)
    assert _layer_prefixes(shallowest) == {"image", "stem", "stage1", "exit1"}
    ensemble = export.classifier(model.backbone, "ensemble")
    assert export.count_parameters(ensemble) == export.count_parameters(model.backbone)
    assert export.count_parameters(shallowest) < export.count_parameters(deepest)
    assert export.count_parameters(deepest) < export.count_parameters(model.backbone)


@pytest.mark.parametrize("exit", [4, "0", "x", "2.0"])
def test_unknown_exit_names_the_allowed_ones(exit):
    with pytest.raises(ValueError, match=r"^exit: got .*; allowed: 1..3, deepest, ensemble$"):
        export.resolve_exit(exit, 3)


def test_export_serves_the_models_outputs_in_a_fresh_process(model, tmp_path):
    exits = [3, 1, "ensemble"]
    summaries = [export.export_saved_model(model, str(tmp_path / f"exit_{e}"),
                                           exit="deepest" if e == 3 else e)
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
    assert train_params == export.count_parameters(model.backbone)
    assert (out / "saved_model.pb").exists()
