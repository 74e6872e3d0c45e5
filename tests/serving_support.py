"""A tiny untrained model and its normalisation, for the export and cascade tests."""

import keras
import numpy as np

from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.models import build_multi_exit_resnet
from selfkd_tf.distillation.model import SelfKDModel

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
NAMES = ("cat", "dog", "owl", "eel", "yak")


def tiny_model(seed: int) -> SelfKDModel:
    """Three exits over 16x16 images of the 5 classes `NAMES`."""
    keras.utils.set_random_seed(seed)
    backbone = build_multi_exit_resnet("resnet18", len(NAMES), input_shape=(16, 16, 3),
                                       num_stages=3, width_multiplier=0.0625)
    return SelfKDModel(backbone, num_train_examples=8, config=SelfKDConfig(),
                       input_mean=MEAN, input_std=STD)


def normalized(images: np.ndarray) -> np.ndarray:
    """Raw 0..255 pixels as the model's input, as the data pipeline normalises."""
    return (images.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
