"""Tests of `cifar10`/`cifar100` through TensorFlow Datasets, all offline.

Nothing here reaches the internet: the download check follows the
environment's HTTPS proxy, as the download would, and the tests point it at
a port on this machine that is closed (network down) or never answers.
A real TFDS copy prepared here from local files is read in
`tests/test_streaming.py` too.
"""

import os
import re
import socket
import subprocess

import numpy as np
import pytest

from selfkd_tf.data import DataError, load_arrays, make_datasets
from selfkd_tf.data.sources import tfds as tfds_source
from support import CONFIGS, command, environment, last_line

tfds = pytest.importorskip("tensorflow_datasets")

OFFLINE_CHOICES = (
    "offline, use --data_dir=DIR holding a prepared TFDS copy, "
    "--dataset=cifar:PATH (the CIFAR python pickles), folder:PATH, npz:PATH, "
    "or the embedded --dataset=digits"
)


def proxy_environment(port):
    """Environment variables that send HTTPS through 127.0.0.1:`port`."""
    return {
        "https_proxy": f"http://127.0.0.1:{port}",
        "HTTPS_PROXY": f"http://127.0.0.1:{port}",
        "no_proxy": "",
        "NO_PROXY": "",
    }


@pytest.fixture
def closed_port():
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def network_down(monkeypatch, closed_port):
    for name, value in proxy_environment(closed_port).items():
        monkeypatch.setenv(name, value)
    return closed_port


def write_cifar10_binaries(folder, rng):
    """The files of TFDS's CIFAR-10 download, 10 images per file."""
    release = folder / "cifar-10-batches-bin"
    release.mkdir(parents=True)
    images, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels[name] = rng.integers(0, 10, 10, dtype=np.uint8)
        images[name] = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate(
            [labels[name][:, None], images[name].reshape(10, -1)], axis=1
        )
        (release / f"{name}.bin").write_bytes(records.tobytes())
    (release / "batches.meta.txt").write_text(
        "\n".join(f"class{i}" for i in range(10)) + "\n"
    )
    return images, labels


def test_a_prepared_copy_loads_with_the_network_down(
    tmp_path, monkeypatch, network_down
):
    # Prepare a real TFDS copy; only fetching the archive is replaced by
    # local files in TFDS's own binary format.
    images, labels = write_cifar10_binaries(
        tmp_path / "download", np.random.default_rng(0)
    )
    data_dir = tmp_path / "tfds"
    with monkeypatch.context() as patch:
        patch.setattr(
            tfds.download.DownloadManager,
            "download_and_extract",
            lambda self, url: str(tmp_path / "download"),
        )
        tfds.builder("cifar10", data_dir=str(data_dir)).download_and_prepare()

    arrays = load_arrays("cifar10", data_dir=str(data_dir))
    assert arrays.class_names == tuple(f"class{i}" for i in range(10))
    assert arrays.x_train.shape == (50, 32, 32, 3)
    # TFDS keeps its own order; every image must arrive with its label.
    expected = {
        img.transpose(1, 2, 0).tobytes(): label
        for name in images
        if name != "test_batch"
        for img, label in zip(images[name], labels[name])
    }
    assert {
        x.tobytes(): y for x, y in zip(arrays.x_train, arrays.y_train)
    } == expected
    assert sorted(arrays.y_test) == sorted(labels["test_batch"])


@pytest.mark.parametrize("data_dir_exists", [False, True])
def test_no_network_fails_at_once_naming_the_offline_choices(
    tmp_path, network_down, data_dir_exists
):
    data_dir = tmp_path / "tfds"
    if data_dir_exists:
        (data_dir / "other_dataset").mkdir(parents=True)
    before = sorted(os.walk(tmp_path))
    with pytest.raises(DataError) as raised:
        load_arrays("cifar100", data_dir=str(data_dir))
    message = str(raised.value)
    assert re.fullmatch(
        rf"TFDS dataset 'cifar100' is not prepared in {re.escape(str(data_dir))} "
        rf"and cannot be downloaded: the HTTPS proxy 127\.0\.0\.1:{network_down} "
        r"is unreachable \(\[Errno 111\] Connection refused\); "
        + re.escape(OFFLINE_CHOICES),
        message,
    ), message
    assert sorted(os.walk(tmp_path)) == before  # nothing created


def test_a_download_host_that_never_answers_fails_after_the_timeout(
    tmp_path, monkeypatch
):
    # A listening socket whose one-slot backlog is taken: further connection
    # attempts get no answer, as when packets are dropped.
    with socket.socket() as server, socket.socket() as first:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        first.connect(("127.0.0.1", port))
        for name, value in proxy_environment(port).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(tfds_source, "CONNECT_TIMEOUT_S", 0.5)
        with pytest.raises(DataError, match=(
            rf"cannot be downloaded: the HTTPS proxy 127\.0\.0\.1:{port} gave "
            r"no answer within 0\.5 s; offline, use --data_dir"
        )):
            load_arrays("cifar10", data_dir=str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()


def test_train_without_network_exits_2_with_one_line(tmp_path, closed_port):
    data_dir = tmp_path / "tfds"
    run_dir = tmp_path / "run"
    result = subprocess.run(
        command(
            "selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
            "--dataset=cifar100", f"--data_dir={data_dir}",
            f"--model_dir={run_dir}",
        ),
        env={**environment(), **proxy_environment(closed_port)},
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith(
        "selfkd-train: error: --dataset: TFDS dataset 'cifar100' is not "
        f"prepared in {data_dir} and cannot be downloaded"
    )
    assert last_line(result.stderr).endswith(OFFLINE_CHOICES)
    assert not data_dir.exists() and not run_dir.exists()


def test_a_failed_download_leaves_only_what_was_there(tmp_path):
    root = tmp_path / "tfds"
    (root / "downloads" / "mnist").mkdir(parents=True)
    (root / "downloads" / "mnist" / "kept.tar.gz").write_bytes(b"x")
    (root / "mnist" / "3.0.1").mkdir(parents=True)

    # What TFDS writes before a download fails.
    created = [
        "cifar100/3.0.2.incompleteXYZ/",
        "downloads/cifar100/cs.toronto.edu_kriz_cifar-100.tar.gz.tmp.c56/",
        "downloads/extracted/",
        "downloads/mnist/partial.tmp",
    ]
    with pytest.raises(ConnectionError):
        with tfds_source._removed_on_failure(str(root), ["cifar100", "downloads"]):
            for name in created:
                path = root / name
                if name.endswith("/"):
                    path.mkdir(parents=True)
                else:
                    path.write_bytes(b"partial")
            raise ConnectionError("download interrupted")

    remaining = sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, dirs, files in os.walk(root)
        for name in dirs + files
    )
    assert remaining == [
        "downloads", "downloads/mnist", "downloads/mnist/kept.tar.gz",
        "mnist", "mnist/3.0.1",
    ]


def test_a_failed_download_into_a_new_data_dir_removes_it_and_its_parents(tmp_path):
    root = tmp_path / "new" / "tfds"
    with pytest.raises(KeyboardInterrupt):
        with tfds_source._removed_on_failure(str(root), ["cifar10", "downloads"]):
            (root / "cifar10").mkdir(parents=True)
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()
