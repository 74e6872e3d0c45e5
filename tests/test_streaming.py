"""Streamed data: files decoded as they are used keep every guarantee of data in memory.

Image folders and TFDS copies built here, in their real formats: the same
batches streamed and cached, the order and augmentation a function of
`(seed, epoch, index)`, a resumed epoch, each worker's share, the cache
policy and TFDS read as record files.
"""

import math
import os

import numpy as np
import pytest
from support import (
    assert_one_line_data_error,
    read_epochs,
    read_pass,
    write_image,
)

from selfkd_tf.data import DataError, WorkerShare, make_datasets, pipeline
from selfkd_tf.data.plan import epoch_plan, piece_bounds


def write_folder(root, train_per_class=5, test_per_class=2, classes=3, size=(10, 12),
                 varied=False):
    """A folder of JPEG and PNG files of random pixels; sizes vary when asked."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in range(classes):
            for number in range(count):
                shape = size if not varied else (size[0] + 3 * number, size[1] + 5 * label)
                image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
                extension = "png" if number % 2 else "jpg"
                write_image(os.path.join(root, split, f"c{label}", f"{number}.{extension}"),
                            image)
    return f"folder:{root}"


def assert_same_epochs(a, b, info, epochs):
    for mine, theirs in zip(read_epochs(a, info, epochs), read_epochs(b, info, epochs)):
        for x, y in zip(mine, theirs):
            np.testing.assert_array_equal(x, y)


def test_streamed_and_cached_folders_give_the_same_batches(tmp_path):
    dataset = write_folder(tmp_path)
    kwargs = {"batch_size": 4, "epochs": 2, "validation_fraction": 0.2}
    cached = make_datasets(dataset, cache="memory", **kwargs)
    streamed = make_datasets(dataset, cache="none", **kwargs)
    assert (cached[2].cache, streamed[2].cache) == ("memory", "none")
    assert cached[2].mean == streamed[2].mean and cached[2].std == streamed[2].std
    assert_same_epochs(cached[0], streamed[0], cached[2], 2)
    for a, b in zip(read_pass(cached[1], cached[2]), read_pass(streamed[1], streamed[2])):
        np.testing.assert_array_equal(a, b)


def test_a_file_that_does_not_decode_is_named_by_the_statistics_pass(tmp_path):
    dataset = write_folder(tmp_path)
    bad = tmp_path / "train" / "c1" / "7.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    with pytest.raises(DataError) as raised:
        make_datasets(dataset, cache="none", batch_size=4)
    assert str(raised.value) == (
        f"normalization=dataset reads every training image once; {bad} does not decode")


def test_a_streamed_epoch_resumed_part_way_sees_the_rest_of_it(tmp_path):
    dataset = write_folder(tmp_path)
    full, _, info = make_datasets(dataset, batch_size=4, epochs=3, cache="none")
    resumed, _, _ = make_datasets(dataset, batch_size=4, epochs=3, initial_epoch=1,
                                  cache="none")
    expected = [x["index"].numpy() for x, _ in full.skip(info.steps_per_epoch + 2)]
    got = [x["index"].numpy() for x, _ in resumed.skip(2)]
    assert len(got) == len(expected) == 2 * info.steps_per_epoch - 2
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_the_cache_follows_the_decoded_size(tmp_path, monkeypatch):
    dataset = write_folder(tmp_path)
    # 21 images of 10x12x3 bytes.
    monkeypatch.setattr(pipeline, "MEMORY_CACHE_BYTES", 21 * 360)
    assert make_datasets(dataset)[2].cache == "memory"
    monkeypatch.setattr(pipeline, "MEMORY_CACHE_BYTES", 21 * 360 - 1)
    assert make_datasets(dataset)[2].cache == "none"
    assert make_datasets(dataset, cache="memory")[2].cache == "memory"
    assert_one_line_data_error(
        dataset, {"augmentation": "imagenet", "cache": "memory"},
        r"^cache='memory' holds images at one size; augmentation='imagenet' crops")
    assert_one_line_data_error(dataset, {"cache": "disk"},
                               r"^cache must be one of 'auto', 'memory', 'none'")


# --- Each worker's share ------------------------------------------------------------


@pytest.mark.parametrize("num_examples, batch_size, replicas_per_worker",
                         [(23, 8, 1), (10, 16, 2), (7, 3, 1)])
def test_worker_shares_partition_every_batch_and_keep_global_indices(
        num_examples, batch_size, replicas_per_worker):
    order = epoch_plan(num_examples, seed=3, epoch=1, augmentation="none")["index"].numpy()
    steps = math.ceil(num_examples / batch_size)
    for step in range(steps):
        batch = order[step * batch_size:(step + 1) * batch_size]
        pieces = []
        for worker in range(2):
            starts, stops = piece_bounds(len(batch), batch_size,
                                         WorkerShare(worker, 2, replicas_per_worker))
            pieces += [batch[a:b] for a, b in zip(starts, stops)]
        # Replica order is batch order: the pieces put together are the batch.
        np.testing.assert_array_equal(np.concatenate(pieces), batch)
        per_replica = math.ceil(batch_size / (2 * replicas_per_worker))
        assert all(len(piece) <= per_replica for piece in pieces)


def test_each_worker_reads_only_its_own_files(tmp_path):
    dataset = write_folder(tmp_path, train_per_class=4)
    whole, _, info = make_datasets(dataset, batch_size=5, epochs=1, cache="none",
                                   augment=False)
    batches = [(x["index"].numpy(), x["image"].numpy(), y.numpy()) for x, y in whole]
    shares = []
    for worker in range(2):
        train, _, _ = make_datasets(dataset, batch_size=5, epochs=1, cache="none",
                                    augment=False, share=WorkerShare(worker, 2, 1))
        shares.append(list(train))
    for step, (index, images, labels) in enumerate(batches):
        mine, theirs = shares[0][step], shares[1][step]
        np.testing.assert_array_equal(
            np.concatenate([mine[0]["index"], theirs[0]["index"]]), index)
        np.testing.assert_array_equal(
            np.concatenate([mine[0]["image"], theirs[0]["image"]]), images)
        np.testing.assert_array_equal(np.concatenate([mine[1], theirs[1]]), labels)
    # Worker 0 never opens worker 1's files: remove them and read its share again.
    files = sorted(str(p) for p in (tmp_path / "train").rglob("*.*"))
    theirs = {int(i) for x, _ in shares[1] for i in x["index"].numpy()}
    train, _, _ = make_datasets(dataset, batch_size=5, epochs=1, cache="none",
                                augment=False, share=WorkerShare(0, 2, 1),
                                normalization="imagenet")
    for index in theirs:
        os.remove(files[index])
    got = np.concatenate([x["index"].numpy() for x, _ in train])
    assert not set(got) & theirs and len(got) + len(theirs) == info.num_train


# --- TFDS, read as record files ------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_cifar10(tmp_path_factory):
    """A real TFDS copy of a tiny CIFAR-10, prepared from local files."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from test_sources_tfds import write_cifar10_binaries

    root = tmp_path_factory.mktemp("tfds")
    write_cifar10_binaries(root / "download", np.random.default_rng(0))
    patch = pytest.MonkeyPatch()
    patch.setattr(tfds.download.DownloadManager, "download_and_extract",
                  lambda self, url: str(root / "download"))
    try:
        tfds.builder("cifar10", data_dir=str(root / "data")).download_and_prepare()
    finally:
        patch.undo()
    return str(root / "data")


def test_tfds_streamed_and_cached_hold_the_same_examples(tfds_cifar10):
    kwargs = {"data_dir": tfds_cifar10, "batch_size": 8, "epochs": 2}
    cached = make_datasets("cifar10", cache="memory", **kwargs)
    streamed = make_datasets("cifar10", cache="none", **kwargs)
    again = make_datasets("cifar10", cache="none", **kwargs)
    info = streamed[2]
    assert info.cache == "none" and info.num_train == 50 and info.num_eval == 10
    epochs = read_epochs(streamed[0], info, 2)
    by_index = {}
    for indices, images, labels in epochs:
        np.testing.assert_array_equal(np.sort(indices), np.arange(50))
        for i, label in zip(indices, labels):
            assert by_index.setdefault(i, label) == label  # the index follows its example
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # reshuffled each epoch
    assert_same_epochs(streamed[0], again[0], info, 2)  # a function of (seed, epoch)
    # The same image per index as the examples held in memory, before augmentation.
    plain = [make_datasets("cifar10", cache=cache, augment=False, **kwargs)
             for cache in ("memory", "none")]
    (mi, mx, my), (si, sx, sy) = (read_epochs(ds, i, 1)[0] for ds, _, i in plain)
    np.testing.assert_array_equal(mx[np.argsort(mi)], sx[np.argsort(si)])
    np.testing.assert_array_equal(my[np.argsort(mi)], sy[np.argsort(si)])
    for a, b in zip(read_pass(cached[1], cached[2]), read_pass(streamed[1], info)):
        np.testing.assert_array_equal(a, b)


def test_tfds_subsets_read_labels_without_decoding(tfds_cifar10):
    train, evaluation, info = make_datasets(
        "cifar10", data_dir=tfds_cifar10, cache="none", validation_fraction=0.2,
        batch_size=64, augment=False)
    assert (info.num_train, info.num_eval, info.eval_split) == (40, 10, "validation")
    indices, _ = read_pass(train, info)
    np.testing.assert_array_equal(np.sort(indices), np.arange(40))
    np.testing.assert_array_equal(read_pass(evaluation, info)[0], np.arange(10))


def test_imagenet2012_names_the_files_to_download_by_hand(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "ILSVRC2012_img_val.tar").write_bytes(b"")
    assert_one_line_data_error(
        "imagenet2012", {"data_dir": str(tmp_path)},
        rf"^TFDS dataset 'imagenet2012' is not prepared in {tmp_path} and its files "
        rf"are downloaded by hand: ILSVRC2012_img_train\.tar missing in {manual}$")


def test_a_prepared_copy_missing_a_record_file_is_refused_by_name(tfds_cifar10, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tfds_cifar10, copy)
    (victim,) = [p for p in copy.rglob("cifar10-test.tfrecord-*")]
    victim.unlink()
    with pytest.raises(DataError, match=rf"split 'test' is incomplete: {victim} missing"):
        make_datasets("cifar10", data_dir=str(copy), cache="none")
