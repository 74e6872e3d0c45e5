"""The paper's learning-rate schedules, and its optimiser built with one.

The reference code (PS-KD, BYOT) trains with ``torch.optim.SGD``, lr 0.1,
Nesterov momentum 0.9, and ``MultiStepLR`` (x0.1 at 50% and 75% of the
epochs) or cosine annealing; `make_optimizer` builds that with
`selfkd_tf.optimizers.sgd.SGD`, which takes PyTorch's steps.

Example:

```python
optimizer = make_optimizer(0.1, epochs=100, steps_per_epoch=20)
model.compile(optimizer=optimizer)  # x0.1 after epochs 50 and 75
```
"""

from __future__ import annotations

import math

import keras

from selfkd_tf.optimizers.sgd import SGD

LR_SCHEDULES = ("multistep", "cosine", "constant")


def learning_rate_schedule(
    learning_rate: float = 0.1,
    schedule: str = "multistep",
    epochs: int = 300,
    steps_per_epoch: int = 1,
) -> keras.optimizers.schedules.LearningRateSchedule | float:
    """The paper's learning-rate schedules, indexed by optimizer step.

    ``multistep`` multiplies the rate by 0.1 after epoch ``epochs // 2``
    and again after epoch ``epochs * 3 // 4`` (the PS-KD recipe's 150 and
    225 of 300, as ``torch.optim.lr_scheduler.MultiStepLR`` steps once per
    epoch: a milestone of 0 never applies, so 1 epoch trains at
    ``learning_rate`` throughout); ``cosine`` decays to 0 over all steps;
    ``constant`` keeps it fixed. Being a function of the optimizer's step
    counter, the schedule resumes exactly from a checkpoint.

    Raises:
        ValueError: an unknown ``schedule``, a ``learning_rate`` that is not
            a finite number >= 0, or ``epochs`` or ``steps_per_epoch`` < 1.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"lr_schedule: got {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}."
        )
    # 0 is allowed, as by torch.optim.SGD: it freezes the weights.
    if not (math.isfinite(learning_rate) and learning_rate >= 0):
        raise ValueError(f"lr: got {learning_rate}; allowed: finite numbers >= 0")
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: got {value!r}; allowed: integers >= 1")
    if schedule == "constant":
        return learning_rate
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            learning_rate, epochs * steps_per_epoch)
    milestones = [m for m in (epochs // 2, epochs * 3 // 4) if m >= 1]
    if not milestones:
        return learning_rate
    # PiecewiseConstantDecay switches *after* a boundary step; subtracting
    # one makes the first step of the decayed epoch use the decayed rate.
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [m * steps_per_epoch - 1 for m in milestones],
        [learning_rate * 0.1**i for i in range(len(milestones) + 1)],
    )


def make_optimizer(
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    schedule: str = "multistep",
    epochs: int = 300,
    steps_per_epoch: int = 1,
) -> SGD:
    """The paper's optimiser: `SGD` (PyTorch momentum), Nesterov 0.9, lr 0.1.

    Weight decay is not set here: `SelfKDModel` applies it as coupled L2
    (``weight_decay`` argument), which Keras's decoupled ``weight_decay``
    would not reproduce under momentum. A scheduled optimizer carries
    ``schedule_span = (epochs, steps_per_epoch)``, which
    `SelfKDModel.fit` checks against the epochs and steps it trains.

    Raises:
        ValueError: a ``momentum`` outside [0, 1), a ``nesterov`` that is not
            a bool, or a bad schedule argument (`learning_rate_schedule`).
    """
    if not 0 <= momentum < 1:  # also refuses NaN
        raise ValueError(f"momentum: got {momentum}; allowed: [0, 1)")
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov: got {nesterov!r}; allowed: True, False")
    optimizer = SGD(
        learning_rate=learning_rate_schedule(
            learning_rate, schedule, epochs, steps_per_epoch
        ),
        momentum=float(momentum),
        nesterov=nesterov,
    )
    if schedule != "constant":
        # `SelfKDModel.fit` refuses to train other epochs than the schedule
        # spans; not saved with the optimizer.
        optimizer.schedule_span = (epochs, steps_per_epoch)
    return optimizer
