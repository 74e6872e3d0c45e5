"""Tests of `folder:PATH`: class folders of image files."""

import logging
import os
import re
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from selfkd_tf.data import load_arrays, make_datasets
from support import (
    assert_one_line_data_error,
    shared_file,
    solid,
    write_image,
    write_image_folder,
    writes_file,
)

REAL_CIFAR_ARCHIVE = "cifar10-jpeg.tar.gz"
"""The real CIFAR-10 as JPEG files, in the shared data (`support.SHARED_DATA`)."""


def test_folder_of_images(tmp_path):
    root, files = write_image_folder(tmp_path / "images")
    arrays = load_arrays(f"folder:{root}")

    assert arrays.class_names == ("cat", "dog", "emu")
    assert arrays.num_classes == 3
    assert arrays.x_train.shape == (5, 12, 10, 3)
    assert arrays.x_train.dtype == np.uint8
    np.testing.assert_array_equal(arrays.y_train, [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(arrays.y_test, [0, 1, 2])
    np.testing.assert_allclose(
        arrays.x_train[0], files["train/cat/a.jpg"], atol=3
    )
    np.testing.assert_allclose(
        arrays.x_train[1], solid(12, 10, (0, 128, 250)), atol=3
    )
    np.testing.assert_array_equal(
        arrays.x_train[2], files["train/dog/a.png"][..., :3]
    )
    np.testing.assert_array_equal(
        arrays.x_train[3], np.repeat(files["train/dog/b.png"], 3, axis=-1)
    )
    np.testing.assert_array_equal(arrays.x_train[4], files["train/emu/a.bmp"])
    np.testing.assert_array_equal(arrays.x_test[0], files["test/cat/a.png"])

    _, _, info = make_datasets(f"folder:{root}")
    assert info.name == f"folder:{root}" and info.image_shape == (12, 10, 3)
    np.testing.assert_allclose(
        info.mean, arrays.x_train.mean(axis=(0, 1, 2)) / 255, rtol=1e-9
    )


@pytest.mark.parametrize(
    "name, save",
    [
        ("a.gif", {}),
        ("a.webp", {"lossless": True}),
        ("a.JPG", {"format": "JPEG", "quality": 100}),
        ("a.jpeg", {"quality": 100}),
        ("a.Png", {"format": "PNG"}),
    ],
)
def test_every_format_tensorflow_decodes_is_read(tmp_path, name, save):
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for split in ("train", "test"):
        for label, color in colors.items():
            os.makedirs(tmp_path / split / label)
            Image.new("RGB", (7, 5), color).save(
                tmp_path / split / label / name, **save
            )
    arrays = load_arrays(f"folder:{tmp_path}")
    assert arrays.x_train.shape == (2, 5, 7, 3)
    np.testing.assert_allclose(
        arrays.x_train[1], solid(5, 7, colors["red"]), atol=2
    )
    np.testing.assert_allclose(
        arrays.x_test[0], solid(5, 7, colors["blue"]), atol=2
    )


def test_hidden_system_and_other_files_are_skipped_and_counted(
    tmp_path, caplog
):
    root, files = write_image_folder(tmp_path / "images")
    train = os.path.join(root, "train")
    junk = {
        # Hidden and operating-system files, some with image extensions.
        "train/.DS_Store": b"\0\0\0\1Bud1",
        "train/cat/.DS_Store": b"\0\0\0\1Bud1",
        "train/cat/._a.jpg": b"\0\5\26\7 AppleDouble",
        "train/dog/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "train/dog/desktop.ini": b"[.ShellClassInfo]",
        "train/emu/.ipynb_checkpoints/a-checkpoint.png": b"not read",
        "train/__MACOSX/cat/._a.jpg": b"\0\5\26\7",
        "train/.hidden_class/a.png": b"not read",
        # Files nobody meant as images, and a nested folder.
        "train/README.txt": b"about this data",
        "train/dog/labels.csv": b"a,b",
        "train/dog/scan.tif": b"II*\0",
        "train/cat/extra/c.jpg": b"not read",
    }
    for name, content in junk.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(content)

    with caplog.at_level(logging.WARNING):
        arrays = load_arrays(f"folder:{root}")

    assert arrays.class_names == ("cat", "dog", "emu")
    assert arrays.x_train.shape == (5, 12, 10, 3)
    np.testing.assert_array_equal(arrays.x_train[4], files["train/emu/a.bmp"])
    (message,) = [r.getMessage() for r in caplog.records if train in r.getMessage()]
    assert message == (
        f"{train}: skipped 8 hidden or system files and folders (.DS_Store, "
        ".hidden_class, __MACOSX, ...) and 5 other files and nested folders, "
        "not images TensorFlow decodes (README.txt, cat/extra/, "
        "dog/labels.csv, ...)"
    )


def unpack_real_cifar_subset(archive, destination, classes, train_count=3, test_count=2):
    """Unpacks a few real CIFAR-10 JPEGs of `archive` into `destination`."""
    wanted = {
        f"{split}/{name}/{i:04d}.jpg"
        for name in classes
        for split, count in (("train", train_count), ("test", test_count))
        for i in range(count)
    }
    with tarfile.open(archive) as tar:
        for member in tar:
            relative = member.name.partition("/")[2]
            if relative in wanted:
                (destination / relative).parent.mkdir(
                    parents=True, exist_ok=True
                )
                (destination / relative).write_bytes(
                    tar.extractfile(member).read()
                )
                wanted.discard(relative)
                if not wanted:
                    return
    raise AssertionError(f"{archive} lacks {sorted(wanted)}")


def test_real_cifar10_jpegs(tmp_path_factory):
    archive = shared_file(REAL_CIFAR_ARCHIVE)  # skips the test when absent
    classes = ("airplane", "automobile", "bird")
    tmp_path = tmp_path_factory.mktemp("real_cifar10")
    unpack_real_cifar_subset(archive, tmp_path, classes)
    arrays = load_arrays(f"folder:{tmp_path}")
    assert arrays.class_names == classes
    assert arrays.x_train.shape == (9, 32, 32, 3)
    assert arrays.x_test.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(arrays.y_train, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    first = tf.io.decode_jpeg(
        tf.io.read_file(str(tmp_path / "train/airplane/0000.jpg"))
    ).numpy()
    np.testing.assert_array_equal(arrays.x_train[0], first)

    train, _, info = make_datasets(f"folder:{tmp_path}", batch_size=4)
    assert info.steps_per_epoch == 3 and all(0.2 < m < 0.8 for m in info.mean)
    parts = list(train)
    indices = np.concatenate([x["index"].numpy() for x, _ in parts])
    np.testing.assert_array_equal(np.sort(indices), np.arange(9))


# --- Errors -------------------------------------------------------------------


def _folder(tmp_path, layout):
    for name in layout:
        path = str(tmp_path / "root" / name)
        if name.endswith("/"):
            os.makedirs(path, exist_ok=True)
        else:
            write_image(path, solid(4, 4, (1, 2, 3)))
    return f"folder:{tmp_path / 'root'}", str(tmp_path / "root")


def _case(layout, pattern, edit=None):
    def build(tmp_path):
        dataset, root = _folder(tmp_path, layout)
        if edit:
            edit(root)
        return dataset, {}, pattern.format(root=re.escape(root))

    return build


ERROR_CASES = {
    "missing split folder": _case(["train/a/x.png"], r"missing folder {root}/test"),
    "split without class folders": _case(
        ["train/a/x.png", "test/"], r"^{root}/test has no class folders$"
    ),
    "empty class folder": _case(
        ["train/a/x.png", "train/b/", "test/a/x.png", "test/b/x.png"],
        r"class folder {root}/train/b has no image files",
    ),
    "class folder of metadata only": _case(
        ["train/a/x.png", "train/b/", "test/a/x.png", "test/b/x.png"],
        r"class folder {root}/train/b has no image files",
        writes_file("train/b/.DS_Store", b"\0\0\0\1Bud1"),
    ),
    "class folders differ": _case(
        ["train/a/x.png", "train/c/x.png", "test/a/x.png", "test/b/x.png"],
        r"class folders differ .*only in train: \['c'\], only in test: \['b'\]",
    ),
    "single class": _case(
        ["train/a/x.png", "test/a/x.png"],
        r"^{root}: has a single class \('a'\); classification needs at least 2$",
    ),
    # Sorted after x.png, the first image, which sets the size.
    "undecodable images": _case(
        ["train/a/x.png", "train/b/x.png", "test/a/x.png", "test/b/x.png"],
        r"^cannot read or decode image file {root}/train/a/y_bad\.jpg "
        r"\(and 1 more\): Unknown image file format\. One of JPEG, .* required\.$",
        lambda root: (
            writes_file("train/a/y_bad.jpg", b"\xff\xd8 not really an image")(root),
            writes_file("train/a/z_worse.webp", b"RIFF not really")(root),
        ),
    ),
}


@pytest.mark.parametrize("build", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_folders_raise_a_one_line_data_error(tmp_path, build):
    assert_one_line_data_error(*build(tmp_path))
