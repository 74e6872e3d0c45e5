"""Tests of `cifar:PATH`: the CIFAR python pickles, safely unpickled."""

import io
import os
import pickle
import re
import shutil
import tarfile

import numpy as np
import pytest

from selfkd_tf.data import load_arrays, make_datasets
from support import (
    CIFAR100_MEAN,
    CIFAR10_MEAN,
    CONFIGS,
    RunsCommand,
    assert_one_line_data_error,
    last_line,
    run_cli,
    write_cifar_release,
    writes_file,
)


def archive_release(release, path, extra=()):
    """Writes `release` as a .tar.gz at `path`, plus `(TarInfo, bytes)` members."""
    with tarfile.open(path, "w:gz") as archive:
        archive.add(release, arcname=os.path.basename(release))
        for member, content in extra:
            archive.addfile(member, io.BytesIO(content) if content else None)
    return path


@pytest.mark.parametrize("python2", [False, True], ids=["python3", "python2"])
@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["folder", "parent", "tar.gz"])
def test_cifar_python_pickles(tmp_path, variant, form, python2):
    release, expected, class_names = write_cifar_release(
        str(tmp_path / "src"), variant, python2=python2
    )
    path = {"folder": release, "parent": os.path.dirname(release)}.get(form)
    if form == "tar.gz":
        path = archive_release(
            release, str(tmp_path / f"{os.path.basename(release)}.tar.gz")
        )
        shutil.rmtree(release)

    arrays = load_arrays(f"cifar:{path}")
    np.testing.assert_array_equal(arrays.x_train, expected["train"][0])
    np.testing.assert_array_equal(arrays.y_train, expected["train"][1])
    np.testing.assert_array_equal(arrays.x_test, expected["test"][0])
    np.testing.assert_array_equal(arrays.y_test, expected["test"][1])
    assert arrays.class_names == class_names and arrays.num_classes == len(
        class_names
    )
    assert arrays.x_train.dtype == np.uint8 and arrays.y_train.dtype == np.int64

    _, _, info = make_datasets(f"cifar:{path}")
    assert info.mean == (
        CIFAR10_MEAN if variant == "cifar10" else CIFAR100_MEAN
    )
    assert info.name == f"cifar:{path}"


def test_cifar_rows_are_channel_planes(tmp_path):
    release, _, _ = write_cifar_release(str(tmp_path), "cifar10")
    planes = np.concatenate(
        [np.full(1024, value, np.uint8) for value in (10, 20, 30)]
    )
    with open(os.path.join(release, "data_batch_1"), "wb") as f:
        pickle.dump({b"data": planes[None], b"labels": [7]}, f)
    arrays = load_arrays(f"cifar:{release}")
    np.testing.assert_array_equal(arrays.x_train[0, 5, 9], [10, 20, 30])


# --- Hostile content ------------------------------------------------------------


def hostile_release(tmp_path, marker, name="data_batch_1"):
    """A CIFAR-10 release whose `name` runs `touch marker` when unpickled.

    Its keys are otherwise valid: without protection it trains normally.
    """
    release, _, _ = write_cifar_release(str(tmp_path / "src"), "cifar10")
    content = {
        b"data": np.zeros((3, 3072), np.uint8),
        b"labels": [0, 1, 2],
        b"batch_label": RunsCommand(f"touch {marker}"),
    }
    if name == "batches.meta":
        content = {
            b"label_names": [f"c{i}".encode() for i in range(10)],
            b"num_vis": RunsCommand(f"touch {marker}"),
        }
    with open(os.path.join(release, name), "wb") as f:
        pickle.dump(content, f)
    return release


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("form", ["folder", "tar.gz"])
def test_a_pickle_that_runs_code_is_refused_without_running_it(
    tmp_path, name, form
):
    marker = tmp_path / "MARKER"
    path = release = hostile_release(tmp_path, marker, name)
    if form == "tar.gz":
        path = archive_release(release, str(tmp_path / "cifar.tar.gz"))
    where = os.path.join(path, os.path.basename(release)) if form == "tar.gz" else path
    pattern = (
        rf"^cannot unpickle {re.escape(where)}/{re.escape(name)}: "
        r"refused to load posix\.system: a CIFAR pickle "
        r"holds only dicts, lists, strings, numbers and numpy arrays$"
    )
    assert_one_line_data_error(f"cifar:{path}", {}, pattern)
    assert not marker.exists()


def test_train_refuses_a_hostile_pickle_and_writes_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    release = hostile_release(tmp_path, marker)
    run_dir = tmp_path / "run"
    result = run_cli(
        "selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
        f"--dataset=cifar:{release}", f"--model_dir={run_dir}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.fullmatch(
        r"selfkd-train: error: --dataset: cannot unpickle "
        rf"{re.escape(release)}/data_batch_1: refused to load posix\.system.*",
        last_line(result.stderr),
    )
    assert not marker.exists()
    assert not run_dir.exists()


def _member(name, kind=tarfile.REGTYPE, linkname="", size=0):
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.size = kind, linkname, size
    return member


@pytest.mark.parametrize(
    "member, problem",
    [
        (
            _member("cifar-10-batches-py/data_batch_1", tarfile.SYMTYPE, "OUTSIDE"),
            r"is a link to 'OUTSIDE'",
        ),
        (
            _member("cifar-10-batches-py/data_batch_1", tarfile.LNKTYPE, "OUTSIDE"),
            r"is a link to 'OUTSIDE'",
        ),
        (
            _member("cifar-10-batches-py/../../data_batch_1", size=4),
            r"has a '\.\.' in its name",
        ),
        (_member("/tmp/data_batch_1", size=4), r"has an absolute name"),
        (_member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), r"is not a regular"),
    ],
    ids=["symlink", "hard link", "dot-dot", "absolute", "fifo"],
)
def test_archive_members_that_could_reach_outside_are_refused(
    tmp_path, member, problem
):
    # The link targets a valid pickle outside the archive.
    release, _, _ = write_cifar_release(str(tmp_path / "src"), "cifar10")
    outside = str(tmp_path / "outside_batch")
    shutil.copy(os.path.join(release, "data_batch_1"), outside)
    if member.linkname:
        member.linkname = outside
        problem = problem.replace("OUTSIDE", re.escape(outside))
    os.remove(os.path.join(release, "data_batch_1"))
    path = archive_release(
        release,
        str(tmp_path / "cifar.tar.gz"),
        [(member, b"\0" * member.size)],
    )
    shutil.rmtree(release)
    before = sorted(os.listdir(tmp_path))

    pattern = (
        rf"^refusing {re.escape(path)}: member {re.escape(repr(member.name))} "
        rf"{problem}.*; a CIFAR archive holds only files and folders inside it$"
    )
    assert_one_line_data_error(f"cifar:{path}", {}, pattern)
    assert sorted(os.listdir(tmp_path)) == before  # nothing extracted


# --- Bad data -------------------------------------------------------------------


def _cifar_case(edit, pattern):
    def build(tmp_path):
        release, _, _ = write_cifar_release(str(tmp_path), "cifar10")
        edit(release)
        return (
            f"cifar:{release}",
            {},
            pattern.format(release=re.escape(release)),
        )

    return build


def _corrupt_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08 truncated")
    return (
        f"cifar:{path}",
        {},
        r"cannot read .*cifar-10-python\.tar\.gz as a CIFAR tar archive",
    )


def _batch(rows, labels):
    return pickle.dumps(
        {b"data": np.zeros((rows, 3072), np.uint8), b"labels": labels}
    )


ERROR_CASES = {
    "folder without cifar": lambda p: (
        f"cifar:{p}",
        {},
        r"holds no CIFAR python data",
    ),
    "corrupt pickle": _cifar_case(
        writes_file("data_batch_2", b"garbage"),
        r"cannot unpickle {release}/data_batch_2: ",
    ),
    "missing file": _cifar_case(
        lambda release: os.remove(os.path.join(release, "data_batch_3")),
        r"missing CIFAR file {release}/data_batch_3",
    ),
    "bad data shape": _cifar_case(
        writes_file(
            "test_batch",
            pickle.dumps(
                {b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}
            ),
        ),
        r"{release}/test_batch: 'data' has shape \(2, 5\); "
        r"expected \[N, 3072\]",
    ),
    # Five rows and five labels in all, but not file by file.
    "rows and labels differ in one file": _cifar_case(
        lambda release: (
            writes_file("data_batch_1", _batch(3, [0, 1]))(release),
            writes_file("data_batch_2", _batch(2, [0, 1, 2]))(release),
        ),
        r"^{release}/data_batch_1: 'data' has 3 rows but 'labels' has "
        r"shape \(2,\)$",
    ),
    "label out of range": _cifar_case(
        writes_file("test_batch", _batch(2, [3, 10])),
        r"y_test has label 10 at position 1; labels must be in \[0, 10\)",
    ),
    "corrupt archive": _corrupt_archive,
}


@pytest.mark.parametrize("build", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_cifar_data_raises_a_one_line_data_error(tmp_path, build):
    assert_one_line_data_error(*build(tmp_path))
