import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.models import ARCHITECTURES
from selfkd_tf.models import EXIT_HEADS
from selfkd_tf.models import build_multi_exit_resnet
from selfkd_tf.models.primitives import PatchConv2D

TINY = 0.0625
EXPANSION = {
    "resnet18": 1,
    "resnet34": 1,
    "resnet50": 4,
    "resnext50_32x4d": 4,
}


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def layers_of_type(model, *types):
    return [layer for layer in model.layers if isinstance(layer, types)]


def deepest_submodel(model):
    return keras.Model(model.input, model.output["logits"][-1])


def expected_feature_dim(arch, num_stages, width_multiplier=TINY):
    planes = round(64 * 2 ** (num_stages - 1) * width_multiplier)
    return planes * EXPANSION[arch]


def images(batch, size):
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, size, size, 3)).astype("float32")


# Builds are the slow part of this module; tests share models they do not
# mutate.
@functools.lru_cache(maxsize=None)
def cached_model(arch, exit_head=None, num_stages=4, width=1.0, size=32):
    return build_multi_exit_resnet(
        arch,
        num_classes=100 if width == 1.0 else 10,
        input_shape=(size, size, 3),
        num_stages=num_stages,
        exit_head=exit_head,
        width_multiplier=width,
    )


# Reference totals of the multi-exit models on CIFAR-100; the deepest-exit
# counts are those of the plain CIFAR ResNets with a 100-way classifier.
@pytest.mark.parametrize(
    "arch, exit_head, total, deepest",
    [
        ("resnet18", "bottleneck", 13_011_152, 11_220_132),
        ("resnet50", "bottleneck", 50_430_928, 23_705_252),
        ("resnext50_32x4d", "attention", 37_898_448, 23_177_124),
    ],
)
def test_full_width_parameter_counts(arch, exit_head, total, deepest):
    model = cached_model(arch, exit_head)
    assert trainable_count(model) == total
    submodel = deepest_submodel(model)
    assert trainable_count(submodel) == deepest
    head_layers = [
        layer.name
        for layer in submodel.layers
        if re.match(r"exit[123]_", layer.name) or "_head" in layer.name
    ]
    assert head_layers == []


# Every architecture x head at full depth; truncation for both block types
# and both heads (builds dominate the run time of this module).
@pytest.mark.parametrize(
    "arch, exit_head, num_stages",
    [(arch, head, 4) for arch in ARCHITECTURES for head in EXIT_HEADS]
    + [
        (arch, head, num_stages)
        for arch, head in [
            ("resnet18", "bottleneck"),
            ("resnet18", "attention"),
            ("resnet50", "bottleneck"),
            ("resnext50_32x4d", "attention"),
        ]
        for num_stages in (2, 3)
    ],
)
def test_output_structure_and_shapes(arch, exit_head, num_stages):
    model = cached_model(arch, exit_head, num_stages, TINY)
    outputs = model(images(2, 32), training=False)
    dim = expected_feature_dim(arch, num_stages)

    assert set(outputs) == {"logits", "features"}
    assert len(outputs["logits"]) == len(outputs["features"]) == num_stages
    for logits, features in zip(outputs["logits"], outputs["features"]):
        assert tuple(logits.shape) == (2, 10)
        assert tuple(features.shape) == (2, dim)
        assert logits.dtype == features.dtype == "float32"

    # Every head must bring its stage down to the deepest stage's map.
    deepest_map = 32 // 2 ** (num_stages - 1)
    for index in range(1, num_stages + 1):
        pooled = model.get_layer(f"exit{index}_features").input
        assert tuple(pooled.shape[1:]) == (deepest_map, deepest_map, dim)
    with pytest.raises(ValueError):
        model.get_layer(f"exit{num_stages + 1}_features")


@pytest.mark.parametrize(
    "arch, exit_head, size",
    [
        ("resnet18", "bottleneck", 64),
        ("resnet50", "bottleneck", 40),
        ("resnext50_32x4d", "attention", 64),
    ],
)
def test_other_input_sizes(arch, exit_head, size):
    model = cached_model(arch, exit_head, 4, TINY, size)
    outputs = model(images(2, size), training=False)
    dim = expected_feature_dim(arch, 4)
    assert [tuple(f.shape) for f in outputs["features"]] == [(2, dim)] * 4
    assert [tuple(z.shape) for z in outputs["logits"]] == [(2, 10)] * 4
    deepest = model.get_layer("exit4_features").input
    assert tuple(deepest.shape[1:3]) == (size // 8, size // 8)


def test_default_exit_heads():
    def head_styles(arch):
        layers = cached_model(arch, None, 2, TINY).layers
        return {
            "attention": any("_head_mask" in l.name for l in layers),
            "bottleneck": any(l.name == "exit1_head_conv2" for l in layers),
        }

    assert head_styles("resnet18") == {"attention": False, "bottleneck": True}
    assert head_styles("resnext50_32x4d") == {
        "attention": True,
        "bottleneck": False,
    }


@pytest.mark.parametrize(
    "arch, exit_head",
    [("resnet50", "bottleneck"), ("resnext50_32x4d", "attention")],
)
def test_layer_settings(arch, exit_head):
    model = cached_model(arch, exit_head, 4, TINY)
    convs = layers_of_type(
        model, keras.layers.Conv2D, keras.layers.DepthwiseConv2D
    )
    norms = layers_of_type(model, keras.layers.BatchNormalization)
    assert convs and norms
    for layer in norms:
        assert layer.momentum == 0.9
        assert layer.epsilon == 1e-5
        assert not layer.synchronized
    for layer in convs:
        init = getattr(layer, "kernel_initializer", None) or getattr(
            layer, "depthwise_initializer"
        )
        assert isinstance(init, keras.initializers.VarianceScaling)
        assert (init.scale, init.mode, init.distribution) == (
            2.0,
            "fan_out",
            "untruncated_normal",
        )
        backbone = layer.name.startswith(("stem_", "stage"))
        # Only the bottleneck-head convolutions carry a bias.
        assert layer.use_bias == (exit_head == "bottleneck" and not backbone)

    logits = model.get_layer("exit4_logits")
    kernel_init = logits.kernel_initializer.get_config()
    assert kernel_init["scale"] == pytest.approx(1 / 3)
    assert kernel_init["mode"] == "fan_in"
    # Strided 3x3 convolutions pad symmetrically like PyTorch's padding=1.
    pad = model.get_layer("stage2_block1_conv2_pad")
    assert pad.padding == ((1, 1), (1, 1))
    assert model.get_layer("stage2_block1_conv2").strides == (2, 2)
    assert model.get_layer("stage2_block1_shortcut_conv").strides == (2, 2)


def test_resnext_groups_stay_valid_when_narrow():
    full = cached_model("resnext50_32x4d", "attention")
    assert full.get_layer("stage1_block1_conv2").groups == 32
    assert full.get_layer("stage1_block1_conv2").filters == 128
    tiny = cached_model("resnext50_32x4d", "attention", 4, TINY)
    conv = tiny.get_layer("stage1_block1_conv2")
    assert (conv.filters, conv.groups) == (8, 8)


def test_sync_batchnorm():
    model = build_multi_exit_resnet(
        "resnet18", 10, num_stages=2, width_multiplier=TINY, sync_batchnorm=True
    )
    norms = layers_of_type(model, keras.layers.BatchNormalization)
    assert norms and all(l.synchronized for l in norms)


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("exit_head", EXIT_HEADS)
def test_mixed_precision_outputs_are_float32(mixed_precision, exit_head):
    model = build_multi_exit_resnet(
        "resnet18", 10, num_stages=3, exit_head=exit_head, width_multiplier=TINY
    )
    assert model.get_layer("stage1_block1_conv1").compute_dtype == "float16"
    outputs = model(images(2, 32), training=False)
    for tensor in outputs["logits"] + outputs["features"]:
        assert tensor.dtype == "float32"
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(tensor)))


# Keras' own weight serialization trips a NumPy 2 deprecation notice.
@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")
def test_save_and_load_round_trip(tmp_path):
    model = cached_model("resnext50_32x4d", "attention", 2, TINY)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    x = images(2, 32)
    expected = model(x, training=False)
    actual = restored(x, training=False)
    assert [l.name for l in restored.layers] == [l.name for l in model.layers]
    for key in ("logits", "features"):
        for want, got in zip(expected[key], actual[key], strict=True):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(got),
                keras.ops.convert_to_numpy(want),
            )


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"arch": "resnet101"}, r"`arch` must be one of \('resnet18', "),
        ({"exit_head": "linear"}, r"`exit_head` must be one of \('bottleneck'"),
        ({"num_stages": 1}, r"`num_stages` must be one of \(2, 3, 4\)"),
        ({"num_stages": 5}, r"`num_stages` must be one of \(2, 3, 4\)"),
        ({"width_multiplier": 0.0}, r"`width_multiplier` must be > 0"),
        ({"width_multiplier": -1.0}, r"`width_multiplier` must be > 0"),
        ({"num_classes": 0}, r"`num_classes` must be a positive integer"),
        (
            {"exit_head": "attention", "input_shape": (36, 36, 3)},
            r"`input_shape` .* multiples of 8",
        ),
    ],
)
def test_invalid_arguments(kwargs, pattern):
    arguments = {"arch": "resnet18", "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=pattern) as error:
        build_multi_exit_resnet(**arguments)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("size,height,use_bias", [(2, 16, True), (4, 16, False), (8, 19, True)])
def test_patch_conv_equals_strided_conv_and_its_gradients(size, height, use_bias):
    # The same weights in a plain valid stride-k Conv2D must give the same
    # outputs and gradients; 19 rows leave an incomplete patch to drop.
    rng = np.random.default_rng(size)
    x = tf.constant(rng.standard_normal((3, height, height + 5, 6)), "float32")
    patch = PatchConv2D(5, size, use_bias=use_bias, bias_initializer="random_normal")
    plain = keras.layers.Conv2D(5, size, strides=size, padding="valid", use_bias=use_bias)
    patch.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(patch.get_weights())
    assert [w.shape for w in patch.weights] == [w.shape for w in plain.weights]
    upstream = tf.constant(
        rng.standard_normal(plain.compute_output_shape(x.shape)), "float32")
    results = []
    for layer in (patch, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        results.append((y, *tape.gradient(loss, [x, *layer.trainable_weights])))
    for ours, reference in zip(*results):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_patch_conv_rejects_other_strides_and_round_trips():
    with pytest.raises(ValueError, match="strides == kernel_size"):
        PatchConv2D(4, 3, strides=1)
    layer = PatchConv2D(4, 2, name="p")
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, PatchConv2D)
    assert (restored.kernel_size, restored.strides) == ((2, 2), (2, 2))


def test_bottleneck_heads_use_patch_convolutions():
    model = build_multi_exit_resnet("resnet18", num_classes=10, input_shape=(32, 32, 3),
                                    exit_head="bottleneck", width_multiplier=TINY)
    patch = {layer.name: layer.kernel_size for layer in layers_of_type(model, PatchConv2D)}
    # Exits 1-3 downsample by 8, 4 and 2 in one step; nothing else is patchwise.
    assert patch == {"exit1_head_conv2": (8, 8), "exit2_head_conv2": (4, 4),
                     "exit3_head_conv2": (2, 2)}
