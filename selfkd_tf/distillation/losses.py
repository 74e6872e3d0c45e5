"""The self-distillation objective: PS-KD soft targets, BYOT and DMFL.

Every function here is pure TensorFlow math on tensors, so it can be reused
in a custom training loop and checked against numbers computed by hand.

Notation (N exits, ``i = 1..N`` from shallowest to deepest):

- ``z_i``: logits of exit ``i``, ``[B, C]``; ``P_i = softmax(z_i)``.
- ``F_i``: adapted feature of exit ``i``, ``[B, D]`` (every exit has the
  deepest feature's width ``D``).
- ``y_soft``: the target distribution, ``[B, C]``.

The full objective is ``L = L_CE + L_SelfKD + L_DMFL`` where

- ``L_CE = CE(P_N, y_soft)``, averaged over the batch;
- ``L_SelfKD`` (BYOT) ``= sum_{i in S} [(1 - a) CE(P_i, y_soft)
  + a T^2 KL(softmax(z_N / T) || softmax(z_i / T)) + lam ||F_i - F_N||^2]
  + (1 - a) CE(P_N, y_soft)``, with the deepest logits and feature held
  constant inside the KL and hint terms, and the squared error summed over
  channels *and* over the batch (so ``lam = 1e-6`` keeps its published
  meaning);
- ``L_DMFL = 1 / (N - 1) sum_{i < N} [KL(q_i || q_N) + KL(q_N || q_i)]``
  with ``q = softmax`` over the feature channels, each KL averaged over the
  batch; in each direction the first argument is the (constant) target.

The controls of `selfkd_tf.distillation.config` change two parts: label
smoothing (``"ls"``) makes ``y_soft`` the smoothed label
``(1 - eps) onehot(y) + eps / C``; deep supervision (``"ds"``) takes the
place of ``L_SelfKD`` with its cross-entropies alone,
``(1 - a) [sum_{i in S} CE(P_i, y_soft) + CE(P_N, y_soft)]``, logged as the
``byot`` term.

Averages are taken over the *global* batch (``global_batch_size``), so that
per-replica losses summed by a ``tf.distribute`` strategy give the same
gradient as one replica on the whole batch, however unevenly the batch is
shared between the replicas.

Per-example weights (``sample_weight``, ``[B]``) follow Keras's built-in
losses (reduction ``"sum_over_batch_size"``): every per-example quantity
``l_j`` of every term enters as ``w_j l_j``, and the normalisation is
unchanged. Averages stay ``sum_j w_j l_j / B`` with ``B`` the number of
examples in the global batch (not the sum of the weights), and the BYOT hint
stays a sum, ``lam sum_j w_j ||F_i,j - F_N,j||^2``. Weights of 1 give the
unweighted objective; an example of weight 0 contributes nothing and gets no
gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from selfkd_tf.distillation import batches
from selfkd_tf.distillation.config import DMFL_GRADIENTS, SelfKDConfig
from selfkd_tf.distillation.pskd import soft_targets


def soft_cross_entropy(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Per-example ``-sum_c targets_c log softmax(logits)_c``; ``[B]``."""
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)


def kl_divergence(target_logits: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example ``KL(softmax(target_logits) || softmax(logits))``; ``[B]``.

    Computed from logits in log space for numerical stability.
    """
    target_log_probs = tf.nn.log_softmax(target_logits, axis=-1)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    return tf.reduce_sum(
        tf.exp(target_log_probs) * (target_log_probs - log_probs), axis=-1
    )


def _weighted_sum(values: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    """``sum_j w_j values_j`` over the batch (``sum_j values_j`` without weights).

    Args:
        values: float32 ``[B]`` per-example values.
        sample_weight: optional float32 ``[B]`` per-example weights.

    Returns:
        A float32 scalar; 0 for an empty batch.
    """
    if sample_weight is not None:
        values = values * tf.cast(sample_weight, values.dtype)
    return tf.reduce_sum(values)


def _weighted_mean(values: tf.Tensor, sample_weight: tf.Tensor | None,
                   global_batch_size) -> tf.Tensor:
    """``sum_j w_j values_j / B``; 0 for a batch of no example (0 / 0)."""
    return tf.math.divide_no_nan(_weighted_sum(values, sample_weight),
                                 tf.cast(global_batch_size, tf.float32))


def _exit_outputs(name: str, tensors: Sequence[tf.Tensor], minimum: int = 1
                  ) -> list[tf.Tensor]:
    """``tensors`` as float32, checked to be ``[B, n]`` each, at least ``minimum``.

    Raises:
        ValueError: not a list of at least ``minimum`` rank-2 tensors of one
            width and one batch size (where the shapes are known).
    """
    if isinstance(tensors, (tf.Tensor, dict)) or not isinstance(tensors, Sequence):
        raise ValueError(f"{name}: a list of one [B, n] tensor per exit, shallowest "
                         f"first; got {type(tensors).__name__}")
    tensors = [tf.cast(t, tf.float32) for t in tensors]
    if len(tensors) < minimum:
        raise ValueError(f"{name}: needs at least {minimum} exits (every shallow exit is "
                         f"compared with the deepest); got {len(tensors)}")
    shapes = [t.shape for t in tensors]
    if any(s.rank != 2 for s in shapes) or len({s[-1] for s in shapes}) > 1 or len(
            {s[0] for s in shapes if s[0] is not None}) > 1:
        raise ValueError(f"{name}: every exit's tensor must be [B, n] with the same B and "
                         f"n; got shapes {[tuple(s) for s in shapes]}")
    return tensors


def byot_terms(
    logits: Sequence[tf.Tensor],
    features: Sequence[tf.Tensor],
    targets: tf.Tensor,
    config: SelfKDConfig,
    global_batch_size: tf.Tensor | float,
    sample_weight: tf.Tensor | None = None,
    distill: bool = True,
) -> dict[str, tf.Tensor]:
    """BYOT ("Be Your Own Teacher") terms, reduced over the global batch.

    The deepest exit's logits and feature are the teacher: they are held
    constant in the KL and hint terms. The KL term is the true KL divergence;
    the reference implementation uses the soft cross-entropy instead, which
    differs by the teacher's entropy, a constant, so gradients are equal.
    Without ``distill`` the KL and hint terms are 0: what is left is deep
    supervision, every exit's cross-entropy with BYOT's weights.

    Args:
        logits: N tensors ``[B, C]``, shallowest to deepest.
        features: N tensors ``[B, D]``.
        targets: ``[B, C]`` soft targets.
        config: the settings (``byot_alpha``, ``byot_lambda``,
            ``temperature``, ``byot_exits``).
        global_batch_size: number of examples the averages divide by.
        sample_weight: optional ``[B]`` (or ``[B, 1]``) per-example weights
            (see the module docstring); they scale each example's CE, KL and
            hint.
        distill: whether the KL and hint terms are on (BYOT) or 0 (deep
            supervision).

    Returns:
        ``{"byot_ce", "byot_kl", "byot_hint"}`` scalars; their sum is
        ``L_SelfKD``.

    Raises:
        ValueError: logits or features that are not lists of ``[B, n]``
            tensors, or weights of another shape than ``[B]``/``[B, 1]``.
    """
    logits = _exit_outputs("logits", logits)
    features = _exit_outputs("features", features)
    sample_weight = batches.per_example_weights(sample_weight)
    alpha, temperature = config.byot_alpha, config.temperature
    teacher_logits = tf.stop_gradient(logits[-1]) / temperature
    teacher_feature = tf.stop_gradient(features[-1])
    ce = soft_cross_entropy(logits[-1], targets)
    kl = tf.zeros_like(ce)
    hint = tf.zeros_like(ce)
    for i in config.shallow_byot_exits(len(logits)):
        ce += soft_cross_entropy(logits[i - 1], targets)
        if distill:
            kl += kl_divergence(teacher_logits, logits[i - 1] / temperature)
            hint += tf.reduce_sum(tf.square(features[i - 1] - teacher_feature), axis=-1)
    return {
        "byot_ce": (1.0 - alpha) * _weighted_mean(ce, sample_weight, global_batch_size),
        "byot_kl": alpha * temperature**2 * _weighted_mean(kl, sample_weight,
                                                           global_batch_size),
        # Summed, not averaged, over the batch: the published lambda assumes it.
        "byot_hint": config.byot_lambda * _weighted_sum(hint, sample_weight),
    }


def dmfl_loss(
    features: Sequence[tf.Tensor],
    gradient: str = "mutual",
    global_batch_size: tf.Tensor | float | None = None,
    sample_weight: tf.Tensor | None = None,
) -> tf.Tensor:
    """Deep mutual feature learning between each shallow exit and the deepest.

    ``1 / (N - 1) sum_{i < N} [KL(q_i || q_N) + KL(q_N || q_i)]`` with
    ``q = softmax`` over the feature channels. With ``gradient="mutual"`` the
    first argument of each KL is held constant, so ``KL(q_N || q_i)`` trains
    the shallow exit and ``KL(q_i || q_N)`` trains the deepest feature.
    With ``"none"`` the value is the same but passes no gradient.

    Args:
        features: N tensors ``[B, D]``, shallowest to deepest.
        gradient: ``"mutual"`` or ``"none"``.
        global_batch_size: what the batch average divides by (default: the
            local batch size).
        sample_weight: optional ``[B]`` (or ``[B, 1]``) per-example weights; each example's
            summed KLs are scaled by its weight.

    Returns:
        A scalar; 0 for a batch of no example.

    Raises:
        ValueError: fewer than 2 features (DMFL compares shallow exits with
            the deepest), features that are not ``[B, D]`` tensors, weights
            of another shape than ``[B]``/``[B, 1]``, or an unknown
            ``gradient``.
    """
    if gradient not in DMFL_GRADIENTS:
        raise ValueError(
            f"dmfl_gradient: got {gradient!r}; allowed: {', '.join(DMFL_GRADIENTS)}."
        )
    features = _exit_outputs("features", features, minimum=2)
    sample_weight = batches.per_example_weights(sample_weight)
    deepest = features[-1]
    if global_batch_size is None:
        global_batch_size = tf.cast(tf.shape(deepest)[0], deepest.dtype)
    total = tf.zeros(tf.shape(deepest)[:1], deepest.dtype)
    for shallow in features[:-1]:
        total += kl_divergence(tf.stop_gradient(shallow), deepest)
        total += kl_divergence(tf.stop_gradient(deepest), shallow)
    loss = _weighted_mean(total, sample_weight, global_batch_size) / (len(features) - 1)
    return tf.stop_gradient(loss) if gradient == "none" else loss



def selfkd_loss(
    logits: Sequence[tf.Tensor],
    features: Sequence[tf.Tensor],
    labels: tf.Tensor,
    config: SelfKDConfig,
    teacher_probs: tf.Tensor | None = None,
    alpha_t: tf.Tensor | float = 0.0,
    teacher_valid: tf.Tensor | None = None,
    global_batch_size: tf.Tensor | float | None = None,
    sample_weight: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """The whole objective ``L = L_CE + L_SelfKD + L_DMFL``, term by term.

    Args:
        logits: N tensors ``[B, C]``, shallowest to deepest.
        features: N tensors ``[B, D]``.
        labels: class ids ``[B]`` or ``[B, 1]`` (integers, or whole-number
            floats), as `SelfKDModel` takes them.
        config: which methods are on and their hyperparameters.
        teacher_probs: ``[B, C]`` stored previous-epoch predictions for these
            samples (used only with ``"pskd"``).
        alpha_t: current PS-KD weight.
        teacher_valid: optional ``[B]`` 0/1 mask of rows with a stored
            prediction.
        global_batch_size: what batch averages divide by; default the local
            batch size. Under ``tf.distribute`` pass the global batch size.
        sample_weight: optional ``[B]`` (or ``[B, 1]``) per-example weights, applied to every
            term as the module docstring describes; ``None`` weighs every
            example 1.

    Returns:
        A dict of scalars: ``"ce"``, ``"byot"`` (with its parts
        ``"byot_ce"``, ``"byot_kl"``, ``"byot_hint"``; deep supervision's
        cross-entropies under ``"byot_ce"``), ``"dmfl"`` and ``"total"``.
        Terms of disabled methods are 0; every term is 0 for a batch of no
        example.

    Raises:
        ValueError: logits or features that are not lists of one ``[B, n]``
            tensor per exit, labels or weights of another shape than
            ``[B]``/``[B, 1]`` (one-hot labels), or methods that need
            shallow exits on a network with one exit.
        tf.errors.InvalidArgumentError: when run, a class id outside
            ``[0, C)`` or a float label with a fraction.

    Example:

    >>> logits = [tf.zeros([2, 3]), tf.ones([2, 3])]
    >>> features = [tf.ones([2, 4]), tf.ones([2, 4])]
    >>> terms = selfkd_loss(logits, features, tf.constant([0, 2]), SelfKDConfig())
    >>> round(float(terms["ce"]), 4)  # log(3)
    1.0986
    """
    logits = _exit_outputs("logits", logits)
    features = _exit_outputs("features", features)
    if len(logits) != len(features):
        raise ValueError(f"features: one per exit; got {len(features)} for "
                         f"{len(logits)} exits")
    config.check_num_exits(len(logits))
    labels = batches.class_ids(labels)
    sample_weight = batches.per_example_weights(sample_weight)
    if global_batch_size is None:
        global_batch_size = tf.cast(tf.shape(labels)[0], tf.float32)
    num_classes = logits[-1].shape[-1]
    if config.uses("pskd") and teacher_probs is not None:
        targets = soft_targets(labels, num_classes, teacher_probs, alpha_t, teacher_valid)
    else:
        targets = soft_targets(
            labels, num_classes,
            label_smoothing=config.label_smoothing if config.uses("ls") else 0.0)

    zero = tf.constant(0.0)
    terms = {
        "ce": _weighted_mean(soft_cross_entropy(logits[-1], targets), sample_weight,
                             global_batch_size),
        "byot_ce": zero,
        "byot_kl": zero,
        "byot_hint": zero,
        "dmfl": zero,
    }
    if config.trains_shallow_exits():
        terms.update(byot_terms(
            logits, features, targets, config, global_batch_size, sample_weight,
            distill=config.uses("byot")))
    if config.uses("dmfl"):
        terms["dmfl"] = dmfl_loss(
            features, config.dmfl_gradient, global_batch_size, sample_weight)
    terms["byot"] = terms["byot_ce"] + terms["byot_kl"] + terms["byot_hint"]
    terms["total"] = terms["ce"] + terms["byot"] + terms["dmfl"]
    return terms
