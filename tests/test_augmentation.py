"""The ImageNet recipe's augmentation: torchvision's crops, PS-KD's colour noise,
pure functions of their seeds, through the pipeline from images of any size."""

import os

import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.data import make_datasets
from selfkd_tf.data import augmentation as aug
from support import read_epochs, write_image


def test_crop_windows_follow_torchvisions_random_resized_crop():
    areas, ratios = [], []
    for number in range(300):
        height, width = 50 + number % 37, 80 - number % 29
        top, left, h, w = aug.crop_window(height, width, tf.constant([number, 7])).numpy()
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        areas.append(h * w / (height * width))
        ratios.append(w / h)
    # Area 8% to 100%, ratio 3/4 to 4/3, up to the rounding of small windows.
    assert min(areas) > 0.07 and max(areas) <= 1.0
    assert min(ratios) > 0.7 and max(ratios) < 1.45
    assert np.percentile(areas, 90) - np.percentile(areas, 10) > 0.4  # spread out
    # A long thin image fits no drawn window of ratio <= 4/3 over 8%: the
    # centred fallback clamps the ratio to 4/3 of the height.
    top, left, h, w = aug.crop_window(10, 400, tf.constant([1, 2])).numpy()
    assert (h, w, top, left) == (10, 13, 0, 193)


def test_an_augmentation_is_a_pure_function_of_its_seed():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (40, 60, 3)), tf.uint8)
    a = aug.imagenet_train(image, tf.constant([3, 4]), (16, 16))
    b = aug.imagenet_train(image, tf.constant([3, 4]), (16, 16))
    c = aug.imagenet_train(image, tf.constant([3, 5]), (16, 16))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (16, 16, 3) and a.dtype == tf.float32
    assert not np.allclose(a, c)


def test_colour_jitter_and_lighting_are_pskd_s_blends():
    seed = tf.constant([9, 9])
    # A grey image is its own grey level: only the brightness blend, a
    # factor 1 - a with |a| <= 0.4, changes it.
    grey = tf.fill([4, 5, 3], 100.0)
    factor = aug.color_jitter(grey, seed).numpy() / 100.0
    np.testing.assert_allclose(factor, factor[0, 0, 0], rtol=1e-5)
    assert 0.6 <= factor[0, 0, 0] <= 1.4 and factor[0, 0, 0] != 1.0
    image = tf.constant(np.random.default_rng(1).uniform(0, 255, (4, 5, 3)), tf.float32)
    jittered = aug.color_jitter(image, seed).numpy()
    assert not np.allclose(jittered, image)
    # Lighting adds one RGB offset to every pixel: eigvec @ (alpha * eigval) * 255.
    lit = aug.lighting(image, seed).numpy() - image.numpy()
    np.testing.assert_allclose(lit, np.broadcast_to(lit[0, 0], lit.shape), atol=1e-4)
    assert 0 < np.abs(lit[0, 0]).max() < 255 * 0.1 * 0.2175 * 4


def test_evaluation_resizes_the_shorter_side_and_crops_the_centre():
    # Columns numbered 0..99, rows equal: the centre crop's columns are known.
    image = tf.constant(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3)))
    out = aug.resize_and_center_crop(image, (14, 14)).numpy()
    assert out.shape == (14, 14, 3)
    # Shorter side 50 -> round(14 * 256 / 224) = 16: the image becomes 16 x 32
    # and the crop keeps columns 9..22 of 32, i.e. the middle of the original.
    assert out[0, 0, 0] > 25 and out[0, -1, 0] < 75
    np.testing.assert_allclose(out[:, :, 0].mean(), 49.5, atol=3)


def test_images_of_any_size_stream_through_the_imagenet_recipe(tmp_path):
    rng = np.random.default_rng(2)
    for split, count in (("train", 3), ("test", 1)):
        for label in range(2):
            for number in range(count):
                shape = (20 + 7 * number, 30 + 11 * label, 3)
                write_image(os.path.join(tmp_path, split, f"c{label}", f"{number}.png"),
                            rng.integers(0, 256, shape, dtype=np.uint8))
    kwargs = {"augmentation": "imagenet", "image_size": 12, "batch_size": 4, "epochs": 2}
    train, evaluation, info = make_datasets(f"folder:{tmp_path}", **kwargs)
    again, _, _ = make_datasets(f"folder:{tmp_path}", **kwargs)
    assert info.image_shape == (12, 12, 3) and info.cache == "none"
    epochs = read_epochs(train, info, 2)
    for mine, theirs in zip(epochs, read_epochs(again, info, 2)):
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)
    # The same example is cropped differently in another epoch.
    first = epochs[0][1][np.argsort(epochs[0][0])]
    second = epochs[1][1][np.argsort(epochs[1][0])]
    assert not np.array_equal(first, second)
    images = np.concatenate([x["image"].numpy() for x, _ in evaluation])
    assert images.shape == (2, 12, 12, 3)
    with pytest.raises(ValueError, match="contradicts"):
        make_datasets(f"folder:{tmp_path}", augment=False, augmentation="imagenet")
