"""Keras's own `fit` under a `MultiWorkerMirroredStrategy` spanning several workers.

Keras 3's TensorFlow trainer (3.15.1 and earlier; keras-team/keras#20585,
tensorflow/tensorflow#72388) cannot train any model once the strategy really
spans several workers. Two of its functions take a multi-worker branch that
breaks the contract of `tf.distribute.MultiWorkerMirroredStrategy.reduce`,
which reduces one value at a time and, given an ``axis``, sums along that
axis of every replica's value:

- `TensorFlowTrainer._maybe_symbolic_build` (before the first step of `fit`
  and `evaluate`) reduces the whole first batch, an ``(x, y)`` structure, in
  one call (`DEFECT_BATCH_REDUCE`);
- ``reduce_per_replica`` (after every step) reduces each logged value along
  ``axis=0``, but logs are scalars (`DEFECT_SCALAR_LOGS`).

`MultiWorkerTrainer` is a mixin for `keras.Model` subclasses that routes
around both, in that class only: Keras itself is never patched, so every
other model of the process behaves as Keras made it. `SelfKDModel` inherits
it. The mixin also shards the data deliberately (`fit`).

Whether the installed Keras has the defects is found by running Keras's two
functions against `_MultiWorkerStandIn`, a stand-in strategy that Keras
takes for a multi-worker one and that checks each `reduce` call against the
contract above (`keras_multiworker_defects`). No cluster is needed, and no
version number is trusted: once a Keras release passes one value at a time
and reduces scalars without an axis, the mixin gets out of the way for that
defect.

Example:

```python
class MyModel(MultiWorkerTrainer, keras.Model):
    ...

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TF_CONFIG: 2 workers
with strategy.scope():
    model = MyModel(...)
    model.compile(...)
model.fit(global_batches, epochs=10)
```
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings

import tensorflow as tf

from selfkd_tf.distribution import replicas

DEFECT_BATCH_REDUCE = "batch_reduce"
"""`_maybe_symbolic_build` reduces a batch structure in one `reduce` call."""

DEFECT_SCALAR_LOGS = "scalar_logs"
"""``reduce_per_replica`` reduces scalar logs along ``axis=0``."""


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` is a `MultiWorkerMirroredStrategy` over several workers.

    This is the condition under which Keras's trainer takes its multi-worker
    branches: a ``TF_CONFIG`` cluster with more than one ``chief`` or
    ``worker`` task.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs) > 1


# -- detection ----------------------------------------------------------------


class _ContractViolation(Exception):
    """Keras called `reduce` in a way a multi-worker strategy cannot serve."""


class _OneReplica(tf.distribute.DistributedValues):
    """A distributed value with a single replica's component."""

    def __init__(self, value: tf.Tensor):
        self.values = (value,)


class _MultiWorkerExtended:
    def _in_multi_worker_mode(self) -> bool:  # what Keras asks
        return True


class _MultiWorkerStandIn(tf.distribute.MultiWorkerMirroredStrategy):
    """Passes for a multi-worker strategy, without a cluster.

    Nothing of the real strategy is initialised (no server, no collectives);
    `reduce` checks each call against the strategy's contract and returns
    the only replica's value.
    """

    def __init__(self):  # noqa: the real __init__ would join a cluster
        self._extended = _MultiWorkerExtended()

    @property
    def extended(self):
        return self._extended

    def scope(self):
        return contextlib.nullcontext()

    def reduce(self, reduce_op, value, axis=None):
        if tf.nest.is_nested(value):
            raise _ContractViolation("a structure in one reduce call")
        if isinstance(value, tf.distribute.DistributedValues):
            value = value.values[0]
        if axis is not None:
            if value.shape.rank == 0:
                raise _ContractViolation("a scalar reduced along an axis")
            value = tf.reduce_mean(value, axis=axis)
        return value


def _probe_batch_reduce(trainer_module) -> bool:
    stand_in = _MultiWorkerStandIn()
    trainer = types.SimpleNamespace(
        _distribute_strategy=stand_in, distribute_strategy=stand_in,
        _symbolic_build=lambda data_batch=None, iterator=None: None,
    )
    batch = (_OneReplica(tf.zeros((2, 3))), _OneReplica(tf.zeros((2,))))
    try:
        trainer_module.TensorFlowTrainer._maybe_symbolic_build(
            trainer, iterator=[(0, 0, iter([batch]))])
    except _ContractViolation:
        return True
    return False


def _probe_scalar_logs(trainer_module) -> bool:
    try:
        trainer_module.reduce_per_replica(
            {"loss": tf.constant(1.0)}, _MultiWorkerStandIn(), reduction="auto")
    except _ContractViolation:
        return True
    return False


@functools.cache
def keras_multiworker_defects() -> frozenset[str]:
    """The multi-worker defects of the installed Keras's TensorFlow trainer.

    Runs Keras's `TensorFlowTrainer._maybe_symbolic_build` and
    ``reduce_per_replica`` against a stand-in multi-worker strategy (see the
    module docstring); the result is cached for the process.

    Returns:
        A subset of {`DEFECT_BATCH_REDUCE`, `DEFECT_SCALAR_LOGS`}: the defects
        `MultiWorkerTrainer` routes around. Both with Keras 3.15.1.

    Warns:
        RuntimeWarning: when a probe cannot run (Keras reorganised its
            trainer); that defect then counts as fixed and Keras's own code
            runs.

    Example:

    >>> sorted(keras_multiworker_defects())  # Keras 3.15.1
    ['batch_reduce', 'scalar_logs']
    """
    from keras.src.backend.tensorflow import trainer as trainer_module

    defects = set()
    for defect, probe in ((DEFECT_BATCH_REDUCE, _probe_batch_reduce),
                          (DEFECT_SCALAR_LOGS, _probe_scalar_logs)):
        try:
            if probe(trainer_module):
                defects.add(defect)
        except Exception as error:  # noqa: BLE001 - any change of Keras's internals
            warnings.warn(
                f"cannot check Keras's trainer for the multi-worker defect "
                f"{defect!r} ({type(error).__name__}: {error}); assuming it is fixed",
                RuntimeWarning, stacklevel=2)
    return frozenset(defects)


# -- the mixin ----------------------------------------------------------------


def _shard_by_data(data):
    """``data`` with DATA auto-sharding if it is a dataset whose policy is AUTO.

    Every worker then runs the whole pipeline and keeps its part of each
    global batch: `tf.distribute` splits every batch into per-replica pieces
    and worker ``w`` keeps the pieces of its replicas. FILE sharding (what
    AUTO picks for file-based pipelines such as TFDS's) would give each worker
    different examples in a different order.
    """
    if not isinstance(data, tf.data.Dataset):
        return data
    policy = tf.data.experimental.AutoShardPolicy
    if data.options().experimental_distribute.auto_shard_policy != policy.AUTO:
        return data  # the caller chose
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy.DATA
    return data.with_options(options)


def _reduced_as_one_vector(make_function, step_function):
    """Keras's step function whose logs cross the workers as one vector.

    Keras reduces every log of a multi-worker step with
    ``strategy.reduce("MEAN", log, axis=0)``, two all-reduces per log, and
    logs are scalars, which have no axis 0. Inside the replica's step the
    logs are flattened into one ``[1, n]`` float64 tensor instead (exact for
    float32 values and integers below 2**53): Keras's reduction along its
    axis 0 is then the mean over all replicas of all workers, the reduction
    Keras applies on a single worker, in two all-reduces in all. The ``[n]``
    result is cut into the logs again, each in its own shape and dtype.

    Args:
        make_function: Keras's ``_make_function`` (bound to the model).
        step_function: the model's ``train_step`` or ``test_step``, whose
            logs have static shapes.

    Returns:
        What Keras's ``make_train_function``/``make_test_function`` keep: a
        function from an iterator (or a list of batches) to the logs.
    """
    traced = {}

    def flat_step(data):
        logs = step_function(data)
        traced["logs"] = logs  # shapes and dtypes, known once traced
        return tf.concat([tf.reshape(tf.cast(log, tf.float64), [-1])
                          for log in tf.nest.flatten(logs)], axis=0)[None]

    function = make_function(flat_step)

    def logs_of(data):
        flat = function(data)  # traces flat_step on the first call
        like = tf.nest.flatten(traced["logs"])
        parts = tf.split(flat, [log.shape.num_elements() for log in like])
        return tf.nest.pack_sequence_as(traced["logs"], [
            tf.cast(tf.reshape(part, log.shape), log.dtype) for part, log in zip(parts, like)])

    return logs_of


class MultiWorkerTrainer:
    """Mixin: Keras's `fit`/`evaluate` under a multi-worker `MultiWorkerMirroredStrategy`.

    Put it before `keras.Model` among the bases. Outside multi-worker mode
    (`in_multi_worker_mode`), and for each defect the installed Keras does
    not have (`keras_multiworker_defects`), every method defers to Keras.

    In multi-worker mode:

    - `fit` and `evaluate` shard a `tf.data.Dataset` whose auto-shard policy
      is AUTO by DATA: each worker reads its part of every global batch.
      Batch with the global batch size.
    - before the first step, Keras builds the model from the first local
      replica's part of the first batch instead of a cross-worker mean of
      the batch;
    - every step's logs are averaged over all replicas as one vector, which
      a multi-worker strategy can reduce, in two all-reduces instead of two
      per log.
    """

    def _routes_around(self, defect: str) -> bool:
        return (in_multi_worker_mode(self.distribute_strategy)
                and defect in keras_multiworker_defects())

    def fit(self, x=None, *args, validation_data=None, **kwargs):
        if in_multi_worker_mode(self.distribute_strategy):
            x, validation_data = _shard_by_data(x), _shard_by_data(validation_data)
        return super().fit(x, *args, validation_data=validation_data, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        if in_multi_worker_mode(self.distribute_strategy):
            x = _shard_by_data(x)
        return super().evaluate(x, *args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and self._routes_around(DEFECT_BATCH_REDUCE):
            data_batch = replicas.first_replica_batch(iterator, self.distribute_strategy)
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _make_function(self, step_function):
        if self._routes_around(DEFECT_SCALAR_LOGS):
            return _reduced_as_one_vector(super()._make_function, step_function)
        return super()._make_function(step_function)
