"""Snapshots of run directories, to prove that a refusal wrote nothing."""

import os


def snapshot(*directories) -> dict:
    """Every file and link under ``directories``, with its content or target."""
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
