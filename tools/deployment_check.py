r"""Which deployment clients take which export: converted, run and compared.

Exports a trained model's deepest exit, its ensemble and its early-exit
cascade (``selfkd_tf.serving.saved_model``), and for each one tries the
clients users reach for, each in a process of its own (a converter or
interpreter that aborts the process is a finding, not the end of the tool):

- ``saved_model``: ``tf.saved_model.load`` (what TF Serving runs), the
  reference every other client is compared with;
- ``saved_model_cli``: ``saved_model_cli show`` lists the signature and its
  input ``pixels_0_to_255``;
- ``tflite``: ``tf.lite.TFLiteConverter`` on ``serving_default`` (TFLite's
  built-in ops, then with TensorFlow's ops as well), run by
  ``tf.lite.Interpreter``;
- ``onnx``: ``python -m tf2onnx.convert`` (opset 17), run by
  ``onnxruntime``, when both are installed (``pip install tf2onnx
  onnxruntime``; not dependencies of selfkd_tf).

Each check answers the same random 0..255 images, a batch of 5 and an empty
batch; the JSON report gives, per export and client, ``ok`` with the largest
difference from the SavedModel's probabilities, or the failure's last line.

    python tools/deployment_check.py --model=runs/quickstart --out_json=deployment.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

import tool_io  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402

EXPORTS = {"deepest": {}, "ensemble": {}, "cascade": {"threshold": 0.5}}
CLIENTS = ("saved_model", "saved_model_cli", "tflite", "onnx")

flags.DEFINE_string("model", None, "A run directory or a .keras file.")
flags.DEFINE_string("out_json", None, "Where the report goes.")
flags.DEFINE_string("check", None, "Internal: run one check in this process "
                    "(EXPORT_DIR:CLIENT) and print its JSON answer.")
FLAGS = flags.FLAGS


def _images(path: str):
    import numpy as np
    import tensorflow as tf

    served = tf.saved_model.load(path)
    spec = served.signatures["serving_default"].structured_input_signature[1]
    shape = spec["pixels_0_to_255"].shape[1:]
    images = np.random.default_rng(0).integers(0, 256, (5, *shape)).astype("float32")
    reference = served.serve(tf.constant(images))["probabilities"].numpy()
    return images, np.zeros((0, *shape), "float32"), reference


def _check(path: str, client: str) -> dict:
    """One client on one export; runs in its own process."""
    import tensorflow as tf

    images, empty, reference = _images(path)
    if client == "saved_model":
        served = tf.saved_model.load(path)
        answers = [served.serve(tf.constant(x))["probabilities"].numpy() for x in (images, empty)]
    elif client == "saved_model_cli":
        shown = subprocess.run(
            [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
             "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default"],
            capture_output=True, text=True, check=True)
        line = next(line for line in shown.stdout.splitlines() if "inputs[" in line)
        return {"ok": True, "input": line.strip()}
    elif client == "tflite":
        answers, ops = None, None
        for ops in (None, [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]):
            converter = tf.lite.TFLiteConverter.from_saved_model(
                path, signature_keys=["serving_default"])
            if ops:
                converter.target_spec.supported_ops = ops
            try:
                runner = tf.lite.Interpreter(
                    model_content=converter.convert()).get_signature_runner()
                break
            except Exception:  # noqa: BLE001 - retried with TensorFlow's ops
                if ops:
                    raise
        answers = [runner(pixels_0_to_255=x)["probabilities"] for x in (images, empty)]
        return _compared(answers, reference, "builtins" if ops is None else "builtins+tf ops")
    else:
        import onnxruntime

        onnx_file = os.path.join(os.path.dirname(path), f"{os.path.basename(path)}.onnx")
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", path,
                        "--signature_def", "serving_default", "--opset", "17",
                        "--output", onnx_file], capture_output=True, text=True, check=True)
        session = onnxruntime.InferenceSession(onnx_file)
        names = [o.name for o in session.get_outputs()]
        answers = [session.run(None, {"pixels_0_to_255": x})[names.index("probabilities")]
                   for x in (images, empty)]
    return _compared(answers, reference)


def _compared(answers, reference, ops: str | None = None) -> dict:
    import numpy as np

    answer, empty = answers
    result = {"ok": True, "max_difference": float(np.abs(answer - reference).max()),
              "empty_batch": list(np.shape(empty))}
    return {**result, "ops": ops} if ops else result


def _run_check(path: str, client: str) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, f"--check={path}:{client}"], capture_output=True,
        text=True, timeout=1800)
    if child.returncode == 0:
        return json.loads(child.stdout.strip().splitlines()[-1])
    if child.returncode < 0:
        return {"ok": False, "error": f"the process died (signal {-child.returncode})"}
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {child.returncode}"
    return {"ok": False, "error": reason[:300]}


def main(argv: list[str]) -> int:
    del argv
    if FLAGS.check:
        path, client = FLAGS.check.rsplit(":", 1)
        print(json.dumps(_check(path, client)))
        return 0
    if not FLAGS.model or not FLAGS.out_json:
        program.fail("deployment_check.py", "--model and --out_json are required")
    tool_io.check_output_file("out_json", FLAGS.out_json)
    import selfkd_tf as skd

    model = skd.load_trained_model(FLAGS.model).model
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        for exit, kwargs in EXPORTS.items():  # noqa: A001
            path = os.path.join(folder, exit)
            skd.export_saved_model(model, path, exit=exit, **kwargs)
            report[exit] = {client: _run_check(path, client) for client in CLIENTS}
    for exit, clients in report.items():  # noqa: A001
        for client, result in clients.items():
            detail = (f"max diff {result['max_difference']:.2g}" if "max_difference" in result
                      else result.get("input", result.get("error", "")))
            print(f"{exit:<9} {client:<16} {'ok' if result['ok'] else 'FAILS':<6} {detail}")
    tool_io.write_json(FLAGS.out_json, report)
    return 0


if __name__ == "__main__":
    program.run(main, "deployment_check.py")
