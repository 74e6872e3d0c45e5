"""What the tests share: paths, tiny data and models, run directories, clusters.

Sections:

1. Paths and subprocesses: the repository, the shared data beside it, and
   running ``python -m selfkd_tf.cli.*`` as a user would.
2. Tiny data in every format: learnable arrays and datasets in the element
   structure of `selfkd_tf.data`, ``npz:`` files, CIFAR python releases,
   image folders, and readers of the pipelines.
3. Tiny models: the narrow multi-exit ResNets most tests train, and the one
   the serving tests export.
4. Run directories and records: snapshots, metrics records written by hand,
   TensorBoard scalars.
5. Clusters of local worker processes: ``TF_CONFIG``, bounded waits, killing
   a worker at a checkpoint, results produced once per session.
6. Step recording: a callback that keeps every step's logs and every
   epoch's PS-KD table.

TensorFlow and Keras are imported by the helpers that need them, so tests
that never touch them (the report's) import this module without them.
"""

import fcntl
import glob
import json
import os
import pathlib
import pickle
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

# -- 1. Paths and subprocesses ---------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"
"""Data shared by the projects beside this one (``../shared/data`` from the
repository root); nothing there is part of the repository."""


def shared_file(name: str) -> pathlib.Path:
    """``SHARED_DATA / name``; skips the calling test when that file is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared data, expected at ../shared/data "
                    "from the repository root)")
    return path


def environment() -> dict:
    """The test environment of a child process: quiet TensorFlow, no GPU."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def command(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_cli(module: str, *args: str, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repository root.

    ``env`` replaces the test environment (`environment`), e.g. to run with
    the user's defaults.
    """
    return subprocess.run(
        command(module, *args), cwd=REPO, env=environment() if env is None else env,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def last_line(text: str) -> str:
    """The last line of ``text`` that is not blank, or ""."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- 2. Tiny data in every format --------------------------------------------------

# Learnable data, as arrays, a pipeline's batches, or an ``npz:`` file.

LEARNABLE_NPZ_CLASSES = 4
"""The number of classes `write_learnable_npz` writes."""


def learnable_arrays(n: int, num_classes: int, size: int = 16, seed: int = 0):
    """Images whose class is visible in their colour, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    palette = rng.uniform(-1, 1, size=(num_classes, 1, 1, 3))
    images = palette[labels] + 0.3 * rng.normal(size=(n, size, size, 3))
    return images.astype("float32"), labels.astype("int32")


def indexed_dataset(images, labels, batch_size: int, shuffle_seed=None):
    """``({"image", "index"}, label)`` batches, as `selfkd_tf.data` yields."""
    import tensorflow as tf

    index = np.arange(len(labels), dtype="int32")
    ds = tf.data.Dataset.from_tensor_slices(({"image": images, "index": index}, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(labels), seed=shuffle_seed)
    return ds.batch(batch_size)


def write_learnable_npz(path, n_train: int = 64, n_test: int = 32, size: int = 16) -> str:
    """An ``npz:`` dataset of learnable ``size``-pixel uint8 images in
    `LEARNABLE_NPZ_CLASSES` classes, written to ``path``; returns its flag value."""
    images, labels = learnable_arrays(n_train + n_test, LEARNABLE_NPZ_CLASSES, size=size)
    pixels = np.clip((images + 1.5) / 3 * 255, 0, 255).astype(np.uint8)
    np.savez(path, x_train=pixels[:n_train], y_train=labels[:n_train],
             x_test=pixels[n_train:], y_test=labels[n_train:])
    return f"npz:{path}"


# Arrays of images whose pixels name their position.

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)


def unique_images(count, height=8, width=8, channels=3, seed=0):
    """uint8 images whose first two pixel values spell their position."""
    images = np.random.default_rng(seed).integers(
        0, 256, (count, height, width, channels), dtype=np.uint8
    )
    images.reshape(count, -1)[:, 0] = np.arange(count) // 256
    images.reshape(count, -1)[:, 1] = np.arange(count) % 256
    return images


def positions(images):
    """Inverse of `unique_images`: the position spelled by each image."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.int64)
    return flat[:, 0] * 256 + flat[:, 1]


def write_npz_arrays(directory, **arrays):
    """Writes ``arrays`` as ``directory/data.npz``; returns its ``npz:`` flag value."""
    path = os.path.join(directory, "data.npz")
    np.savez(path, **arrays)
    return f"npz:{path}"


def small_npz(directory):
    """60 training examples in 3 classes of 30/20/10, 12 test examples.

    Returns the dataset string and the arrays written.
    """
    y_train = np.repeat([0, 1, 2], [30, 20, 10])
    np.random.default_rng(1).shuffle(y_train)
    arrays = {
        "x_train": unique_images(60),
        "y_train": y_train,
        "x_test": unique_images(12, seed=1),
        "y_test": np.arange(12) % 3,
        "class_names": np.array(["ant", "bee", "cow"]),
    }
    return write_npz_arrays(directory, **arrays), arrays


# Reading a pipeline back.


def raw_pixels(images, info):
    """Undoes the normalization of `images`, back to [0, 255] pixel values."""
    mean = np.asarray(info.mean) * 255
    std = np.asarray(info.std) * 255
    return np.round(np.asarray(images) * std + mean).astype(np.int64)


def read_epochs(train, info, count):
    """Indices, raw images and labels of `count` epochs of an `epochs=N` set."""
    epochs = []
    batches = iter(train)
    for _ in range(count):
        parts = [next(batches) for _ in range(info.steps_per_epoch)]
        epochs.append(
            (
                np.concatenate([x["index"].numpy() for x, _ in parts]),
                np.concatenate(
                    [raw_pixels(x["image"], info) for x, _ in parts]
                ),
                np.concatenate([y.numpy() for _, y in parts]),
            )
        )
    return epochs


def read_pass(dataset, info):
    """Indices and raw images of one full iteration over `dataset`."""
    parts = list(dataset)
    return (
        np.concatenate([x["index"].numpy() for x, _ in parts]),
        np.concatenate([raw_pixels(x["image"], info) for x, _ in parts]),
    )


# CIFAR python releases.


def python2_pickle(value):
    """`value` pickled as Python 2 with numpy 1 did (protocol 2).

    Python 2 `str` (here: `str` and `bytes`) become byte strings, and a numpy
    array is rebuilt by `numpy.core.multiarray._reconstruct`, exactly the
    opcodes of the canonical CIFAR files. Handles dicts, lists, strings, ints
    and uint8 arrays.
    """

    def string(data):
        data = data.encode("latin1") if isinstance(data, str) else data
        if len(data) < 256:
            return b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
        return b"T" + struct.pack("<i", len(data)) + data  # BINSTRING

    def encode(item):
        if isinstance(item, (str, bytes)):
            return string(item)
        if isinstance(item, int):
            return b"J" + struct.pack("<i", item)  # BININT
        if isinstance(item, list):
            return b"](" + b"".join(map(encode, item)) + b"e"  # APPENDS
        if isinstance(item, dict):
            pairs = b"".join(encode(k) + encode(v) for k, v in item.items())
            return b"}(" + pairs + b"u"  # SETITEMS
        assert isinstance(item, np.ndarray) and item.dtype == np.uint8
        dtype = (
            b"cnumpy\ndtype\n" + string("u1") + b"K\x00K\x01\x87R"
            # The dtype's state: version 3, byte order "|", no fields.
            + b"(K\x03" + string("|") + b"NNNJ\xff\xff\xff\xff"
            + b"J\xff\xff\xff\xffK\x00tb"
        )
        shape = b"(" + b"".join(encode(int(d)) for d in item.shape) + b"t"
        return (
            b"cnumpy.core.multiarray\n_reconstruct\n"
            + b"cnumpy\nndarray\nK\x00\x85" + string("b") + b"\x87R"
            # The array's state: version 1, shape, dtype, C order, bytes.
            + b"(K\x01" + shape + dtype + b"\x89"
            + string(item.tobytes()) + b"tb"
        )

    return b"\x80\x02" + encode(value) + b"."


def write_cifar_release(root, variant, python2=False):
    """Writes a tiny CIFAR python release; returns its folder and contents.

    With `python2`, the files are pickled as Python 2 wrote the canonical ones.
    """
    rng = np.random.default_rng(2)
    if variant == "cifar10":
        folder, meta_file = "cifar-10-batches-py", "batches.meta"
        test_file = "test_batch"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        names_key, label_key = "label_names", "labels"
        class_names = [f"class{i}" for i in range(10)]
        train_rows = 3
    else:
        folder, meta_file, test_file = "cifar-100-python", "meta", "test"
        train_files = ["train"]
        names_key, label_key = "fine_label_names", "fine_labels"
        class_names = [f"fine{i:02d}" for i in range(100)]
        train_rows = 120
    key = str if python2 else str.encode
    dump = python2_pickle if python2 else pickle.dumps
    release = os.path.join(root, folder)
    os.makedirs(release)
    expected = {}
    for split, files, count in (
        ("train", train_files, train_rows),
        ("test", [test_file], 2),
    ):
        rows, labels = [], []
        for name in files:
            data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            label = rng.integers(0, len(class_names), count).tolist()
            content = {
                key("data"): data,
                key(label_key): label,
                key("batch_label"): key("x"),
            }
            if variant == "cifar100":
                content[key("coarse_labels")] = [0] * count
            with open(os.path.join(release, name), "wb") as f:
                f.write(dump(content))
            rows.append(data)
            labels.extend(label)
        rows = np.concatenate(rows)
        expected[split] = (
            rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
            np.array(labels),
        )
    with open(os.path.join(release, meta_file), "wb") as f:
        f.write(dump({key(names_key): [key(n) for n in class_names]}))
    return release, expected, tuple(class_names)


# Image files and folders.


def write_bmp(path, image):
    """Writes uint8 RGB `[H, W, 3]` as an uncompressed 24-bit BMP."""
    height, width, _ = image.shape
    padding = b"\0" * (-3 * width % 4)
    # Rows are stored bottom-up, pixels as BGR.
    pixels = b"".join(
        image[row, :, ::-1].tobytes() + padding
        for row in range(height - 1, -1, -1)
    )
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    # BITMAPINFOHEADER: size, width, height, planes, bits per pixel,
    # compression, image size, resolution x/y, palette colors, important.
    fields = (40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    dib = struct.pack("<IiiHHIIiiII", *fields)
    with open(path, "wb") as f:
        f.write(header + dib + pixels)


def write_image(path, image):
    """Writes uint8 `[H, W, C]` as JPEG, PNG or BMP, chosen by the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".bmp"):
        write_bmp(path, image)
        return
    import tensorflow as tf

    encode = (
        tf.io.encode_png
        if path.endswith(".png")
        else lambda x: tf.io.encode_jpeg(x, quality=100)
    )
    tf.io.write_file(path, encode(image))


def solid(height, width, color):
    """A uint8 image of one colour."""
    return np.broadcast_to(
        np.asarray(color, np.uint8), (height, width, len(color))
    ).copy()


def write_image_folder(root):
    """JPEG, PNG and BMP files: RGB, gray, RGBA, mixed sizes, a stray file.

    Returns the root as a string and the images written, by relative path.
    """
    rgba = np.dstack(
        [solid(12, 10, (200, 40, 90)), np.full((12, 10, 1), 77, np.uint8)]
    )
    gray = np.arange(120, dtype=np.uint8).reshape(12, 10, 1)
    bmp = np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    files = {
        # The first image sets the size; the second is resized to it.
        "train/cat/a.jpg": solid(12, 10, (250, 128, 0)),
        "train/cat/b.jpg": solid(24, 20, (0, 128, 250)),
        "train/dog/a.png": rgba,
        "train/dog/b.png": gray,
        "train/emu/a.bmp": bmp,
        "test/cat/a.png": solid(12, 10, (1, 2, 3)),
        "test/dog/a.jpg": solid(12, 10, (9, 9, 9)),
        "test/emu/a.png": solid(12, 10, (4, 5, 6)),
    }
    for name, image in files.items():
        write_image(os.path.join(root, name), image)
    with open(os.path.join(root, "train", "emu", "notes.txt"), "w") as f:
        f.write("not an image")
    return str(root), files


# Bad data.


def writes_file(name, content):
    """An edit of a dataset folder: writes `content` to `folder/name`."""

    def edit(folder):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)

    return edit


class RunsCommand:
    """Unpickles by running a shell command, as a hostile pickle would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def assert_one_line_data_error(dataset, kwargs, pattern):
    """`make_datasets(dataset, **kwargs)` raises a one-line `DataError`."""
    from selfkd_tf.data import DataError, make_datasets

    with pytest.raises(DataError, match=pattern) as raised:
        make_datasets(dataset, **kwargs)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, ValueError)


# -- 3. Tiny models -------------------------------------------------------------------

TINY_WIDTH = 0.0625
"""The narrowest width the tests build: channel counts of 4 to 32 in ResNet-18."""


def tiny_backbone(num_classes: int, image_size: int, channels: int = 3, num_stages: int = 2,
                  exit_head: str | None = None, width_multiplier: float = TINY_WIDTH,
                  sync_batchnorm: bool = False, seed: int | None = None,
                  arch: str = "resnet18"):
    """A narrow multi-exit ResNet (`build_multi_exit_resnet`) of square images.

    With ``seed``, Keras's random seed is set first, so the weights are the
    same every time. Call it inside a strategy's scope to build it there.
    """
    import keras

    from selfkd_tf.models import build_multi_exit_resnet

    if seed is not None:
        keras.utils.set_random_seed(seed)
    return build_multi_exit_resnet(
        arch, num_classes, input_shape=(image_size, image_size, channels),
        num_stages=num_stages, exit_head=exit_head, width_multiplier=width_multiplier,
        sync_batchnorm=sync_batchnorm)


def tiny_model(num_classes: int, num_train_examples: int | None, image_size: int,
               num_stages: int = 2, sync_batchnorm: bool = False, seed: int | None = None,
               **model_kwargs):
    """`tiny_backbone` in a `SelfKDModel`; ``model_kwargs`` go to the model
    (``config``, ``weight_decay``, ``input_mean``, ...), which keeps its own
    defaults for the others."""
    from selfkd_tf.distillation.model import SelfKDModel

    backbone = tiny_backbone(num_classes, image_size, num_stages=num_stages,
                             sync_batchnorm=sync_batchnorm, seed=seed)
    return SelfKDModel(backbone, num_train_examples=num_train_examples, **model_kwargs)


# The model the serving tests export: untrained, with its normalisation.

SERVING_MEAN, SERVING_STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
SERVING_CLASSES = ("cat", "dog", "owl", "eel", "yak")


def serving_model(seed: int):
    """Three exits over 16x16 images of the 5 classes `SERVING_CLASSES`,
    normalised with `SERVING_MEAN` and `SERVING_STD`."""
    from selfkd_tf.distillation.config import SelfKDConfig

    return tiny_model(len(SERVING_CLASSES), 8, image_size=16, num_stages=3, seed=seed,
                      config=SelfKDConfig(), input_mean=SERVING_MEAN, input_std=SERVING_STD)


def serving_input(images: np.ndarray) -> np.ndarray:
    """Raw 0..255 pixels as `serving_model`'s input, as the data pipeline normalises."""
    return ((images.astype(np.float32) / 255 - np.float32(SERVING_MEAN))
            / np.float32(SERVING_STD))


# -- 4. Run directories and records ----------------------------------------------------


def snapshot(*directories) -> dict:
    """Every file and link under ``directories``, with its content or target:
    equal snapshots before and after prove that a refusal wrote nothing."""
    found = {}
    for directory in directories:
        for root, dirs, names in os.walk(directory):
            for name in dirs + names:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    found[path] = ("link", os.readlink(path))
                elif os.path.isfile(path):
                    with open(path, "rb") as f:
                        found[path] = f.read()
    return found


def metrics_record(split, exit_errors, *, nll=1.0, ensemble_error=None, num_examples=100,
                   dataset="cifar10"):
    """A metrics record in the schema training and ``selfkd-eval`` write:
    per-exit top-1 errors chosen by hand, other scores derived from them."""
    def scores(top1):
        return {"top1_err": top1, "top5_err": top1 / 4, "nll": nll, "ece": top1 / 10,
                "aurc": 2 * top1, "eaurc": top1}
    exits = [{"exit": i, **scores(e)} for i, e in enumerate(exit_errors, start=1)]
    ensemble = scores(exit_errors[-1] if ensemble_error is None else ensemble_error)
    return {
        "dataset": dataset, "split": split, "num_examples": num_examples,
        "arch": "resnet18", "methods": [], "num_exits": len(exits),
        "train_time_s": None, "train_time_per_epoch_s": None, "epochs": 2,
        "params": 1000, "exits": exits, "ensemble": ensemble,
        "reliability": {"edges": [0.0, 0.5, 1.0], "confidence": [0.3, 0.8],
                        "accuracy": [0.25, 0.75], "count": [40, 60]},
    }


def tensorboard_scalars(log_dir):
    """``{tag: {step: value}}`` of the scalars under ``log_dir``."""
    import tensorflow as tf

    scalars = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                          recursive=True):
        run = os.path.basename(os.path.dirname(path))
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(f"{run}/{value.tag}", {})[event.step] = float(
                    tf.make_ndarray(value.tensor))
    return scalars


# -- 5. Clusters of local worker processes ----------------------------------------------
#
# Each worker is a subprocess with its own ``TF_CONFIG``; every wait is
# bounded, and a child that overruns it is killed with the others.

CHILD_TIMEOUT_S = 300


def tf_config(cluster: list[str], index: int) -> dict[str, str]:
    """The environment that makes a process worker ``index`` of ``cluster``."""
    return {"TF_CONFIG": json.dumps({
        "cluster": {"worker": cluster}, "task": {"type": "worker", "index": index},
    })}


def wait_all(processes: list[subprocess.Popen], timeout: float = CHILD_TIMEOUT_S) -> list[str]:
    """Every child's output (stdout and stderr merged); kills all on overrun."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(
                timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.communicate()
        pytest.fail(f"a child process ran longer than {timeout} s")
    return outputs


def run_once(tmp_path_factory, name: str, produce) -> pathlib.Path:
    """``produce(folder)`` run once per test session, also under pytest-xdist.

    Each pytest-xdist worker sets up session fixtures on its own; the
    session's shared folder and a lock let the first one produce the result
    and the others read it. Returns the folder.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            produce(folder)
            (folder / "done").touch()
    return folder


def latest_checkpoint_number(checkpoint_dir) -> int | None:
    """The number of the latest checkpoint in ``checkpoint_dir``, or `None`."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(checkpoint_dir))
    return None if path is None else int(path.rsplit("-", 1)[1])


def kill_at_checkpoint(victim: subprocess.Popen, checkpoint_dir, wanted,
                       timeout: float = CHILD_TIMEOUT_S) -> int:
    """SIGKILLs ``victim`` once its latest checkpoint number satisfies ``wanted``.

    Once a candidate shows up the victim is frozen (SIGSTOP) and the number
    read again, so the checkpoint reported is the last one it wrote.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert victim.poll() is None, "the worker ended before it could be killed"
        if wanted(latest_checkpoint_number(checkpoint_dir)):
            victim.send_signal(signal.SIGSTOP)
            number = latest_checkpoint_number(checkpoint_dir)
            if wanted(number):
                victim.kill()
                victim.wait()
                return number
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    victim.kill()
    raise AssertionError("the wanted checkpoint never appeared")


# -- 6. Step recording ----------------------------------------------------------------


def _step_recorder_class():
    import keras

    class StepRecorder(keras.callbacks.Callback):
        """Every step's own logs, and the PS-KD table after every epoch's refresh.

        Keras logs running means over the epoch; resetting the metrics before
        every step makes each logged value that step's alone.
        """

        def __init__(self):
            super().__init__()
            self.keys, self.logs, self.tables, self.valid = [], [], [], []

        def on_train_batch_begin(self, batch, logs=None):
            for metric in self.model.metrics:
                metric.reset_state()

        def on_train_batch_end(self, batch, logs=None):
            self.keys = sorted(logs)
            self.logs.append([float(logs[k]) for k in self.keys])

        def on_epoch_end(self, epoch, logs=None):
            # SelfKDModel.fit runs the table refresh before any other callback.
            self.tables.append(self.model.soft_target_table.numpy())
            self.valid.append(self.model.soft_target_valid.numpy())

        def column(self, key: str) -> np.ndarray:
            """Every step's value of the logged ``key``."""
            return np.array([row[self.keys.index(key)] for row in self.logs])

    StepRecorder.__module__, StepRecorder.__qualname__ = __name__, "StepRecorder"
    return StepRecorder


def __getattr__(name):
    # `StepRecorder` subclasses a Keras callback: it is defined when first
    # imported, so that importing this module does not import Keras.
    if name == "StepRecorder":
        globals()[name] = recorder = _step_recorder_class()
        return recorder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
