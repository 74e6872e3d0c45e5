"""SGD with PyTorch's momentum, as the reference code trains.

The reference code (PS-KD, BYOT) trains with ``torch.optim.SGD``, whose
momentum buffer sums gradients and is multiplied by the learning rate at
every step. Keras's ``keras.optimizers.SGD`` keeps the learning rate inside
its velocity instead. With a constant rate the two take identical steps;
when a schedule lowers the rate they do not: Keras keeps moving along the
old velocity, about ``momentum / (1 - momentum)`` steps (9 at 0.9) of the
*old* size with a ten times weaker correction, which shows as a dip in
training accuracy right after each drop where an epoch has few steps. `SGD`
here takes PyTorch's steps, so a drop takes effect at once.

Checkpoints record which form a momentum is in (`momentum_holds_rate`), so
a run resumes under either without a jump (`convert_momentum`).

Example:

```python
optimizer = SGD(learning_rate=0.1, momentum=0.9, nesterov=True)
model.compile(optimizer=optimizer)
```
"""

from __future__ import annotations

import keras
from keras import ops

@keras.saving.register_keras_serializable(package="selfkd_tf")
class SGD(keras.optimizers.SGD):
    """SGD whose momentum is PyTorch's (``torch.optim.SGD``, dampening 0).

    For a variable ``p`` with gradient ``g``, momentum ``mu`` and the
    step's learning rate ``lr``, the momentum buffer ``b`` (zeros at the
    start, one per variable, the same shape and dtype) is updated as::

        b <- mu * b + g
        p <- p - lr * (g + mu * b)    # nesterov=True
        p <- p - lr * b               # nesterov=False

    (PyTorch's ``torch/optim/sgd.py``). Keras's `keras.optimizers.SGD`
    stores ``v = -lr * b`` instead, accumulated at past rates, so its steps
    differ from these after every change of the rate. Arguments and
    schedules are those of `keras.optimizers.SGD`, except ``weight_decay``:
    Keras's is decoupled, PyTorch's coupled, so it is refused here; the
    model's coupled L2 decay (`selfkd_tf.distillation.model.SelfKDModel`
    ``weight_decay``) is part of ``g``.

    Raises:
        ValueError: a ``weight_decay``.
    """

    def __init__(self, *args, weight_decay=None, **kwargs):
        if weight_decay:
            raise ValueError(
                "weight_decay: SGD takes PyTorch's steps, whose weight decay is "
                "coupled L2; pass it to SelfKDModel(weight_decay=...) instead")
        super().__init__(*args, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0:
            super().update_step(gradient, variable, learning_rate)
            return
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        momentum = ops.cast(self.momentum, variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        self.assign(buffer, ops.add(ops.multiply(buffer, momentum), gradient))
        direction = buffer
        if self.nesterov:
            direction = ops.add(gradient, ops.multiply(buffer, momentum))
        self.assign_sub(variable, ops.multiply(direction, learning_rate))


def sgd_with_momentum(optimizer: keras.optimizers.Optimizer
                      ) -> keras.optimizers.SGD | None:
    """The `keras.optimizers.SGD` (or `SGD`) with momentum that ``optimizer``
    is or wraps (mixed precision wraps it in a ``LossScaleOptimizer``), or
    None."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(optimizer, keras.optimizers.SGD) and optimizer.momentum != 0:
        return optimizer
    return None


def momentum_holds_rate(optimizer: keras.optimizers.Optimizer) -> bool:
    """Whether ``optimizer``'s momentum slots hold Keras's ``-lr * b``.

    True for a `keras.optimizers.SGD` with momentum that is not `SGD`
    (also inside a ``LossScaleOptimizer``); false for `SGD` (which holds
    ``b``) and any other optimiser.
    """
    sgd = sgd_with_momentum(optimizer)
    return sgd is not None and not isinstance(sgd, SGD)


def convert_momentum(optimizer: keras.optimizers.Optimizer,
                     to_rate_form: bool) -> None:
    """Rewrites a built SGD's momentum slots between the two forms.

    ``b = -v / lr`` (``to_rate_form=False``) or ``v = -lr * b``, with
    ``lr`` the rate of the optimiser's next step. Both forms then take the
    same steps until the rate next changes, so a Keras-form checkpoint
    resumes under `SGD` (and back) without a jump. At a rate of 0 (the end
    of a cosine schedule) the buffers become 0.

    Raises:
        ValueError: ``optimizer`` is not (and does not wrap) a built
            `keras.optimizers.SGD` with momentum.
    """
    sgd = sgd_with_momentum(optimizer)
    if sgd is None or not sgd.built:
        raise ValueError("convert_momentum: needs a built SGD with momentum")
    rate = float(ops.convert_to_numpy(sgd.learning_rate))
    for slot in sgd.momentums:
        if to_rate_form:
            slot.assign(slot * -rate)
        else:
            slot.assign(slot * (-1.0 / rate) if rate else ops.zeros_like(slot))
