"""`cifar10`, `cifar100`: CIFAR through TensorFlow Datasets (TFDS).

A copy prepared in `data_dir` (default: TFDS's, `~/tensorflow_datasets` or
`$TFDS_DATA_DIR`) is read offline. When there is none, TFDS downloads and
prepares one, after a quick check that the download host (or the HTTPS proxy
the environment names, as `requests` would use) accepts a connection within
`CONNECT_TIMEOUT_S` seconds: without a network the load fails at once with a
`DataError` naming the offline choices, instead of TFDS retrying for minutes.
Whatever a failed or interrupted download wrote into `data_dir` is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import urllib.parse
import urllib.request
from typing import Iterator

import numpy as np

from selfkd_tf.data.sources import registry
from selfkd_tf.data.sources.arrays import DataError, ImageArrays, first_line
from selfkd_tf.data.sources.arrays import image_arrays
from selfkd_tf.data.sources.cifar import PUBLISHED_STATS

__all__ = ["CONNECT_TIMEOUT_S", "DOWNLOAD_HOST"]

# Where TFDS's cifar10 and cifar100 builders download their archives from.
DOWNLOAD_HOST = "www.cs.toronto.edu"
_HTTPS_PORT = 443
CONNECT_TIMEOUT_S = 5.0
_OFFLINE_CHOICES = (
    "offline, use --data_dir=DIR holding a prepared TFDS copy, "
    "--dataset=cifar:PATH (the CIFAR python pickles), folder:PATH, npz:PATH, "
    "or the embedded --dataset=digits"
)


def _load(spec: registry.SourceSpec) -> ImageArrays:
    """Loads `cifar10`/`cifar100` with TFDS, downloading only when online."""
    # Imported here: it adds seconds to start-up and only this source needs it.
    import tensorflow_datasets as tfds

    name = spec.name
    try:
        builder = tfds.builder(name, data_dir=spec.data_dir)
        root = os.fspath(builder.data_dir_root)
        # is_prepared() warns about a variant folder that does not exist.
        if not (builder.data_path.exists() and builder.is_prepared()):
            unreachable = _unreachable(DOWNLOAD_HOST, _HTTPS_PORT)
            if unreachable:
                raise DataError(
                    f"TFDS dataset {name!r} is not prepared in {root} and "
                    f"cannot be downloaded: {unreachable}; {_OFFLINE_CHOICES}"
                )
            with _removed_on_failure(root, [name, "downloads"]):
                builder.download_and_prepare()
        splits = builder.as_dataset(split=["train", "test"], as_supervised=True)
        # Chunks rather than batch_size=-1, which relies on split sizes from
        # the metadata.
        (x_train, y_train), (x_test, y_test) = (
            [
                np.concatenate(part)
                for part in zip(*tfds.as_numpy(split.batch(10_000)))
            ]
            for split in splits
        )
        class_names = builder.info.features["label"].names
    except DataError:
        raise
    # TFDS fails in many ways (missing data, a broken download, ...), all
    # reported the same way.
    except Exception as err:
        raise DataError(
            f"cannot load TFDS dataset {name!r} (data_dir={spec.data_dir}): "
            f"{first_line(err)}; {_OFFLINE_CHOICES}"
        ) from None
    return image_arrays(
        f"TFDS {name}",
        x_train,
        y_train,
        x_test,
        y_test,
        class_names,
        PUBLISHED_STATS[len(class_names)],
    )


registry.register("cifar10")(_load)
registry.register("cifar100")(_load)


def _unreachable(host: str, port: int) -> str | None:
    """Why a TCP connection to `host:port` fails, or None when it succeeds.

    The connection goes to the HTTPS proxy of the environment instead
    (`https_proxy`, unless `no_proxy` exempts `host`), as the download
    would. Name resolution and connecting together take at most
    `CONNECT_TIMEOUT_S` seconds.
    """
    proxy = urllib.request.getproxies().get("https")
    target = f"{host}:{port}"
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(
            proxy if "://" in proxy else f"http://{proxy}"
        )
        host, port = parsed.hostname, parsed.port or 80
        target = f"the HTTPS proxy {host}:{port}"
    outcome = []

    def connect():
        try:
            # The join below times out first; this only ends the thread.
            socket.create_connection((host, port), CONNECT_TIMEOUT_S + 1).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{target} is unreachable ({first_line(err)})")

    # A daemon thread: name resolution has no timeout of its own, and an
    # abandoned lookup must not keep the process from exiting.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    if not outcome:
        return f"{target} gave no answer within {CONNECT_TIMEOUT_S:g} s"
    return outcome[0]


@contextlib.contextmanager
def _removed_on_failure(root: str, children: list[str]) -> Iterator[None]:
    """Removes what the body added to `root/<child>` if the body fails.

    Files and folders present before are kept; `root` itself, and any of its
    parents, are removed when the body created them.
    """
    new_top = None
    if not os.path.exists(root):
        new_top = root
        while not os.path.exists(os.path.dirname(new_top)):
            new_top = os.path.dirname(new_top)
    before = {
        path for child in children for path in _tree(os.path.join(root, child))
    }
    try:
        yield
    except BaseException:
        if new_top:
            shutil.rmtree(new_top, ignore_errors=True)
        else:
            for child in children:
                # Deepest first, so a new folder is empty when it is reached.
                for path in sorted(
                    _tree(os.path.join(root, child)) - before, reverse=True
                ):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    elif os.path.lexists(path):
                        os.remove(path)
        raise


def _tree(path: str) -> set[str]:
    """`path` and every file and folder below it, if it exists."""
    if not os.path.lexists(path):
        return set()
    found = {path}
    for folder, dirs, files in os.walk(path):
        found.update(os.path.join(folder, name) for name in dirs + files)
    return found
