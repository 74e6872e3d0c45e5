import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.models import ARCHITECTURES
from selfkd_tf.models import EXIT_HEADS
from selfkd_tf.models import build_multi_exit_resnet
from selfkd_tf.models.primitives import Conv2D, DepthwiseConv2D
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


@pytest.mark.parametrize(
    "layer_class, size, strides, padding, batch, height, use_bias",
    [
        (PatchConv2D, 2, 2, "valid", 3, 16, True),
        (PatchConv2D, 4, 4, "valid", 3, 16, False),
        (PatchConv2D, 8, 8, "valid", 3, 19, True),
        # Projection shortcuts: a 1x1 kernel with a stride, odd and even
        # sizes, a batch of 1 and an odd one.
        (Conv2D, 1, 2, "same", 3, 16, False),
        (Conv2D, 1, 2, "same", 1, 7, False),
        (Conv2D, 1, 2, "valid", 5, 9, True),
        (Conv2D, 1, 3, "same", 2, 8, False),
        (Conv2D, 1, 2, "same", 5, 1, False),
        # Configurations Conv2D leaves to Keras.
        (Conv2D, 3, 2, "valid", 3, 9, True),
        (Conv2D, 1, 1, "same", 3, 8, False),
    ],
)
def test_matmul_convolutions_equal_keras_conv2d_and_its_gradients(
    layer_class, size, strides, padding, batch, height, use_bias
):
    # The same weights in a plain strided Conv2D must give the same outputs
    # and gradients; 19 rows leave an incomplete patch to drop, and odd
    # sizes put the last 1x1 sample on the last row.
    rng = np.random.default_rng(size * 10 + height)
    x = tf.constant(rng.standard_normal((batch, height, height + 5, 6)), "float32")
    ours = layer_class(5, size, strides=strides, padding=padding,
                       use_bias=use_bias, bias_initializer="random_normal")
    plain = keras.layers.Conv2D(5, size, strides=strides, padding=padding,
                                use_bias=use_bias)
    ours.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(ours.get_weights())
    assert [w.path for w in ours.weights] == [
        w.path.replace(plain.name, ours.name) for w in plain.weights]
    assert [w.shape for w in ours.weights] == [w.shape for w in plain.weights]
    assert ours.compute_output_shape(x.shape) == plain.compute_output_shape(x.shape)
    upstream = tf.constant(
        rng.standard_normal(plain.compute_output_shape(x.shape)), "float32")
    results = []
    for layer in (ours, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        results.append((y, *tape.gradient(loss, [x, *layer.trainable_weights])))
    for got, reference in zip(*results):
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_strided_pointwise_conv_samples_rows_and_columns_0_s_2s():
    # By hand: a 1x1 kernel of ones with stride 2 sums the channels of
    # x[0::2, 0::2], the last row and column included for odd sizes.
    x = np.arange(2 * 5 * 5, dtype="float32").reshape(1, 5, 5, 2)
    layer = Conv2D(1, 1, strides=2, padding="same", use_bias=False,
                   kernel_initializer="ones")
    y = keras.ops.convert_to_numpy(layer(x))[0, :, :, 0]
    np.testing.assert_array_equal(y, x[0, ::2, ::2, :].sum(-1))
    assert y.shape == (3, 3)


def test_patch_conv_rejects_other_strides_and_round_trips():
    with pytest.raises(ValueError, match="strides == kernel_size"):
        PatchConv2D(4, 3, strides=1)
    for layer in (PatchConv2D(4, 2, name="p"),
                  Conv2D(4, 1, strides=2, padding="same", name="q")):
        restored = keras.layers.deserialize(keras.layers.serialize(layer))
        assert type(restored) is type(layer)
        assert restored.get_config() == layer.get_config()


def test_bottleneck_heads_use_patch_convolutions():
    model = build_multi_exit_resnet("resnet18", num_classes=10, input_shape=(32, 32, 3),
                                    exit_head="bottleneck", width_multiplier=TINY)
    patch = {layer.name: layer.kernel_size for layer in layers_of_type(model, PatchConv2D)}
    # Exits 1-3 downsample by 8, 4 and 2 in one step; nothing else is patchwise.
    assert patch == {"exit1_head_conv2": (8, 8), "exit2_head_conv2": (4, 4),
                     "exit3_head_conv2": (2, 2)}


@pytest.mark.parametrize(
    "arch, exit_head",
    [(arch, head) for arch in ARCHITECTURES for head in EXIT_HEADS],
)
def test_every_strided_pointwise_convolution_is_a_matrix_product(arch, exit_head):
    # The stages' projection shortcuts are the networks' only strided 1x1
    # convolutions; none may reach the CPU convolution kernels.
    model = cached_model(arch, exit_head, 4, TINY, 8)
    strided = {
        layer.name: type(layer) for layer in layers_of_type(model, keras.layers.Conv2D)
        if layer.kernel_size == (1, 1) and layer.strides != (1, 1)
    }
    assert strided == {f"stage{s}_block1_shortcut_conv": Conv2D for s in (2, 3, 4)}


def _with_plain_convolutions(backbone):
    """The same network with Keras's convolution layers, as saved before."""
    config = keras.saving.serialize_keras_object(backbone)
    for layer in config["config"]["layers"]:
        if (layer["module"] == Conv2D.__module__
                and layer["class_name"] in ("Conv2D", "DepthwiseConv2D")):
            layer.update(module="keras.layers", registered_name=None)
    old = keras.saving.deserialize_keras_object(config)
    old.set_weights(backbone.get_weights())
    return old


# Keras' own weight serialization trips a NumPy 2 deprecation notice.
@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")
def test_files_with_plain_convolutions_load_with_the_same_outputs(tmp_path):
    from selfkd_tf.experiment.checkpointing import Position, TrainingCheckpoint
    from selfkd_tf.distillation.config import SelfKDConfig
    from selfkd_tf.optimizers import make_optimizer
    from selfkd_tf.distillation.model import SelfKDModel

    def selfkd_model(backbone):
        model = SelfKDModel(backbone, num_train_examples=6,
                            config=SelfKDConfig(methods=("pskd", "byot")))
        model.compile(optimizer=make_optimizer(0.1, epochs=1))
        model.optimizer.build(model.trainable_variables)
        return model

    def build():
        # The attention heads hold depthwise convolutions as well.
        return build_multi_exit_resnet("resnet18", 3, (8, 8, 3), num_stages=3,
                                       exit_head="attention", width_multiplier=TINY)

    keras.utils.set_random_seed(1)
    old = selfkd_model(_with_plain_convolutions(build()))
    shortcut = old.backbone.get_layer("stage2_block1_shortcut_conv")
    assert type(shortcut) is keras.layers.Conv2D and shortcut.strides == (2, 2)
    depthwise = old.backbone.get_layer("exit1_head_mask_sepconv_dwconv1")
    assert type(depthwise) is keras.layers.DepthwiseConv2D
    old.save(tmp_path / "old.keras")
    TrainingCheckpoint(old, str(tmp_path / "checkpoints")).save(Position(), 0)
    x = images(5, 8)
    expected = old(x, training=False)["logits"]

    loaded = keras.saving.load_model(tmp_path / "old.keras", compile=False)
    restored = selfkd_model(build())
    TrainingCheckpoint(restored, str(tmp_path / "checkpoints")).restore_latest()
    for model in (loaded, restored):
        for name in ("stage2_block1_shortcut_conv", "stage3_block1_shortcut_conv",
                     "stem_conv", "stage2_block1_conv1"):
            assert type(model.backbone.get_layer(name)) is Conv2D
        depthwise = model.backbone.get_layer("exit1_head_mask_sepconv_dwconv1")
        assert type(depthwise) is DepthwiseConv2D
        actual = model(x, training=False)["logits"]
        for want, got in zip(expected, actual, strict=True):
            np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                       keras.ops.convert_to_numpy(want),
                                       rtol=1e-5, atol=1e-6)


# --- The ImageNet stem --------------------------------------------------------

# torchvision's num_params of each model at 1000 classes (its model docs).
TORCHVISION_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnext50_32x4d": 25_028_904,
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_imagenet_stem_has_torchvision_parameter_counts(arch):
    model = build_multi_exit_resnet(arch, 1000, input_shape=(224, 224, 3),
                                    stem="imagenet")
    assert trainable_count(deepest_submodel(model)) == TORCHVISION_PARAMETERS[arch]
    # 7x7 stride-2 convolution and 3x3 stride-2 pooling: stage 1 sees 56x56.
    assert model.get_layer("stem_conv").kernel.shape[:2] == (7, 7)
    assert model.get_layer(f"stage1_block{1}_out").output.shape[1:3] == (56, 56)


def test_imagenet_stem_pads_as_pytorch_does():
    model = build_multi_exit_resnet("resnet18", 3, input_shape=(10, 10, 1), stem="imagenet",
                                    width_multiplier=TINY, num_stages=2)
    conv = model.get_layer("stem_conv")
    kernel = np.zeros(conv.kernel.shape, np.float32)
    kernel[:, :, 0, 0] = 1.0
    conv.kernel.assign(kernel)
    image = np.zeros((1, 10, 10, 1), np.float32)
    image[0, 1, 1] = 1.0
    conv_out = keras.Model(model.input, conv.output)(image)[0, :, :, 0]
    # PyTorch pads 3 on every side: input pixel 1 is in the windows of the
    # outputs r with 2r - 3 <= 1, r = 0, 1, 2 (Keras's "same" pads 2 before
    # and 3 after, and would reach r = 0, 1 only).
    expected = np.zeros((5, 5), bool)
    expected[0:3, 0:3] = True
    np.testing.assert_array_equal(np.asarray(conv_out) != 0, expected)
    # Pooling pads by 1 on every side: 5x5 -> 3x3.
    pooled = keras.Model(model.input, model.get_layer("stem_pool").output)(image)
    assert pooled.shape[1:3] == (3, 3)


@pytest.mark.parametrize("shape, stem", [((127, 200, 3), "cifar"), ((128, 128, 3), "imagenet"),
                                         ((None, None, 3), "cifar"), ((32, 32, 3), "cifar")])
def test_auto_stem_follows_the_image_size(shape, stem):
    from selfkd_tf.models.resnet import resolve_stem

    assert resolve_stem("auto", shape) == stem
    model = build_multi_exit_resnet("resnet18", 3, input_shape=shape, width_multiplier=TINY)
    assert ("stem_pool" in [layer.name for layer in model.layers]) == (stem == "imagenet")
