"""`import selfkd_tf` makes saved models loadable, and stays free of TensorFlow."""

import ast
import subprocess
import sys

import keras
import numpy as np
import pytest

from selfkd_tf import registration
from selfkd_tf.distillation.config import SelfKDConfig
from support import REPO, environment, tiny_model


def _registered_classes() -> dict[str, list[str]]:
    """``{module: [class, ...]}`` of every class the package's sources decorate
    with ``register_keras_serializable``."""
    found = {}
    for path in sorted((REPO / "selfkd_tf").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    "register_keras_serializable" in ast.unparse(d)
                    for d in node.decorator_list):
                module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                found.setdefault(module, []).append(node.name)
    return found


def test_every_module_with_serialisable_classes_is_registered_on_import():
    found = _registered_classes()
    assert "SelfKDModel" in found["selfkd_tf.distillation.model"]
    for module in found:
        assert any(module == name or module.startswith(name + ".")
                   for name in registration.SERIALIZABLE_MODULES), module


# The orders a user may import in: Keras first, then the package; the
# package, then Keras (which imports TensorFlow part-way); the package, then
# TensorFlow (which imports Keras part-way).
IMPORTS = {
    "keras first": "import keras, selfkd_tf",
    "package, then keras": "import selfkd_tf, keras",
    "package, then tensorflow": "import selfkd_tf, tensorflow, keras",
    # A module of the package that imports Keras half-way through its own
    # code: registering then would import it again, half-initialised.
    "callbacks module first": "import selfkd_tf.experiment.callbacks, keras",
    "multiworker module first": "import selfkd_tf.distribution.multiworker, keras",
}


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")
def test_import_selfkd_tf_then_load_model(tmp_path):
    model = tiny_model(3, 4, image_size=8, config=SelfKDConfig(methods=("pskd",)))
    images = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(images)["logits"][-1])
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", expected)
    classes = [f"selfkd_tf>{name}" for names in _registered_classes().values()
               for name in names]
    check = (
        "import numpy as np, sys\n"
        f"model = keras.saving.load_model({str(tmp_path / 'model.keras')!r})\n"
        "assert type(model).__name__ == 'SelfKDModel', type(model)\n"
        f"images = np.load({str(tmp_path / 'images.npy')!r})\n"
        f"expected = np.load({str(tmp_path / 'expected.npy')!r})\n"
        "actual = keras.ops.convert_to_numpy(model(images)['logits'][-1])\n"
        "np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)\n"
        f"missing = [c for c in {classes!r} if keras.saving.get_registered_object(c) is None]\n"
        "assert not missing, missing\n"
    )
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"{imports}\n{check}"], cwd=REPO, env=environment(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)
        for name, imports in IMPORTS.items()
    }
    for name, process in processes.items():
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {err[-3000:]}"


def test_importing_the_package_loads_neither_keras_nor_tensorflow():
    code = ("import sys, selfkd_tf; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
