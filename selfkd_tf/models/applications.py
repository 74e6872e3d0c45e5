"""Backbones users bring: keras.applications, keras-hub presets, saved Keras files.

An architecture string (``--arch``) names one:

- ``"keras.applications.<Name>"``, e.g. ``keras.applications.MobileNetV3Small``:
  built without its classifier (``include_top=False``) at the data's image
  size;
- ``"kerashub:<directory>"``: a keras-hub backbone preset saved on disk
  (``Backbone.save_to_preset``), read with
  ``keras_hub.models.Backbone.from_preset``; keras-hub is an optional extra
  (``pip install -e '.[kerashub]'``). ``"kerashub:<name>"`` names a
  published preset, which keras-hub downloads;
- ``"<path>.keras"``: a functional backbone saved with ``model.save``, such
  as one written by hand.

`build_foreign_backbone` builds the backbone, `attach_exits` then gives it
exits. Nothing a stranger's file holds runs as Python: ``.keras`` files
and presets are read in Keras's safe mode (a ``Lambda`` layer is refused),
and weights files are HDF5 arrays.

Pixels: `input_normalization` gives the normalisation the family expects,
found by running the family's own ``preprocess_input`` on probe pixels, so
the data pipeline normalises once, the way pretrained weights were trained:
``x / 127.5 - 1`` for ResNetV2 or MobileNetV2, ImageNet's mean and standard
deviation for DenseNet, BGR with ImageNet's mean subtracted for ResNet50 and
VGG (the backbone then reverses the channels itself), and raw 0..255 pixels
for MobileNetV3, EfficientNet(V2) and ConvNeXt, which rescale inside the
network.

Example:

```python
trunk = build_foreign_backbone("keras.applications.MobileNetV3Small", (96, 96, 3))
normalization = input_normalization("keras.applications.MobileNetV3Small")
normalization.mean, normalization.std    # (0, 0, 0), (1/255, 1/255, 1/255)
```
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import warnings

import keras
import numpy as np

APPLICATIONS_PREFIX = "keras.applications."
KERASHUB_PREFIX = "kerashub:"
KERAS_FILE_SUFFIX = ".keras"

WEIGHTS_NONE, WEIGHTS_IMAGENET, WEIGHTS_PRESET = "none", "imagenet", "preset"
"""``--backbone_weights`` values besides a weights file's path: random
weights, Keras's ImageNet weights (a download), a preset's own weights."""


def is_foreign(arch: str) -> bool:
    """Whether ``arch`` names a backbone of this module (not a built-in ResNet)."""
    return (arch.startswith((APPLICATIONS_PREFIX, KERASHUB_PREFIX))
            or arch.endswith(KERAS_FILE_SUFFIX))


def _application(name: str):
    constructor = getattr(keras.applications, name, None)
    if not name or not name[0].isupper() or not callable(constructor):
        known = [n for n in dir(keras.applications) if n[:1].isupper()]
        raise ValueError(
            f"arch: keras.applications has no model {name!r}; it has {', '.join(known)}")
    return constructor


def check_arch(arch: str) -> None:
    """Checks a foreign ``arch`` without building it.

    Raises:
        ValueError: one line, starting ``arch:``: an unknown keras.applications
            model, a preset directory or ``.keras`` file that does not exist.
    """
    if arch.startswith(APPLICATIONS_PREFIX):
        _application(arch[len(APPLICATIONS_PREFIX):])
    elif arch.startswith(KERASHUB_PREFIX):
        _preset_directory(arch[len(KERASHUB_PREFIX):])
    elif not os.path.isfile(arch):
        raise ValueError(f"arch: no saved backbone at {arch!r}")


def _is_preset_name(preset: str) -> bool:
    """Whether ``preset`` names a published preset rather than a directory."""
    return bool(re.fullmatch(r"[\w.-]+|(kaggle|hf)://\S+", preset)) and not os.path.exists(preset)


def _preset_directory(path: str) -> str:
    if not path:
        raise ValueError("arch: kerashub: needs a preset, kerashub:<directory or name>")
    if _is_preset_name(path):
        return path
    if not os.path.isdir(path):
        raise ValueError(f"arch: no keras-hub preset directory {path!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"arch: {path!r} holds no config.json; not a keras-hub preset")
    return path


@dataclasses.dataclass(frozen=True)
class InputNormalization:
    """How a backbone family expects its pixels, in ``[0, 1]`` units.

    The backbone receives ``(x / 255 - mean) / std`` per channel of the RGB
    image ``x`` (0..255), the data pipeline's normalisation.

    Attributes:
        mean, std: per channel, RGB order.
        reverse_channels: whether the family reads BGR (ResNet50, VGG);
            `build_foreign_backbone` then reverses the channels in the
            network.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    reverse_channels: bool = False


def input_normalization(arch: str) -> InputNormalization | None:
    """The normalisation ``arch``'s family expects; None when it has none.

    keras.applications families: what their ``preprocess_input`` does,
    measured on probe pixels. keras-hub presets: the scale and offset of the
    preset's image converter (``image_converter.json``), if it has one.
    ``.keras`` backbones: None (the data's own statistics suit them).
    """
    if arch.startswith(APPLICATIONS_PREFIX):
        constructor = _application(arch[len(APPLICATIONS_PREFIX):])
        module = importlib.import_module(constructor.__module__)
        return _probe(module.preprocess_input)
    if arch.startswith(KERASHUB_PREFIX):
        preset = _preset_directory(arch[len(KERASHUB_PREFIX):])
        return None if _is_preset_name(preset) else _converter_normalization(preset)
    return None


def _probe(preprocess) -> InputNormalization:
    """Reads the per-channel affine map (and channel order) ``preprocess`` applies.

    Probe pixels: black, white, then each channel alone at 255. The output
    channel a lone input channel moves is where that channel went.
    """
    probe = np.zeros((1, 1, 5, 3), "float32")
    probe[0, 0, 1] = 255.0
    for channel in range(3):
        probe[0, 0, 2 + channel, channel] = 255.0
    out = np.asarray(preprocess(probe.copy()), "float64")[0, 0]
    black, white = out[0], out[1]
    moved = [int(np.argmax(np.abs(out[2 + c] - black))) for c in range(3)]
    reverse = moved == [2, 1, 0]
    if not reverse and moved != [0, 1, 2]:
        raise ValueError(f"arch: its preprocess_input reorders channels as {moved}")
    scale = white - black  # output units per 255 input units
    order = slice(None, None, -1) if reverse else slice(None)
    std = (1.0 / scale)[order]
    mean = (-black / scale)[order]
    # + 0.0 turns the -0.0 of a zero mean into 0.0 (flags.json, messages).
    return InputNormalization(tuple(float(v) + 0.0 for v in mean),
                              tuple(float(v) for v in std), reverse)


def _converter_normalization(path: str) -> InputNormalization | None:
    converter = os.path.join(path, "image_converter.json")
    if not os.path.isfile(converter):
        return None
    with open(converter) as f:
        config = json.load(f).get("config", {})
    scale, offset = config.get("scale"), config.get("offset")
    if scale is None:
        return None
    scale = np.broadcast_to(np.asarray(scale, "float64"), (3,))
    offset = np.broadcast_to(np.asarray(offset if offset is not None else 0.0, "float64"), (3,))
    # y = x * scale + offset with x in 0..255 is (x / 255 - mean) / std.
    std = 1.0 / (255.0 * scale)
    return InputNormalization(tuple(float(v) for v in -offset * std),
                              tuple(float(v) for v in std))


def build_foreign_backbone(arch: str, image_shape: tuple[int, int, int],
                           weights: str = WEIGHTS_NONE) -> keras.Model:
    """The backbone ``arch`` names, without classifier, for ``image_shape`` images.

    Args:
        arch: see the module docstring.
        image_shape: ``(height, width, channels)``.
        weights: ``"none"`` (random), ``"imagenet"`` (keras.applications
            only: a download), ``"preset"`` (kerashub only: the preset's
            weights) or the path of a weights file (``.weights.h5`` of
            this backbone, or a keras.applications ``notop`` ``.h5``).

    Returns:
        A functional model from ``[B, *image_shape]`` images to a feature
        map or features; for a BGR family its first operation reverses the
        channels.

    Raises:
        ValueError: one line, starting ``arch:`` or ``backbone_weights:``:
            the backbone cannot be built at this size, its file is refused
            (safe mode), the weights need a download or do not fit.
    """
    check_arch(arch)
    if arch.startswith(APPLICATIONS_PREFIX):
        trunk = _build_application(arch[len(APPLICATIONS_PREFIX):], image_shape, weights)
    else:
        if weights == WEIGHTS_IMAGENET:
            raise ValueError(
                "backbone_weights: imagenet names keras.applications' weights; give a "
                "weights file as --backbone_weights=PATH" + (
                    ", or preset for the preset's own" if arch.startswith(KERASHUB_PREFIX)
                    else ""))
        if arch.startswith(KERASHUB_PREFIX):
            trunk = _load_preset(arch[len(KERASHUB_PREFIX):], weights == WEIGHTS_PRESET)
        else:
            trunk = _load_keras_file(arch)
        if weights not in (WEIGHTS_NONE, WEIGHTS_PRESET):
            _load_weights(trunk, weights)
    normalization = input_normalization(arch)
    if normalization is not None and normalization.reverse_channels:
        inputs = keras.Input(trunk.input.shape[1:], name="image")
        trunk = keras.Model(inputs, trunk(keras.ops.flip(inputs, axis=-1)), name=trunk.name)
    return trunk


def _build_application(name: str, image_shape, weights: str) -> keras.Model:
    constructor = _application(name)
    try:
        trunk = constructor(include_top=False, input_shape=tuple(image_shape),
                            weights=None if weights != WEIGHTS_IMAGENET else "imagenet")
    except ValueError as error:
        raise ValueError(
            f"arch: cannot build {name} for {tuple(image_shape)} images: "
            f"{_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - a failed download has many types
        if weights != WEIGHTS_IMAGENET:
            raise
        raise ValueError(
            f"backbone_weights: imagenet weights of {name} need a download, which failed "
            f"({_first_line(error)[:200]}); give the downloaded file as "
            "--backbone_weights=PATH") from None
    if weights not in (WEIGHTS_NONE, WEIGHTS_IMAGENET):
        _load_weights(trunk, weights)
    return trunk


def _load_weights(model: keras.Model, path: str) -> None:
    if path == WEIGHTS_PRESET:
        raise ValueError("backbone_weights: preset applies to kerashub: backbones only")
    if not os.path.isfile(path):
        raise ValueError(
            f"backbone_weights: expected none, imagenet, preset or a weights file; no file "
            f"{path!r}")
    if not path.endswith(".h5"):
        raise ValueError(
            f"backbone_weights: expected an HDF5 weights file (.weights.h5 or .h5); got "
            f"{path!r}" + (" (a whole model: give it as --arch)" if path.endswith(".keras")
                          else ""))
    try:
        # Keras warns about every mismatched variable before it raises; the
        # one line below says what matters.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except Exception as error:  # noqa: BLE001 - h5py and Keras raise many types
        raise ValueError(
            f"backbone_weights: {path} does not fit the backbone: {_first_line(error)}"
        ) from None


def _load_preset(preset: str, load_weights: bool) -> keras.Model:
    try:
        import keras_hub
    except ImportError:
        raise ValueError(
            "arch: kerashub: backbones need keras-hub: pip install -e '.[kerashub]'"
        ) from None
    try:
        return keras_hub.models.Backbone.from_preset(preset, load_weights=load_weights)
    except Exception as error:  # noqa: BLE001 - any refusal is one line
        if _is_preset_name(preset):
            raise ValueError(
                f"arch: the keras-hub preset {preset!r} needs a download, which failed "
                f"({type(error).__name__}); where there is no network, save it elsewhere "
                "(Backbone.save_to_preset) and give kerashub:<directory>") from None
        raise ValueError(f"arch: cannot load the preset {preset}: {_first_line(error)}") from None


def _load_keras_file(path: str) -> keras.Model:
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - any refusal is one line
        raise ValueError(f"arch: cannot load {path}: {_first_line(error)}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(f"arch: {path} holds a {type(model).__name__}, not a model")
    return model


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
