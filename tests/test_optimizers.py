"""`selfkd_tf.optimizers`: PyTorch's SGD steps, and checkpoints across momentum forms."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.experiment import checkpointing
from selfkd_tf.optimizers import SGD, convert_momentum, learning_rate_schedule, make_optimizer

# Keras's own weight serialization trips a NumPy 2 deprecation notice.
pytestmark = pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")

GRADIENTS = (1.0, 2.0, -1.0, 0.5)
RATES = (0.1, 0.1, 0.01, 0.01)  # a x0.1 drop before the third step


def _steps(optimizer, gradients=GRADIENTS, start=1.0):
    """The variable's value after each of ``gradients``, applied one by one."""
    variable = keras.Variable(start)
    values = []
    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(gradient), variable)])
        values.append(float(variable.numpy()))
    return values


def _dropping_rate(step):
    return tf.where(step < 2, 0.1, 0.01)


class _Drop(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
        return _dropping_rate(step)


def _torch_sgd(nesterov):
    """``torch.optim.SGD`` (dampening 0) written out in numpy."""
    p, buffer, values = 1.0, 0.0, []
    for g, lr in zip(GRADIENTS, RATES):
        buffer = 0.9 * buffer + g
        p -= lr * (g + 0.9 * buffer if nesterov else buffer)
        values.append(p)
    return values


@pytest.mark.parametrize("nesterov", [True, False])
def test_steps_are_pytorch_sgd_across_a_rate_drop(nesterov):
    values = _steps(SGD(_Drop(), momentum=0.9, nesterov=nesterov))
    np.testing.assert_allclose(values, _torch_sgd(nesterov), rtol=1e-6)
    if nesterov:
        # By hand: b=1, p=1-0.1*1.9=0.81; b=2.9, p=0.81-0.1*4.61=0.349;
        # b=1.61, p=0.349-0.01*0.449=0.34451.
        np.testing.assert_allclose(values[:3], [0.81, 0.349, 0.34451], rtol=1e-6)


def test_keras_sgd_takes_the_same_steps_until_the_rate_changes():
    """Why `SGD` exists: Keras's velocity keeps the old rate after a drop."""
    keras_values = _steps(keras.optimizers.SGD(_Drop(), momentum=0.9, nesterov=True))
    torch_values = _torch_sgd(nesterov=True)
    np.testing.assert_allclose(keras_values[:2], torch_values[:2], rtol=1e-6)
    # Third step (rate 0.01, gradient -1): Keras's velocity -0.29 still holds
    # the old rate, 0.9 * (0.9 * -0.29 + 0.01) + 0.01 = -0.2159, against
    # PyTorch's -0.01 * (-1 + 0.9 * 1.61) = -0.00449.
    np.testing.assert_allclose(keras_values[2] - keras_values[1], -0.2159, rtol=1e-5)
    keras_step = keras_values[2] - keras_values[1]
    torch_step = torch_values[2] - torch_values[1]
    assert abs(keras_step) > 10 * abs(torch_step)


def test_without_momentum_a_step_is_minus_rate_times_gradient():
    values = _steps(SGD(0.1, momentum=0.0), gradients=(1.0, 2.0))
    np.testing.assert_allclose(values, [0.9, 0.7], rtol=1e-6)


def test_make_optimizer_is_pytorch_sgd_and_round_trips_through_config():
    optimizer = make_optimizer(0.1, epochs=4, steps_per_epoch=5)
    assert isinstance(optimizer, SGD)
    assert optimizer.nesterov and optimizer.momentum == 0.9
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is SGD


def test_convert_momentum_refuses_what_has_no_momentum():
    with pytest.raises(ValueError, match="built SGD with momentum"):
        convert_momentum(SGD(0.1, momentum=0.0), to_rate_form=True)


def _model(optimizer):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer)
    model.optimizer.build(model.trainable_variables)
    return model


def _apply(model, gradient):
    model.optimizer.apply_gradients(
        [(tf.fill(v.shape, gradient), v) for v in model.trainable_variables])


def _run(optimizer_class, gradients, rate=0.1):
    keras.utils.set_random_seed(0)
    model = _model(optimizer_class(rate, momentum=0.9, nesterov=True))
    for gradient in gradients:
        _apply(model, gradient)
    return model


@pytest.mark.parametrize("written,resumed", [
    (keras.optimizers.SGD, SGD), (SGD, keras.optimizers.SGD), (SGD, SGD)],
    ids=["keras-to-pytorch", "pytorch-to-keras", "pytorch-to-pytorch"])
def test_a_checkpoint_resumes_under_either_momentum_form_without_a_jump(
        tmp_path, written, resumed):
    """Two steps, a checkpoint, two more: the same weights as four steps."""
    gradients = (1.0, -2.0, 0.5, 3.0)
    reference = _run(written, gradients)
    first = _run(written, gradients[:2])
    checkpointing.TrainingCheckpoint(first, str(tmp_path)).save(
        checkpointing.Position(), 2)
    second = _run(resumed, ())
    checkpointing.TrainingCheckpoint(second, str(tmp_path)).restore_latest()
    for gradient in gradients[2:]:
        _apply(second, gradient)
    for a, b in zip(reference.get_weights(), second.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_checkpoint_that_does_not_say_its_form_is_read_as_keras_momentum(tmp_path):
    """Checkpoints from before `SGD` hold Keras's velocities and no marker."""
    gradients = (1.0, -2.0, 0.5)
    reference = _run(keras.optimizers.SGD, gradients)
    first = _run(keras.optimizers.SGD, gradients[:2])
    progress = checkpointing._Progress()
    tf.train.Checkpoint(
        model=first, optimizer=first.optimizer,
        metrics=[v for m in first.metrics for v in m.variables], progress=progress,
    ).save(str(tmp_path / "ckpt"))
    with open(tmp_path / "checkpoint", "w") as state:
        state.write('model_checkpoint_path: "ckpt-1"\n')
    resumed = _run(SGD, ())
    checkpointing.TrainingCheckpoint(resumed, str(tmp_path)).restore_latest()
    np.testing.assert_allclose(
        resumed.optimizer.momentums[0].numpy(),
        -first.optimizer.momentums[0].numpy() / 0.1, rtol=1e-6)
    _apply(resumed, gradients[2])
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_converted_checkpoint_is_saved_in_the_new_form(tmp_path):
    """Keras form -> `SGD` -> `SGD`: the second resume must not convert again."""
    gradients = (1.0, -2.0, 0.5, 3.0)
    reference = _run(keras.optimizers.SGD, gradients)
    first = _run(keras.optimizers.SGD, gradients[:2])
    checkpointing.TrainingCheckpoint(first, str(tmp_path / "a")).save(
        checkpointing.Position(), 2)
    second = _run(SGD, ())
    checkpointing.TrainingCheckpoint(second, str(tmp_path / "a")).restore_latest()
    _apply(second, gradients[2])
    checkpointing.TrainingCheckpoint(second, str(tmp_path / "b")).save(
        checkpointing.Position(), 3)
    third = _run(SGD, ())
    checkpointing.TrainingCheckpoint(third, str(tmp_path / "b")).restore_latest()
    np.testing.assert_allclose(third.optimizer.momentums[0].numpy(),
                               second.optimizer.momentums[0].numpy(), rtol=1e-6)
    _apply(third, gradients[3])
    for a, b in zip(reference.get_weights(), third.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_mixed_precision_checkpoints_resume_across_forms(tmp_path):
    """Mixed precision wraps the SGD in a LossScaleOptimizer; the form is the inner one's."""
    def run(optimizer_class, gradients):
        keras.utils.set_random_seed(0)
        model = _model(keras.optimizers.LossScaleOptimizer(
            optimizer_class(0.1, momentum=0.9, nesterov=True)))
        for gradient in gradients:
            _apply(model, gradient)
        return model

    gradients = (1.0, -2.0, 0.5)
    reference = run(keras.optimizers.SGD, gradients)
    first = run(keras.optimizers.SGD, gradients[:2])
    checkpointing.TrainingCheckpoint(first, str(tmp_path)).save(
        checkpointing.Position(), 2)
    resumed = run(SGD, ())
    checkpointing.TrainingCheckpoint(resumed, str(tmp_path)).restore_latest()
    inner = resumed.optimizer.inner_optimizer
    np.testing.assert_allclose(
        inner.momentums[0].numpy(),
        -first.optimizer.inner_optimizer.momentums[0].numpy() / 0.1, rtol=1e-6)
    _apply(resumed, gradients[2])
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("epochs,rates", [
    (1, [0.1, 0.1]),                          # no milestone: MultiStepLR's 0 never applies
    (2, [0.1, 0.1, 0.001, 0.001]),            # both milestones after epoch 1
    (3, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]),
    (4, [0.1] * 4 + [0.01] * 2 + [0.001] * 2),
])
def test_multistep_drops_after_epochs_half_and_three_quarters(epochs, rates):
    schedule = learning_rate_schedule(0.1, "multistep", epochs=epochs, steps_per_epoch=2)
    got = [float(keras.ops.convert_to_numpy(schedule(step))) if callable(schedule)
           else schedule for step in range(2 * epochs)]
    np.testing.assert_allclose(got, rates, rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(momentum=float("nan")), "momentum"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(learning_rate=float("inf")), "lr"),
    (dict(learning_rate=float("nan")), "lr"),
    (dict(learning_rate=-0.1), "lr"),
    (dict(epochs=0), "epochs"),
    (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(nesterov="no"), "nesterov"),
])
def test_make_optimizer_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}: got"):
        make_optimizer(**kwargs)


def test_make_optimizer_takes_an_integer_momentum_of_zero():
    assert make_optimizer(momentum=0).momentum == 0.0


def test_decoupled_weight_decay_is_refused():
    with pytest.raises(ValueError, match="coupled L2"):
        SGD(0.1, momentum=0.9, weight_decay=0.5)
