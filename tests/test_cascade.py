"""The early-exit cascade: the right exit per example, deeper stages skipped, served alone."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.models import costs as costs_lib
from selfkd_tf.models import multi_exit
from selfkd_tf.serving import saved_model as export
from selfkd_tf.models.multi_exit import exit_segments
from selfkd_tf.serving.cascade import EarlyExitCascade, check_threshold
from selfkd_tf.serving.early_exit import first_confident_exit
from support import SERVING_CLASSES, environment, serving_input, serving_model


# A serving client: a fresh interpreter that never imports selfkd_tf. It
# calls every export at batch 64 and one image at a time, in uint8 and
# float32, and reads the cascade's stage counter after each pass.
LOADER = r"""
import sys
import numpy as np
import tensorflow as tf

out, images, cascade_path, *single_paths = sys.argv[1:]
images = np.load(images)
floats = tf.constant(images, tf.float32)
results = {}

def store(prefix, outputs):
    for key, value in outputs.items():
        value = value.numpy()
        # Class names come back as objects, which np.load would not read.
        results[f"{prefix}/{key}"] = value.astype(bytes) if value.dtype == object else value

def one_by_one(function, inputs):
    rows = [function(inputs[i:i + 1]) for i in range(len(inputs))]
    return {key: tf.concat([row[key] for row in rows], 0) for key in rows[0]}

cascade = tf.saved_model.load(cascade_path)
passes = {
    "batch/float": lambda: cascade.serve(floats),
    "batch/uint8": lambda: cascade.serve_uint8(tf.constant(images)),
    "single/float": lambda: one_by_one(cascade.serve, floats),
    "single/uint8": lambda: one_by_one(cascade.serve_uint8, tf.constant(images)),
    "signature/uint8": lambda: cascade.signatures["serve_uint8"](pixels_0_to_255=tf.constant(images)),
    "t0/float": lambda: cascade.serve(floats, threshold=0.0),
    "above1/float": lambda: cascade.signatures["serve_with_threshold"](
        pixels_0_to_255=floats, threshold=tf.constant(1.5)),
}
for name, run in passes.items():
    before = cascade.stage_examples().numpy()
    store(f"cascade/{name}", run())
    results[f"cascade/{name}/stage_examples"] = cascade.stage_examples().numpy() - before
results["cascade/classes"] = cascade.classes().numpy().astype(bytes)
for i, path in enumerate(single_paths):
    served = tf.saved_model.load(path)
    store(f"single{i}/float", served.serve(floats))
    store(f"single{i}/uint8", served.serve_uint8(tf.constant(images)))
assert "selfkd_tf" not in sys.modules
np.savez(out, **results)
"""


@pytest.fixture(scope="module")
def model():
    model = serving_model(seed=4)
    # Sharper classifiers spread the exits' confidences over (0.3, 1), so a
    # threshold can send examples to every exit.
    for k in (1, 2, 3):
        layer = model.backbone.get_layer(f"exit{k}_logits")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 5, bias])
    return model


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 16, 16, 3)) * rng.uniform(0.2, 1, (64, 1, 1, 1))
    return pixels.astype(np.uint8)


@pytest.fixture(scope="module")
def reference(model, images):
    """Every exit's logits on the whole batch, as the Keras model computes them."""
    logits = model(serving_input(images), training=False)["logits"]
    return np.stack([z.numpy() for z in logits])


def _confidences(logits):
    return keras.ops.softmax(logits).numpy().max(axis=-1)


@pytest.fixture(scope="module")
def threshold(reference):
    """A threshold that sends examples to each of the 3 exits, far from every
    shallow exit's confidence, so that float rounding cannot move an example."""
    confidences = _confidences(reference)

    def quality(t):
        counts = np.bincount(first_confident_exit(confidences, t), minlength=4)[1:]
        return counts.min(), np.abs(confidences[:-1] - t).min()

    best = max(np.round(np.linspace(0.3, 0.99, 70), 4), key=quality)
    count, margin = quality(best)
    assert count >= 5 and margin > 1e-4, (best, count, margin)
    return float(best)


def test_segments_compose_to_the_backbone_and_split_its_flops(model, images, reference):
    segments = exit_segments(model.backbone)
    features = serving_input(images)
    for k, (stage, head) in enumerate(zip(segments.stages, segments.heads)):
        features = stage(features, training=False)
        np.testing.assert_allclose(head(features, training=False), reference[k], atol=1e-5)
    costs = costs_lib.exit_costs(model.backbone)
    assert sum(costs.stage_flops) + sum(costs.head_flops) == costs_lib.count_flops(model.backbone)
    for k in (1, 2, 3):
        assert costs.single_exit(k) == costs_lib.count_flops(multi_exit.exit_model(model.backbone, k))
    assert costs.cascade_exit(1) < costs.cascade_exit(2) < costs.cascade_exit(3)
    assert costs.cascade_exit(3) - costs.single_exit(3) == sum(costs.head_flops[:2])


def test_each_example_answers_at_its_first_confident_exit(model, images, reference, threshold):
    cascade = EarlyExitCascade(model.backbone, threshold)
    outputs = tf.function(cascade)(serving_input(images))
    expected_exits = first_confident_exit(_confidences(reference), threshold)
    np.testing.assert_array_equal(outputs["exit_ids"], expected_exits)
    np.testing.assert_allclose(
        outputs["logits"], reference[expected_exits - 1, np.arange(len(images))], atol=1e-5)
    # Stage k ran only on the examples that no shallower exit answered.
    np.testing.assert_array_equal(
        cascade.stage_examples, [np.sum(expected_exits >= k) for k in (1, 2, 3)])


def test_one_image_at_a_time_skips_the_deeper_stages(model, images, reference, threshold):
    cascade = EarlyExitCascade(model.backbone, threshold)
    serve = tf.function(cascade)
    expected_exits = first_confident_exit(_confidences(reference), threshold)
    for image, exit_id in zip(serving_input(images), expected_exits):
        before = cascade.stage_examples.numpy()
        outputs = serve(image[None])
        assert outputs["exit_ids"].numpy().tolist() == [exit_id]
        ran = cascade.stage_examples.numpy() - before
        assert ran.tolist() == [1 if k <= exit_id else 0 for k in (1, 2, 3)]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "high", None])
def test_threshold_must_be_a_number_from_zero(bad):
    with pytest.raises(ValueError, match=r"^threshold: must be a number >= 0"):
        check_threshold(bad)


@pytest.fixture(scope="module")
def served(model, images, threshold, tmp_path_factory):
    """The cascade, exit-1 and deepest exports, run by a client without selfkd_tf."""
    root = tmp_path_factory.mktemp("cascade")
    cascade = export.export_saved_model(model, str(root / "cascade"), exit="cascade",
                                        threshold=threshold, class_names=SERVING_CLASSES)
    singles = [export.export_saved_model(model, str(root / f"exit{k}"), exit=k,
                                         class_names=SERVING_CLASSES) for k in (1, 3)]
    np.save(root / "images.npy", images)
    subprocess.run(
        [sys.executable, "-c", LOADER, str(root / "out.npz"), str(root / "images.npy"),
         cascade.path, *(s.path for s in singles)],
        cwd=root, env=environment(), check=True, timeout=300)
    return cascade, dict(np.load(root / "out.npz"))


def test_cascade_export_summary(served, model, threshold):
    summary, _ = served
    costs = costs_lib.exit_costs(model.backbone)
    assert (summary.exit, summary.threshold) == ("cascade", threshold)
    assert summary.exit_flops == tuple(costs.cascade_exit(k) for k in (1, 2, 3))
    assert (summary.params, summary.flops) == (summary.training_params, summary.training_flops)
    assert "answer at exit 1" in summary.table()


@pytest.mark.parametrize("name", ["batch/float", "batch/uint8", "single/float",
                                  "single/uint8", "signature/uint8"])
def test_served_cascade_answers_and_skips_at_batch_64_and_1(served, name, reference, threshold):
    _, results = served
    expected_exits = first_confident_exit(_confidences(reference), threshold)
    out = {key.rsplit("/", 1)[1]: value for key, value in results.items()
           if key.startswith(f"cascade/{name}/")}
    np.testing.assert_array_equal(out["exit_ids"], expected_exits)
    logits = reference[expected_exits - 1, np.arange(len(expected_exits))]
    np.testing.assert_allclose(out["logits"], logits, atol=1e-4)
    np.testing.assert_allclose(out["probabilities"], keras.ops.softmax(logits), atol=1e-5)
    np.testing.assert_array_equal(out["class_ids"], logits.argmax(-1))
    assert [n.decode() for n in out["class_names"]] == [
        SERVING_CLASSES[c] for c in logits.argmax(-1)]
    np.testing.assert_array_equal(out["stage_examples"],
                                  [np.sum(expected_exits >= k) for k in (1, 2, 3)])


@pytest.mark.parametrize("name, single, exit_id", [
    ("t0/float", 0, 1), ("above1/float", 1, 3)])
def test_threshold_0_and_above_1_equal_the_single_exit_exports_exactly(
        served, name, single, exit_id):
    _, results = served
    for key in ("probabilities", "logits", "class_ids", "class_names"):
        np.testing.assert_array_equal(results[f"cascade/{name}/{key}"],
                                      results[f"single{single}/float/{key}"], err_msg=key)
    assert set(results[f"cascade/{name}/exit_ids"].tolist()) == {exit_id}
    ran = results[f"cascade/{name}/stage_examples"]
    assert ran.tolist() == ([64, 0, 0] if exit_id == 1 else [64, 64, 64])


def test_served_cascade_names_its_classes(served):
    _, results = served
    assert [n.decode() for n in results["cascade/classes"]] == list(SERVING_CLASSES)


BAD_THRESHOLDS = [-1.0, float("nan"), float("inf")]


@pytest.mark.parametrize("bad", BAD_THRESHOLDS)
def test_cascade_call_refuses_a_bad_threshold(model, images, bad):
    """A per-call threshold the constructor would refuse fails the call
    (eagerly and in a graph) before any stage runs."""
    cascade = EarlyExitCascade(model.backbone, 0.5)
    inputs = serving_input(images[:4])
    for call in (cascade, tf.function(cascade)):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"threshold: must be a number >= 0"):
            call(inputs, threshold=bad)
    assert cascade.stage_examples.numpy().tolist() == [0, 0, 0]


def test_served_cascade_refuses_a_bad_threshold_per_call(served, images):
    """The client's call fails (as TF Serving reports an error) rather than
    answering every image at exit 1 (negative) or at the deepest exit (NaN)."""
    summary, _ = served
    cascade = tf.saved_model.load(summary.path)
    floats, uint8 = tf.constant(images[:4], tf.float32), tf.constant(images[:4])
    calls = {
        "serve": lambda t: cascade.serve(floats, threshold=t),
        "serve_uint8": lambda t: cascade.serve_uint8(uint8, threshold=t),
        "serve_with_threshold": lambda t: cascade.signatures["serve_with_threshold"](
            pixels_0_to_255=floats, threshold=tf.constant(t)),
        "serve_uint8_with_threshold": lambda t: cascade.signatures[
            "serve_uint8_with_threshold"](pixels_0_to_255=uint8, threshold=tf.constant(t)),
    }
    for name, call in calls.items():
        before = cascade.stage_examples().numpy()
        for bad in BAD_THRESHOLDS:
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match=r"threshold: must be a number >= 0"):
                call(bad)
        assert (cascade.stage_examples().numpy() == before).all(), name
        # Any threshold >= 0 still answers, including above 1.
        assert set(call(1.5)["exit_ids"].numpy().tolist()) == {3}, name
