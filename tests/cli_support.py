"""Tiny datasets on disk and command-line runs for the CLI, resume and export tests."""

import os
import pathlib
import subprocess
import sys

import numpy as np

from synthetic import learnable_arrays

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
NUM_CLASSES = 4


def write_npz(path, n_train: int = 64, n_test: int = 32, size: int = 16) -> str:
    """An ``npz:`` dataset of learnable 16x16 uint8 images; returns its flag value."""
    images, labels = learnable_arrays(n_train + n_test, NUM_CLASSES, size=size)
    pixels = np.clip((images + 1.5) / 3 * 255, 0, 255).astype(np.uint8)
    np.savez(path, x_train=pixels[:n_train], y_train=labels[:n_train],
             x_test=pixels[n_train:], y_test=labels[n_train:])
    return f"npz:{path}"


def environment() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def command(module: str, *args: str) -> list[str]:
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
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
