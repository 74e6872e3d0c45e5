"""Mixed precision keeps the PS-KD state in float32; XLA compiles the whole step."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from selfkd_tf.distribution.strategy import set_mixed_precision
from selfkd_tf.optimizers import make_optimizer
from selfkd_tf.distillation.model import SelfKDModel
from support import indexed_dataset, learnable_arrays, tiny_model

NUM_CLASSES = 4
NUM_EXAMPLES, BATCH, EPOCHS = 32, 16, 2


class _FirstUpdate(keras.callbacks.Callback):
    """The weights' change made by the first training step."""

    def on_train_begin(self, logs=None):
        self._before = [v.numpy() for v in self.model.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0 and not hasattr(self, "update"):
            self.update = np.concatenate([
                (v.numpy() - b).ravel()
                for v, b in zip(self.model.trainable_variables, self._before)
            ])


def _train(jit_compile: bool = False) -> tuple[SelfKDModel, dict, np.ndarray]:
    """Builds the tiny network under the current policy and trains 2 epochs.

    Plain SGD (no momentum) makes the first update ``-lr * gradient``; the
    second epoch reads the PS-KD table written in the first.
    """
    model = tiny_model(NUM_CLASSES, NUM_EXAMPLES, image_size=16, seed=0)
    model.compile(
        optimizer=make_optimizer(0.01, momentum=0.0, nesterov=False, schedule="constant"),
        jit_compile=jit_compile,
    )
    images, labels = learnable_arrays(NUM_EXAMPLES, NUM_CLASSES)
    first = _FirstUpdate()
    history = model.fit(indexed_dataset(images, labels, BATCH), epochs=EPOCHS,
                        verbose=0, callbacks=[first])
    return model, history.history, first.update


@pytest.fixture(scope="module")
def float32_run():
    set_mixed_precision("none")
    return _train()


@pytest.fixture
def restore_policy():
    yield
    set_mixed_precision("none")


@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_mixed_precision_computes_reduced_and_keeps_state_float32(
    mode, float32_run, restore_policy
):
    set_mixed_precision(mode)
    model, history, update = _train()
    layers = model.backbone.layers
    convs = [l for l in layers if isinstance(l, keras.layers.Conv2D)]
    assert convs and {l.compute_dtype for l in convs} == {mode}
    for layer in layers:
        if layer.name.endswith(("_logits", "_features")):
            assert layer.compute_dtype == "float32", layer.name
    outputs = model(np.zeros((2, 16, 16, 3), "float32"), training=False)
    assert {t.dtype.name for t in outputs["logits"] + outputs["features"]} == {"float32"}
    assert {v.dtype for v in model.variables} == {"float32"}
    optimizer_floats = {v.dtype for v in model.optimizer.variables if "float" in v.dtype}
    assert optimizer_floats == {"float32"}
    assert model.soft_target_table.dtype == "float32"
    np.testing.assert_array_equal(model.soft_target_valid.numpy(), 1.0)
    np.testing.assert_allclose(model.soft_target_table.numpy().sum(-1), 1.0, atol=1e-5)
    for name in ("loss", "ce", "byot", "dmfl"):
        assert np.all(np.isfinite(history[name])), name
    # float16 steps go through loss scaling: a missing scale or unscale would
    # make the first update 2**15 times too small or too large. bfloat16's
    # 8-bit mantissa alone puts this tiny network's update ~12% off.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
        mode == "float16"
    )
    reference = float32_run[2]
    assert np.linalg.norm(update - reference) < 0.25 * np.linalg.norm(reference)


def test_xla_step_trains_like_the_graph_step(float32_run):
    model, history, _ = _train(jit_compile=True)
    assert model.jit_compile
    _, reference, _ = float32_run
    for name in ("loss", "ce", "byot", "dmfl"):
        np.testing.assert_allclose(history[name], reference[name], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(
        model.soft_target_table.numpy(), float32_run[0].soft_target_table.numpy(), atol=1e-4
    )


def test_precision_names_are_checked(restore_policy):
    assert set_mixed_precision("bfloat16").name == "mixed_bfloat16"
    assert set_mixed_precision("none").name == "float32"
    with pytest.raises(ValueError, match="mixed_precision"):
        set_mixed_precision("int8")
