"""A network's layers set up for training here: convolutions and batch norms.

Backbones from elsewhere (keras.applications, keras-hub, saved files) use
Keras's own layers. Before training, `convert_layers` rebuilds a network
from its configuration with

- this library's convolutions (`selfkd_tf.models.primitives.Conv2D` and
  ``DepthwiseConv2D``), which compute the same function with the same
  weights but route around the CPU kernels' defects (strided ``1 x 1``
  convolutions, a replica's empty share of a batch);
- every batch norm's momentum set (the families' 0.99 to 0.999 lag behind
  the weights for most of a short run; PyTorch's, and this library's
  ResNets', is 0.9 in Keras's convention) and, on request, synchronised
  across replicas.

`upgrade_layers` does the same to a configuration: a saved network loads
through it (`selfkd_tf.distillation.model.SelfKDModel.from_config`).

Example:

```python
backbone = attach_exits(trunk, num_classes=10)
backbone = convert_layers(backbone, batchnorm_momentum=0.9, sync_batchnorm=True)
```
"""

from __future__ import annotations

import keras

from selfkd_tf.models.primitives import Conv2D, DepthwiseConv2D


def upgrade_layers(config: dict, *, batchnorm_momentum: float | None = None,
                   sync_batchnorm: bool | None = None) -> dict:
    """A serialized functional model with this library's convolution layers.

    Networks saved by earlier versions, and backbones from elsewhere, hold
    `keras.layers.Conv2D` and `keras.layers.DepthwiseConv2D` layers, which
    reach the CPU kernels' defects that `primitives.Conv2D` and
    `primitives.DepthwiseConv2D` route around. The two compute the same
    function with the same weights, laid out the same way in a `.keras`
    file, so a network built from this config gives the same outputs
    without the defects.

    Args:
        config: `keras.saving.serialize_keras_object` of a functional model
            (or the same read from a `.keras` file).
        batchnorm_momentum: if given, every top-level
            ``BatchNormalization``'s momentum (Keras's convention: the
            weight of the running average).
        sync_batchnorm: if given, whether every top-level
            ``BatchNormalization`` synchronises its statistics across
            replicas.

    Returns:
        A copy of `config`; the input is not modified. Layers inside other
        layers are left as they are (`convert_layers` checks them).

    Example:

    >>> config = keras.saving.serialize_keras_object(saved_backbone)
    >>> backbone = keras.saving.deserialize_keras_object(upgrade_layers(config))
    """
    layers = config.get("config", {}).get("layers")
    if not isinstance(layers, list):
        return config
    identities = {
        cls.__name__: {
            "module": cls.__module__,
            "class_name": cls.__name__,
            "registered_name": keras.saving.get_registered_name(cls),
        }
        for cls in (Conv2D, DepthwiseConv2D)
    }
    batch_norm = {key: value for key, value in (("momentum", batchnorm_momentum),
                                                ("synchronized", sync_batchnorm))
                  if value is not None}

    def upgraded(layer):
        if not (isinstance(layer, dict) and layer.get("module") == "keras.layers"
                and isinstance(layer.get("config"), dict)):
            return layer
        kind = layer.get("class_name")
        if kind in identities:
            return {**layer, **identities[kind]}
        if kind == "BatchNormalization" and batch_norm:
            return {**layer, "config": {**layer["config"], **batch_norm}}
        return layer

    return {
        **config,
        "config": {**config["config"], "layers": [upgraded(l) for l in layers]},
    }


def convert_layers(model: keras.Model, *, batchnorm_momentum: float | None = None,
                   sync_batchnorm: bool = False) -> keras.Model:
    """``model`` rebuilt by `upgrade_layers`, with its weights.

    Args:
        model: a functional model whose layers are all at its top level
            (`selfkd_tf.models.multi_exit.attach_exits` inlines nested
            models).
        batchnorm_momentum: see `upgrade_layers`; None keeps each layer's.
        sync_batchnorm: whether every batch norm synchronises.

    Returns:
        A new functional model with the same weights; ``model`` is left
        as it is.

    Raises:
        ValueError: one line: ``sync_batchnorm`` and a batch norm inside a
            custom layer, where it cannot be reached (naming the layer), or
            a network that its config does not rebuild.
    """
    for layer in model.layers:
        inner = [sub for sub in layer._flatten_layers(include_self=False)
                 if isinstance(sub, keras.layers.BatchNormalization)]
        if inner and sync_batchnorm:
            raise ValueError(
                f"sync_batchnorm: the layer {layer.name!r} ({type(layer).__name__}) keeps "
                f"{len(inner)} batch norms inside it, which cannot be synchronised")
    config = upgrade_layers(keras.saving.serialize_keras_object(model),
                            batchnorm_momentum=batchnorm_momentum,
                            sync_batchnorm=sync_batchnorm)
    # The model's own custom classes rebuild it, registered for Keras or not.
    # Keras's own stay out: their names are also those of operations
    # (``x + 3.0`` is an ``Add`` operation, not the ``Add`` layer).
    own = {type(layer).__name__: type(layer) for layer in model._flatten_layers()
           if not type(layer).__module__.startswith("keras.")}
    try:
        with keras.saving.custom_object_scope(own):
            converted = keras.saving.deserialize_keras_object(config)
        converted.set_weights(model.get_weights())
    except (TypeError, ValueError) as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()),
                      type(error).__name__)
        raise ValueError(
            f"backbone: {model.name} cannot be rebuilt from its config to convert its "
            f"layers (a custom layer's get_config must give its constructor's arguments): "
            f"{reason[:300]}") from None
    if batchnorm_momentum is not None:
        # Batch norms inside custom layers, which the config does not list.
        for layer in converted._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = batchnorm_momentum
    return converted
