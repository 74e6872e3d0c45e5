"""Which weights the coupled L2 weight decay applies to.

The paper (and PS-KD's and BYOT's code, PyTorch ``SGD(weight_decay=5e-4)``)
decays every trainable weight, the default here. Recipes for ConvNeXt and
vision transformers leave out the weights a decay only distorts
(``torch.optim.AdamW`` parameter groups in their reference code):

- ``"norm"``: the scales and offsets of normalisation layers (batch, layer,
  group and RMS norms);
- ``"bias"``: every other layer's bias;
- ``"embedding"``: embedding tables, position embeddings and class tokens
  (variables of ``Embedding`` layers, or whose path holds ``embedding`` or
  ``token``).

Example:

```python
decayed = decayed_variables(backbone, exclude=("norm", "bias"))
penalty = 0.5 * 5e-4 * sum(tf.reduce_sum(v ** 2) for v in decayed)
```
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

DECAY_EXCLUSIONS = ("norm", "bias", "embedding")
"""The kinds of weights `decayed_variables` can leave out."""


def _is_normalization(layer) -> bool:
    # keras-hub and other libraries name their own norms *Norm / *Normalization.
    return type(layer).__name__.endswith(("Normalization", "Norm"))


def _kind(layer, variable) -> str | None:
    path = variable.path.lower()
    if isinstance(layer, keras.layers.Embedding) or "embedding" in path or "token" in path:
        return "embedding"
    if _is_normalization(layer):
        return "norm"
    if variable.path.rsplit("/", 1)[-1] == "bias":
        return "bias"
    return None


def decayed_variables(model: keras.Model, exclude: Sequence[str] = ()) -> list:
    """``model``'s trainable variables the weight decay applies to.

    Args:
        model: a built model (nested layers are looked into).
        exclude: kinds of weights to leave out, among `DECAY_EXCLUSIONS`.

    Returns:
        The trainable variables, in ``model.trainable_variables``' order,
        but those of the excluded kinds.

    Raises:
        ValueError: an unknown kind.
    """
    unknown = sorted(set(exclude) - set(DECAY_EXCLUSIONS))
    if unknown:
        raise ValueError(
            f"weight_decay_exclude: unknown {unknown}; allowed: {', '.join(DECAY_EXCLUSIONS)}")
    if not exclude:
        return list(model.trainable_variables)
    left_out = set()
    for layer in model._flatten_layers(include_self=False):
        for variable in layer._trainable_variables:
            if _kind(layer, variable) in exclude:
                left_out.add(id(variable))
    return [v for v in model.trainable_variables if id(v) not in left_out]
