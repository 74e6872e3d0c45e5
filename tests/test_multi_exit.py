"""The multi-exit contract: checked in one line, and every exit found through itself."""

import keras
import pytest

from selfkd_tf.distillation.model import SelfKDModel
from selfkd_tf.models import multi_exit
from selfkd_tf.models.resnet import stage_output_names

from support import tiny_backbone


def _plain_classifier():
    images = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    return keras.Model(images, keras.layers.Dense(3)(pooled))


class _Subclassed(keras.Model):
    def call(self, images):
        return {"logits": [images], "features": [images]}


@pytest.mark.parametrize("backbone, problem", [
    (_plain_classifier, "got one tensor of shape (None, 3)"),
    (_Subclassed, "without symbolic outputs (a subclassed model)"),
    (lambda: "resnet18", "got str"),
])
def test_what_breaks_the_contract_is_said_in_one_line(backbone, problem):
    # SelfKDModel takes a plain classifier as one exit (test_own_model.py).
    checks = [multi_exit.check_multi_exit]
    if backbone is not _plain_classifier:
        checks.append(SelfKDModel)
    for check in checks:
        with pytest.raises(ValueError) as raised:
            check(backbone())
        message = str(raised.value)
        assert message.startswith("backbone: expected a functional keras.Model whose output")
        assert message.endswith(problem) and "\n" not in message


def test_lists_of_other_lengths_or_widths_are_refused():
    images = keras.Input((4,))
    z = [keras.layers.Dense(3)(images), keras.layers.Dense(4)(images)]
    with pytest.raises(ValueError, match="every exit's logits must have the same width"):
        multi_exit.check_multi_exit(keras.Model(images, {"logits": z, "features": z}))
    with pytest.raises(ValueError, match="got 2 logits and 1 features"):
        multi_exit.check_multi_exit(keras.Model(images, {"logits": z, "features": z[:1]}))


def test_every_exit_reads_its_stage_and_the_network_cuts_there():
    backbone = tiny_backbone(5, image_size=8, num_stages=3, exit_head="attention", seed=0)
    assert multi_exit.check_multi_exit(backbone) == (3, 5, backbone.output["features"][0].shape[-1])
    names = stage_output_names("resnet18", 3)
    for k, name in enumerate(names, start=1):
        assert multi_exit.exit_stage(backbone, k) is backbone.get_layer(name).output
    segments = multi_exit.exit_segments(backbone)
    assert [m.output._keras_history.operation.name for m in segments.stages] == names
