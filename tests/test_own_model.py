"""Your own model: exits found and attached on keras.applications, keras-hub
and hand-written networks, and what is refused, in one line."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import selfkd_tf as skd
from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distillation.model import SelfKDModel
from selfkd_tf.models import applications
from selfkd_tf.models import multi_exit
from selfkd_tf.models import stages

from support import indexed_dataset
from support import learnable_arrays


def _nested_block(size: int):
    inputs = keras.Input((size, size, 16))
    x = layers.Conv2D(24, 3, strides=2, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, layers.ReLU(name="out")(x), name="block3")


def hand_written(size: int = 16) -> keras.Model:
    """Residual adds written ``x + y`` (operations, not layers), a layer Keras
    names itself (``re_lu``) and a nested functional model."""
    images = keras.Input((size, size, 3), name="pixels")
    x = layers.Conv2D(8, 3, padding="same", name="stem")(images)
    y = layers.Conv2D(8, 3, padding="same", name="b1_conv")(x)
    x = layers.Activation("relu", name="b1_out")(x + y)
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="down1")(x)
    y = layers.Conv2D(16, 3, padding="same", name="b2_conv")(x)
    x = layers.ReLU()(x + y)
    return keras.Model(images, _nested_block(size // 2)(x), name="hand")


def _application(name: str, size: int = 32) -> keras.Model:
    return getattr(keras.applications, name)(
        include_top=False, weights=None, input_shape=(size, size, 3))


def _pooled(x):
    return np.mean(np.asarray(x), axis=(1, 2)) if np.ndim(x) == 4 else np.asarray(x)


def _assert_exits_keep_the_backbone(trunk, backbone, images):
    """The deepest exit reads the trunk's own output, and the cascade's
    pieces compose to every exit's logits."""
    out = backbone(images, training=False)
    np.testing.assert_allclose(out["features"][-1], _pooled(trunk(images, training=False)),
                               rtol=1e-4, atol=1e-4)
    segments = multi_exit.exit_segments(backbone)
    x = images
    for k, (stage, head) in enumerate(zip(segments.stages, segments.heads)):
        x = stage(x, training=False)
        np.testing.assert_allclose(head(x, training=False), out["logits"][k],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, strides", [
    ("MobileNetV3Small", [2.0, 4.0, 8.0, 16.0, 32.0]),
    ("EfficientNetV2B0", [2.0, 4.0, 8.0, 16.0, 32.0]),
    ("ResNet50V2", [2.0, 4.0, 8.0, 16.0, 32.0]),
    ("ConvNeXtTiny", [4.0, 8.0, 16.0, 32.0]),
])
def test_keras_applications_get_an_exit_per_stage(name, strides):
    trunk = _application(name)
    found = skd.find_stages(trunk)
    assert [s.stride for s in found] == strides
    assert [s.shape[0] for s in found] == [32 / s for s in strides]
    flat = stages.flatten(trunk)
    for stage in found[:-1]:  # every listed reference names its stage
        (tensor,) = stages.resolve_exits(flat, [stage.reference])
        assert tuple(tensor.shape[1:]) == stage.shape
    backbone = skd.attach_exits(trunk, 7, exit_head="pooled")
    num_exits, num_classes, width = skd.check_multi_exit(backbone)
    assert (num_exits, num_classes, width) == (4, 7, found[-1].shape[-1])
    # "auto" takes the last three stages before the deepest exit's resolution.
    assert [multi_exit.exit_stage(backbone, k).shape[1] for k in (1, 2, 3, 4)] == \
        [32 / s for s in strides[-4:]]
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    _assert_exits_keep_the_backbone(trunk, backbone, images)


def test_hand_written_references_ops_and_nested_models():
    trunk = hand_written()
    found = skd.find_stages(trunk)
    # The 8x8 stage is the output of the numbered `re_lu`: named by the
    # nested model's first layer instead, the same in every process.
    assert [(s.reference, s.shape) for s in found] == [
        ("b1_out", (16, 16, 8)), ("block3/conv:input", (8, 8, 16)),
        ("block3/out", (4, 4, 24))]
    backbone = skd.attach_exits(trunk, 3, exits=["b1_out:input", "block3:input"],
                                exit_head="bottleneck")
    assert skd.check_multi_exit(backbone) == (3, 3, 24)
    # `b1_out:input` is the `x + y` of the first block.
    assert multi_exit.exit_stage(backbone, 1).shape[1:] == (16, 16, 8)
    images = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype("float32")
    _assert_exits_keep_the_backbone(trunk, backbone, images)
    # A sequential model has stages too.
    sequential = keras.Sequential([
        keras.Input((16, 16, 3)), layers.Conv2D(4, 3, padding="same", name="c1"),
        layers.Conv2D(8, 3, strides=2, padding="same", name="c2"),
        layers.Conv2D(8, 3, strides=2, padding="same", name="c3")])
    assert [s.reference for s in skd.find_stages(sequential)] == ["c1", "c2", "c3"]
    assert skd.check_multi_exit(skd.attach_exits(sequential, 3, exits=2)) == (2, 3, 8)


def test_a_backbone_ending_in_features_keeps_them_as_the_deepest_exit():
    images = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, padding="same", name="early")(images)
    x = layers.Conv2D(12, 3, strides=4, padding="same", name="late")(x)
    trunk = keras.Model(images, layers.GlobalAveragePooling2D(name="pool")(x))
    assert [s.reference for s in skd.find_stages(trunk)] == ["early", "late"]
    backbone = skd.attach_exits(trunk, 3, exit_head="pooled")
    assert skd.check_multi_exit(backbone) == (2, 3, 12)
    # The shallow exit is pooled 4x4 to the last feature map's 4x4.
    assert backbone.get_layer("exit1_head_pool").pool_size == (4, 4)
    batch = np.random.default_rng(5).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(backbone(batch)["features"][-1], trunk(batch), rtol=1e-5)


@pytest.mark.parametrize("exits, message", [
    (["nowhere"], "exits: the backbone has no layer or tensor 'nowhere'; stages: b1_out, "
                  "block3/conv:input"),
    (["{re_lu}"], "exits: '{re_lu}' is a name Keras numbered itself, which names another "
                  "layer in another process; use 'block3/conv:input' or one of"),
    (["b2_conv"], "exits: 'b2_conv' is a tensor a branch runs beside so the network cannot "
                  "be cut there into consecutive pieces"),
    (["block3:input", "b1_out"], "exits: 'b1_out' comes before or at the previous exit"),
    (4, "exits: 4 exits need 3 stages before the deepest exit; the backbone has 2"),
    ("all", "exits: expected 'auto', a number of exits or a list of references"),
    (0, "exits: a number of exits must be at least 1; got 0"),
])
def test_exits_the_graph_cannot_take_are_refused_in_one_line(exits, message):
    trunk = hand_written()
    # `re_lu`, `re_lu_1`, ...: whichever this process numbered it.
    (re_lu,) = [layer.name for layer in trunk.layers if isinstance(layer, layers.ReLU)]
    if isinstance(exits, list):
        exits = [e.format(re_lu=re_lu) for e in exits]
    message = message.format(re_lu=re_lu)
    with pytest.raises(ValueError) as raised:
        skd.attach_exits(trunk, 3, exits=exits)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_subclassed_and_probability_outputs_are_refused():
    class Trunk(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    trunk = Trunk()
    trunk(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ValueError, match="^backbone: .*subclassed") as raised:
        skd.attach_exits(trunk, 3)
    assert "\n" not in str(raised.value)
    softmax = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=4)
    for wrap in (skd.as_multi_exit, lambda model: skd.attach_exits(model, 3)):
        with pytest.raises(ValueError, match="outputs probabilities .*classifier_activation=None"):
            wrap(softmax)


def test_a_plain_classifier_trains_with_pskd_alone():
    images = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", activation="relu")(images)
    logits = layers.Dense(4)(layers.GlobalAveragePooling2D()(x))
    classifier = keras.Model(images, logits, name="plain")
    wrapped = skd.as_multi_exit(classifier)
    assert skd.check_multi_exit(wrapped) == (1, 4, 4)
    assert skd.as_multi_exit(wrapped) is wrapped
    x_train, y_train = learnable_arrays(16, 4, size=8)
    model = SelfKDModel(classifier, num_train_examples=16,
                        config=SelfKDConfig(methods=("pskd",)))
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    history = model.fit(indexed_dataset(x_train, y_train, 8), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # The deepest exit is the classifier itself: its weights, its outputs.
    np.testing.assert_allclose(model.backbone(x_train[:2])["logits"][0], classifier(x_train[:2]),
                               rtol=1e-5)


@pytest.mark.parametrize("head, ratio", [("bottleneck", 3), ("pooled", 3), ("attention", 2)])
def test_heads_map_any_channel_count_and_resolution_ratio(head, ratio):
    """A 12x12 stage before a 4x4 output (ratio 3, no power of 2), or 8x8."""
    size = 4 * ratio
    images = keras.Input((size, size, 3))
    x = layers.Conv2D(5, 3, padding="same", name="early")(images)
    x = layers.Conv2D(7, ratio, strides=ratio, name="late")(x)
    backbone = skd.attach_exits(keras.Model(images, x), 2, exits=["early"], exit_head=head)
    segments = multi_exit.exit_segments(backbone)
    assert segments.heads[0].output.shape[1:] == (2,)
    assert backbone.output["features"][0].shape[1:] == (7,)


def test_attention_heads_refuse_ratios_other_than_their_downsampling():
    images = keras.Input((12, 12, 3))
    x = layers.Conv2D(5, 3, padding="same", name="early")(images)
    x = layers.Conv2D(7, 3, strides=3, name="late")(x)
    with pytest.raises(ValueError, match="attention") as raised:
        skd.attach_exits(keras.Model(images, x), 2, exits=["early"], exit_head="attention")
    assert "\n" not in str(raised.value)


def test_the_normalisation_each_family_expects():
    probe = applications.input_normalization
    tf_mode = probe("keras.applications.ResNet50V2")  # x / 127.5 - 1
    np.testing.assert_allclose(tf_mode.mean, [0.5] * 3, atol=1e-6)
    np.testing.assert_allclose(tf_mode.std, [0.5] * 3, atol=1e-6)
    torch_mode = probe("keras.applications.DenseNet121")
    np.testing.assert_allclose(torch_mode.mean, [0.485, 0.456, 0.406], atol=1e-6)
    np.testing.assert_allclose(torch_mode.std, [0.229, 0.224, 0.225], atol=1e-6)
    caffe = probe("keras.applications.ResNet50")  # BGR, minus the mean pixel
    assert caffe.reverse_channels
    np.testing.assert_allclose(np.asarray(caffe.mean) * 255, [123.68, 116.779, 103.939],
                               atol=1e-3)
    np.testing.assert_allclose(np.asarray(caffe.std) * 255, [1.0] * 3, atol=1e-6)
    rescales_itself = probe("keras.applications.MobileNetV3Small")  # identity
    np.testing.assert_allclose(rescales_itself.mean, [0.0] * 3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rescales_itself.std) * 255, [1.0] * 3, atol=1e-6)
    # A BGR family gets its channels reversed in the network.
    trunk = applications.build_foreign_backbone("keras.applications.ResNet50", (32, 32, 3))
    inner = trunk.get_layer("resnet50")
    rgb = np.random.default_rng(4).uniform(-1, 1, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(trunk(rgb), inner(rgb[..., ::-1]), rtol=1e-5, atol=1e-5)


def test_weight_decay_leaves_out_the_kinds_named():
    images = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, name="conv")(images)
    x = layers.LayerNormalization(name="ln")(layers.BatchNormalization(name="bn")(x))
    model = keras.Model(images, layers.Dense(3, name="fc")(layers.Flatten()(x)))
    names = lambda exclude: sorted(v.path for v in skd.decayed_variables(model, exclude))  # noqa: E731
    assert names(()) == ["bn/beta", "bn/gamma", "conv/bias", "conv/kernel", "fc/bias",
                         "fc/kernel", "ln/beta", "ln/gamma"]
    assert names(("norm", "bias")) == ["conv/kernel", "fc/kernel"]
    with pytest.raises(ValueError, match="weight_decay_exclude"):
        skd.decayed_variables(model, ("norms",))


def test_weight_decay_exclusions_in_the_update():
    """One SGD step of rate r moves a decayed weight by r * wd * w more than
    without decay (the gradient of wd / 2 * w ** 2), an excluded one not."""
    def one_step(weight_decay, exclude):
        keras.utils.set_random_seed(0)
        images = keras.Input((8, 8, 3))
        x = layers.Conv2D(4, 3, name="conv")(images)
        x = layers.LayerNormalization(name="ln", gamma_initializer="random_normal",
                                      beta_initializer="random_normal")(x)
        trunk = keras.Model(images, layers.Conv2D(6, 3, strides=2, name="deep")(x))
        model = SelfKDModel(skd.attach_exits(trunk, 2, exits=1), num_train_examples=4,
                            weight_decay=weight_decay, weight_decay_exclude=exclude,
                            config=SelfKDConfig(methods=()))
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        before = {v.path: v.numpy() for v in model.backbone.trainable_variables}
        x_train, y_train = learnable_arrays(4, 2, size=8)
        model.train_on_batch({"image": x_train, "index": np.arange(4, dtype="int32")}, y_train)
        return before, {v.path: v.numpy() for v in model.backbone.trainable_variables}

    before, plain = one_step(0.0, ())
    for exclude, decayed in (((), {"conv/kernel", "conv/bias", "ln/gamma", "ln/beta"}),
                             (("norm", "bias"), {"conv/kernel"})):
        _, after = one_step(0.5, exclude)
        for path in ("conv/kernel", "conv/bias", "ln/gamma", "ln/beta"):
            shrink = 0.1 * 0.5 * before[path] if path in decayed else 0.0
            np.testing.assert_allclose(after[path], plain[path] - shrink, atol=1e-6,
                                       err_msg=f"{exclude} {path}")


def test_convert_layers_keeps_operations_named_as_layers():
    """``x + 1.0`` is Keras's ``Add`` operation; beside an ``Add`` layer, a
    rebuild must not take one for the other (MobileNetV3 has both kinds)."""
    images = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="a")(images)
    x = layers.Add(name="sum")([x, layers.Conv2D(4, 3, padding="same", name="b")(x)])
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="c")(x + 1.0)
    backbone = skd.attach_exits(keras.Model(images, x), 2, exits=["c:input"])
    batch = np.random.default_rng(6).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(skd.convert_layers(backbone)(batch)["logits"][0],
                               backbone(batch)["logits"][0], rtol=1e-5, atol=1e-6)


def test_convert_layers_sets_momentum_and_sync_everywhere_with_the_same_outputs():
    trunk = hand_written()
    backbone = skd.attach_exits(trunk, 3, exits=1)
    images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype("float32")
    before = backbone(images, training=False)["logits"][-1]
    converted = skd.convert_layers(backbone, batchnorm_momentum=0.99, sync_batchnorm=True)
    norms = [layer for layer in converted.layers
             if isinstance(layer, layers.BatchNormalization)]
    assert norms and all(layer.momentum == pytest.approx(0.99) and layer.synchronized
                         for layer in norms)
    np.testing.assert_allclose(converted(images, training=False)["logits"][-1], before,
                               rtol=1e-5, atol=1e-5)


def test_sync_batchnorm_refuses_a_batch_norm_it_cannot_reach():
    class NormedConv(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(8, 3, strides=2, padding="same")
            self.norm = layers.BatchNormalization()

        def call(self, x, training=None):
            return self.norm(self.conv(x), training=training)

    images = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="early")(images)
    backbone = skd.attach_exits(keras.Model(images, NormedConv(name="custom")(x)), 2,
                                exits=["early"])
    with pytest.raises(ValueError) as raised:
        skd.convert_layers(backbone, sync_batchnorm=True)
    assert str(raised.value) == ("sync_batchnorm: the layer 'custom' (NormedConv) keeps 1 "
                                 "batch norms inside it, which cannot be synchronised")
    # Unregistered, it is rebuilt by its own class; its batch norm is reached.
    converted = skd.convert_layers(backbone, batchnorm_momentum=0.5)
    assert converted.get_layer("custom").norm.momentum == 0.5

    class Unrebuildable(layers.Layer):
        def __init__(self, filters):  # not in its config
            super().__init__()
            self.conv = layers.Conv2D(filters, 3, strides=2)

        def call(self, x):
            return self.conv(x)

    x = layers.Conv2D(4, 3, padding="same", name="early")(images)
    backbone = skd.attach_exits(keras.Model(images, Unrebuildable(6)(x)), 2, exits=["early"])
    with pytest.raises(ValueError, match="^backbone: .* cannot be rebuilt from its config") \
            as raised:
        skd.convert_layers(backbone)
    assert "\n" not in str(raised.value)


def test_refused_files_run_no_code(tmp_path):
    """A .keras backbone with a Lambda and a keras-hub preset naming a
    function are refused in safe mode before any code runs."""
    marker = tmp_path / "ran"
    images = keras.Input((8, 8, 3))
    lam = layers.Lambda(lambda x: x * 2.0)(images)
    model = keras.Model(images, layers.Conv2D(2, 3)(lam))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="^arch: cannot load .*lambda.keras") as raised:
        applications.build_foreign_backbone(str(tmp_path / "lambda.keras"), (8, 8, 3))
    assert "\n" not in str(raised.value)
    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "config.json").write_text(json.dumps({
        "module": "os", "class_name": "system", "config": {"command": f"touch {marker}"},
        "registered_name": "os>system"}))
    (preset / "metadata.json").write_text(json.dumps({"keras_version": keras.__version__}))
    pytest.importorskip("keras_hub")
    with pytest.raises(ValueError, match="^arch: cannot load the preset") as raised:
        applications.build_foreign_backbone(f"kerashub:{preset}", (8, 8, 3))
    assert not marker.exists() and "\n" not in str(raised.value)


def test_a_local_kerashub_preset(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    trunk = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2],
        block_type="basic_block", use_pre_activation=False, image_shape=(16, 16, 3))
    trunk.save_to_preset(str(tmp_path))
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(16, 16), scale=1 / 255.0, offset=None)
    converter.save_to_preset(str(tmp_path))
    arch = f"kerashub:{tmp_path}"
    loaded = applications.build_foreign_backbone(arch, (16, 16, 3), weights="preset")
    backbone = skd.attach_exits(loaded, 4, exit_head="pooled")
    assert skd.check_multi_exit(backbone)[0] == len(skd.find_stages(loaded))
    images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(backbone(images)["features"][-1],
                               _pooled(trunk(images)), rtol=1e-4, atol=1e-4)
    normalization = applications.input_normalization(arch)
    np.testing.assert_allclose(normalization.mean, [0.0] * 3, atol=1e-7)
    np.testing.assert_allclose(normalization.std, [1.0] * 3, atol=1e-6)


def test_mixed_precision_exits_are_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        backbone = skd.attach_exits(hand_written(), 3, exit_head="pooled")
        out = backbone(np.zeros((1, 16, 16, 3), "float32"))
        assert backbone.get_layer("stem").compute_dtype == "float16"
        assert {keras.backend.standardize_dtype(t.dtype)
                for t in out["logits"] + out["features"]} == {"float32"}
    finally:
        keras.mixed_precision.set_global_policy("float32")


# -- several replicas: a child process splits its CPU into two devices ----------------

def _foreign_backbone(sync: bool) -> keras.Model:
    """The hand-written network, converted as the CLI converts a foreign one,
    with a depthwise convolution and a layer norm among its exit heads."""
    trunk = hand_written(8)
    backbone = skd.attach_exits(trunk, 3, exits=["b1_out"], exit_head="pooled")
    return skd.convert_layers(backbone, batchnorm_momentum=0.9, sync_batchnorm=sync)


def replicated_child(out: str) -> None:
    """Trains on 17 examples in batches of 8 (the last one leaves the second
    replica nothing) with 2 replicas and with one device."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from selfkd_tf.distribution.strategy import make_strategy

    x_train, y_train = learnable_arrays(17, 3, size=8)
    results = {}
    mirrored = make_strategy("mirrored")  # one per process, as a user has
    for name, strategy, sync in (("one", tf.distribute.get_strategy(), True),
                                 ("sync", mirrored, True), ("per_replica", mirrored, False)):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = SelfKDModel(_foreign_backbone(sync), num_train_examples=17)
            model.compile(optimizer=keras.optimizers.SGD(0.01))
        history = model.fit(indexed_dataset(x_train, y_train, 8), epochs=2, verbose=0)
        results[f"{name}_loss"] = np.array(history.history["loss"])
        results[f"{name}_weights"] = np.concatenate(
            [v.numpy().ravel() for v in model.backbone.trainable_variables])
    np.savez(out, **results)


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_uneven_and_empty_replica_shares_train_a_foreign_network(tmp_path, onednn):
    out = tmp_path / "replicated.npz"
    code = f"import test_own_model; test_own_model.replicated_child({str(out)!r})"
    process = subprocess.run(
        [sys.executable, "-c", code], cwd=os.path.dirname(__file__),
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": onednn,
             "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                            os.environ.get("PYTHONPATH", "")])},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    with np.load(out) as results:
        # Synchronised batch norm over the shares is one device's batch norm.
        np.testing.assert_allclose(results["sync_loss"], results["one_loss"], rtol=1e-4)
        np.testing.assert_allclose(results["sync_weights"], results["one_weights"],
                                   rtol=1e-3, atol=1e-5)
        assert np.isfinite(results["per_replica_weights"]).all()
        assert np.isfinite(results["per_replica_loss"]).all()
