"""No layer shape of the networks may abort the process in a CPU kernel.

TensorFlow's CPU convolution kernels (oneDNN, on by default on many x86
CPUs and with ``TF_ENABLE_ONEDNN_OPTS=1``) have shape-specific defects that
abort the process ("double free or corruption") rather than raise, and
only some of the time; a strided 1x1 convolution with few input channels
and an odd last batch was reported to. Every strided layer of every
architecture and exit head at the narrowest width is therefore run, at
several batch sizes (1, odd and even remainders, full) and image sizes, in
separate processes, twice, with oneDNN on and with the default kernels. The
reported command (37 images at batch 16) runs as well.
"""

import json
import subprocess
import sys

import keras
import numpy as np

from selfkd_tf.models import ARCHITECTURES, EXIT_HEADS
from support import REPO, environment, last_line, tiny_backbone

REPEATS = 2
"""Runs of every layer at every size, per kernel setting."""


def strided_layers() -> list[dict]:
    """Every distinct strided convolution of every network, with its input shape."""
    found = {}
    for arch in ARCHITECTURES:
        for head in EXIT_HEADS:
            model = tiny_backbone(10, image_size=8, num_stages=4, exit_head=head, arch=arch)
            for layer in model.layers:
                if not isinstance(
                        layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
                    continue
                if layer.strides == (1, 1):
                    continue
                config = keras.layers.serialize(layer)
                config["config"].pop("name")
                shape = list(layer.input.shape[1:])
                names = {other.name for other in model.layers}
                pad = (model.get_layer(f"{layer.name}_pad").padding[0][0]
                       if f"{layer.name}_pad" in names else 0)
                key = json.dumps([config, shape], sort_keys=True, default=str)
                found.setdefault(key, {"layer": config, "input_shape": shape,
                                       "padding": pad,
                                       "where": f"{arch}/{head}:{layer.name}"})
    return list(found.values())


def test_every_strided_layer_runs_at_every_batch_and_image_size(tmp_path):
    layers = strided_layers()
    kinds = {(entry["layer"]["class_name"], entry["layer"]["module"]) for entry in layers}
    # selfkd_tf's Conv2D (shortcuts, 3x3 and grouped 3x3 convolutions),
    # its DepthwiseConv2D (attention heads) and PatchConv2D (bottleneck
    # heads).
    assert len(kinds) == 3 and len(layers) > 20, kinds
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(layers, default=str))
    command = [sys.executable, str(REPO / "tests" / "kernel_crash_child.py"), str(path),
               str(REPEATS)]
    # One process per kernel setting, side by side.
    settings = [{}, {"TF_ENABLE_ONEDNN_OPTS": "1"}]
    processes = [
        subprocess.Popen(command, cwd=REPO, env={**environment(), **extra},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, stdin=subprocess.DEVNULL)
        for extra in settings
    ]
    for extra, process in zip(settings, processes):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, (
            f"{extra or 'default kernels'}: exit {process.returncode} while "
            f"running {last_line(out)}\n{err[-2000:]}")
        assert last_line(out) == f"ran {len(layers)} layers {REPEATS} times"


def test_an_odd_last_batch_trains(tmp_path):
    # 37 images at batch 16: a last batch of 5 through the stage shortcuts
    # of width 4 and 8, with oneDNN's kernels.
    rng = np.random.default_rng(0)
    data = tmp_path / "odd.npz"
    np.savez(data, x_train=rng.integers(0, 256, (37, 16, 16, 3), np.uint8),
             y_train=rng.integers(0, 4, 37),
             x_test=rng.integers(0, 256, (16, 16, 16, 3), np.uint8),
             y_test=rng.integers(0, 4, 16))
    result = subprocess.run(
        [sys.executable, "-m", "selfkd_tf.cli.train",
         f"--flagfile={REPO / 'configs' / 'smoke.flags'}", f"--dataset=npz:{data}",
         "--train_examples=37", "--batch_size=16", "--methods=",
         f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO, env={**environment(), "TF_ENABLE_ONEDNN_OPTS": "1"},
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
