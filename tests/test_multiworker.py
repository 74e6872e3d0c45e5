"""Multi-worker training: the Keras trainer workaround, TF_CONFIG and the CLI.

The cluster tests run ``selfkd-train`` as two worker processes on 127.0.0.1
(free ports, one ``TF_CONFIG`` each, a private ``TMPDIR`` and working
directory each, bounded waits). `tests/test_distribution_strategies.py`
checks that two workers train as one process.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras.src.backend.tensorflow import trainer as keras_trainer

from selfkd_tf.experiment import checkpointing
from selfkd_tf.distribution import cluster
from selfkd_tf.distribution import multiworker
from selfkd_tf.distribution.strategy import make_strategy
from selfkd_tf.experiment.trained import load_trained_model
from selfkd_tf.rundir.layout import RUN_FILES
from support import (
    CHILD_TIMEOUT_S,
    CONFIGS,
    REPO,
    command,
    environment,
    kill_at_checkpoint,
    last_line,
    run_cli,
    run_once,
    tf_config,
    write_learnable_npz,
)

STEPS_PER_EPOCH = 4  # 53 training examples in global batches of 16: the last holds 5
# PS-KD alone (its table is part of what a resume must restore) and
# synchronized batch norm keep the traced step small.
TRAIN_FLAGS = (
    f"--flagfile={CONFIGS / 'smoke.flags'}", "--image_size=8", "--train_examples=53",
    "--eval_examples=21", "--batch_size=16", "--epochs=2", "--methods=pskd",
    "--sync_batchnorm", "--deterministic", "--save_every_steps=1",
    "--distribute=multiworker",
)
# Bounds the wait for a survivor: TensorFlow notices a dead peer at once on
# one host (connection reset) and by missed heartbeats (about 10 s) otherwise.
SURVIVOR_TIMEOUT_S = 120


# -- finding the defects --------------------------------------------------------


def test_installed_keras_takes_the_workaround_path():
    # Keras 3.15.1 still has both defects (keras-team/keras#20585 is open), so
    # MultiWorkerTrainer routes around both. When an upgrade makes this fail,
    # Keras changed that code: run the two-worker tests, which then exercise
    # Keras's own path, and update docs/multiworker.md.
    assert multiworker.keras_multiworker_defects() == {
        multiworker.DEFECT_BATCH_REDUCE, multiworker.DEFECT_SCALAR_LOGS,
    }, f"Keras {keras.version()}"


def _symbolic_build_reducing_each_value(self, iterator=None, data_batch=None):
    """`_maybe_symbolic_build` as a fixed Keras could write it."""
    for _, _, batches in iterator:
        data_batch = keras.tree.map_structure(
            lambda v: self.distribute_strategy.reduce("MEAN", v, axis=None), next(batches))
        break
    self._symbolic_build(data_batch=data_batch)


def _reduce_scalars_without_axis(values, strategy, reduction):
    """``reduce_per_replica`` as a fixed Keras could write it."""
    return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)


def test_detection_follows_what_keras_does(monkeypatch):
    detect = multiworker.keras_multiworker_defects.__wrapped__  # uncached
    monkeypatch.setattr(keras_trainer, "reduce_per_replica", _reduce_scalars_without_axis)
    assert detect() == {multiworker.DEFECT_BATCH_REDUCE}
    monkeypatch.setattr(keras_trainer.TensorFlowTrainer, "_maybe_symbolic_build",
                        _symbolic_build_reducing_each_value)
    assert detect() == set()
    monkeypatch.undo()
    assert detect() == {multiworker.DEFECT_BATCH_REDUCE, multiworker.DEFECT_SCALAR_LOGS}


def test_detection_that_cannot_run_warns_and_leaves_keras_alone(monkeypatch):
    monkeypatch.delattr(keras_trainer, "reduce_per_replica")
    with pytest.warns(RuntimeWarning, match="scalar_logs.*assuming it is fixed"):
        defects = multiworker.keras_multiworker_defects.__wrapped__()
    assert defects == {multiworker.DEFECT_BATCH_REDUCE}


_UNTOUCHED = textwrap.dedent("""
    import json
    import keras, numpy as np
    from keras.src.backend.tensorflow import trainer

    def keras_functions():
        return {name: id(value) for name, value in [
            ("reduce_per_replica", trainer.reduce_per_replica),
            *vars(trainer.TensorFlowTrainer).items(), *vars(keras.Model).items()]}

    def plain_fit():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        x = np.arange(24, dtype="float32").reshape(8, 3) / 24
        model.fit(x, x[:, :2], batch_size=4, epochs=2, verbose=0)
        return [w.tolist() for w in model.get_weights()]

    before, weights_before = keras_functions(), plain_fit()
    import selfkd_tf
    from selfkd_tf.distribution.multiworker import keras_multiworker_defects
    keras_multiworker_defects()
    inputs = keras.Input((4,))
    feature = keras.layers.Dense(8)(inputs)
    backbone = keras.Model(inputs, {"logits": [keras.layers.Dense(3)(feature)],
                                    "features": [feature]})
    model = selfkd_tf.SelfKDModel(backbone, config=selfkd_tf.SelfKDConfig(methods=()))
    model.compile(optimizer="sgd")
    model.fit(np.ones((8, 4), "float32"), np.zeros(8, "int32"), verbose=0)
    print(json.dumps({"same_functions": keras_functions() == before,
                      "same_weights": plain_fit() == weights_before}))
""")


def test_plain_keras_models_are_untouched():
    # In a fresh process: Keras's trainer functions are the same objects, and
    # a plain Sequential fit gives bitwise the same weights, before and after
    # selfkd_tf is imported, probes Keras and trains a SelfKDModel.
    result = subprocess.run([sys.executable, "-c", _UNTOUCHED], env=environment(),
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(last_line(result.stdout)) == {
        "same_functions": True, "same_weights": True}


# -- TF_CONFIG ----------------------------------------------------------------


def _config(cluster_spec=None, task=None, **extra) -> str:
    return json.dumps({
        "cluster": {"worker": ["h1:2222", "h2:2222"]} if cluster_spec is None else cluster_spec,
        "task": {"type": "worker", "index": 1} if task is None else task, **extra})


@pytest.mark.parametrize("text, problem", [
    ("", "not valid JSON"),
    ("{'cluster': {}}", "not valid JSON"),
    ("[1, 2]", "must be a JSON object; got list"),
    (_config(tasks={}), r"unknown keys \['tasks'\]"),
    (_config(cluster_spec={}), "'cluster' must map job names"),
    (_config(cluster_spec={"worker": ["h1:1"], "ps": ["h2:1"]}), r"jobs \['ps'\] are not supported"),
    (_config(cluster_spec={"worker": []}), "cluster.worker must be a non-empty list"),
    (_config(cluster_spec={"worker": "h1:2222"}), "cluster.worker must be a non-empty list"),
    (_config(cluster_spec={"worker": ["h1:2222", "h2"]}), r"cluster.worker\[1\] is 'h2'"),
    (_config(cluster_spec={"worker": ["h1:2222", "h2:99999"]}), "port in 1..65535"),
    (_config(cluster_spec={"worker": ["h1:2222", 7]}), r"cluster.worker\[1\] is 7"),
    (_config(cluster_spec={"worker": ["h1:2222", "h1:2222"]}), "listed more than once: h1:2222"),
    (_config(cluster_spec={"chief": ["h0:1", "h3:1"], "worker": ["h1:1"]}),
     "cluster.chief lists 2 tasks"),
    (_config(task={"type": "worker"}), "'task' must be"),
    (_config(task="worker:0"), "'task' must be"),
    (_config(task={"type": "chief", "index": 0}), "task.type is 'chief', not a job"),
    (_config(task={"type": ["worker"], "index": 0}), r"task.type is \['worker'\], not a job"),
    (_config(task={"type": "worker", "index": 2}), r"task.index is 2; allowed: 0..1"),
    (_config(task={"type": "worker", "index": -1}), "task.index is -1"),
    (_config(task={"type": "worker", "index": "1"}), "task.index is '1'"),
    (_config(task={"type": "worker", "index": True}), "task.index is True"),
    (_config(rpc_layer=1), "rpc_layer must be a string"),
])
def test_bad_tf_config_is_one_line_naming_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        cluster.parse_tf_config(text)
    assert str(caught.value).startswith("TF_CONFIG: ")
    assert "\n" not in str(caught.value)


def test_good_tf_configs_are_accepted():
    assert cluster.parse_tf_config(_config())["task"] == {"type": "worker", "index": 1}
    with_chief = cluster.parse_tf_config(_config(
        cluster_spec={"chief": ["[::1]:2222"], "worker": ["h1:2222"]},
        task={"type": "chief", "index": 0}, rpc_layer="grpc", environment="cloud"))
    assert with_chief["cluster"]["chief"] == ["[::1]:2222"]


def test_multiworker_strategy_needs_a_good_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG: not set"):
        make_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", _config(task={"type": "worker", "index": 5}))
    with pytest.raises(ValueError, match="TF_CONFIG: task.index is 5"):
        make_strategy("multiworker")


def test_cli_refuses_a_bad_tf_config_in_one_line(tmp_path):
    dataset = write_learnable_npz(tmp_path / "data.npz", n_train=53, n_test=21, size=8)
    run_dir = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        cases = [
            ('{"cluster": {"worker": ',
             "TF_CONFIG: not valid JSON (Expecting value: line 1 column 24 (char 23))"),
            (json.dumps({"cluster": {"worker": [address, *cluster.local_addresses(1)]},
                         "task": {"type": "worker", "index": 0}}),
             f"TF_CONFIG: cannot start worker 0 at {address} (Could not start gRPC "
             f"server); is port {address.split(':')[1]} free on this machine?"),
        ]
        for text, message in cases:
            result = subprocess.run(
                command("selfkd_tf.cli.train", *TRAIN_FLAGS, f"--dataset={dataset}",
                        f"--model_dir={run_dir}"),
                cwd=REPO, env={**environment(), "TF_CONFIG": text},
                capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
            assert result.returncode == 2, result.stderr[-3000:]
            # TensorFlow's gRPC layer may log its own E0000 lines first.
            assert "Traceback" not in result.stderr
            assert last_line(result.stderr) == f"selfkd-train: error: {message}"
            assert not run_dir.exists()


# -- two selfkd-train workers ------------------------------------------------------


def _start_workers(folder, dataset: str, model_dirs: list, extras=None) -> list[subprocess.Popen]:
    """One ``selfkd-train`` worker per entry of ``model_dirs`` (its --model_dir).

    Worker ``i`` gets the flags ``extras[i]`` too, and runs in its own empty
    working directory ``folder/cwd<i>`` with its own ``TMPDIR``
    ``folder/tmp<i>``, so anything it writes outside the run directory shows.
    """
    addresses = cluster.local_addresses(len(model_dirs))
    processes = []
    for index, model_dir in enumerate(model_dirs):
        for name in (f"cwd{index}", f"tmp{index}"):
            (folder / name).mkdir(exist_ok=True)
        processes.append(subprocess.Popen(
            command("selfkd_tf.cli.train", *TRAIN_FLAGS, f"--dataset={dataset}",
                    f"--model_dir={model_dir}", *(extras[index] if extras else ())),
            cwd=folder / f"cwd{index}", stdin=subprocess.DEVNULL,
            env={**environment(), **tf_config(addresses, index),
                 "TMPDIR": str(folder / f"tmp{index}")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def _outputs(processes: list[subprocess.Popen], timeout=CHILD_TIMEOUT_S) -> list[tuple[str, str]]:
    """``(stdout, stderr)`` of every worker; kills them all if one overruns."""
    try:
        return [p.communicate(timeout=timeout) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
            p.communicate()
        pytest.fail(f"a worker ran longer than {timeout} s")


@pytest.fixture(scope="session")
def trained_cluster(tmp_path_factory):
    """A finished two-worker ``selfkd-train`` run, uninterrupted."""

    def produce(folder):
        dataset = write_learnable_npz(folder / "data.npz", n_train=53, n_test=21, size=8)
        processes = _start_workers(folder, dataset, [folder / "run"] * 2)
        outputs = _outputs(processes)
        for index, (out, err) in enumerate(outputs):
            (folder / f"worker{index}.out").write_text(out)
            (folder / f"worker{index}.err").write_text(err)
        assert [p.returncode for p in processes] == [0, 0], "\n".join(
            e[-3000:] for _, e in outputs)

    return run_once(tmp_path_factory, "trained_cluster", produce)


def test_only_the_chief_writes_and_eval_reproduces_its_metrics(trained_cluster, tmp_path):
    run_dir = trained_cluster / "run"
    assert {p.name for p in run_dir.iterdir()} == set(RUN_FILES)
    with open(run_dir / "history.csv") as f:
        assert len(f.read().splitlines()) == 1 + 2  # a header and one row per epoch
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    # Worker 1 wrote into a temporary folder that is gone; nothing else was
    # written anywhere by either worker.
    for name in ("cwd0", "cwd1", "tmp0", "tmp1"):
        assert not any((trained_cluster / name).iterdir()), name
    # Both trained the whole run (each prints the metrics of its model).
    for index in range(2):
        assert "ensemble" in (trained_cluster / f"worker{index}.out").read_text()

    out = tmp_path / "eval.json"
    result = run_cli("selfkd_tf.cli.evaluate", f"--model={run_dir}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((run_dir / "metrics.json").read_text())
    evaluated = json.loads(out.read_text())
    assert len(evaluated["exits"]) == len(trained["exits"]) == 2
    for a, b in zip([*trained["exits"], trained["ensemble"]],
                    [*evaluated["exits"], evaluated["ensemble"]]):
        for key in ("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def _is_mid_epoch_2(number) -> bool:
    return number is not None and number > STEPS_PER_EPOCH and number % STEPS_PER_EPOCH


def test_killed_worker_stops_the_cluster_and_rerun_resumes(trained_cluster, tmp_path):
    dataset = f"npz:{trained_cluster / 'data.npz'}"
    run_dir = tmp_path / "run"
    chief, survivor = _start_workers(tmp_path, dataset, [run_dir] * 2)
    try:
        number = kill_at_checkpoint(chief, run_dir / "checkpoints", _is_mid_epoch_2)
        _, err = survivor.communicate(timeout=SURVIVOR_TIMEOUT_S)
    finally:
        for process in (chief, survivor):
            process.kill()
            process.communicate()
    # The survivor stopped by itself, with one line and the "retry" status.
    assert survivor.returncode == cluster.LOST_WORKER_EXIT, err[-3000:]
    assert "Traceback" not in err
    assert re.fullmatch(
        r"selfkd-train: error: lost contact with /job:worker/replica:0/task:0 \(.+\); "
        r"rerun every worker with the same command to resume from the last checkpoint",
        last_line(err)), last_line(err)
    assert not any((tmp_path / "tmp1").iterdir())
    epoch, step = divmod(number, STEPS_PER_EPOCH)
    position = checkpointing.read_position(str(run_dir / "checkpoints"))
    assert (position.epoch, position.step) == (epoch, step)
    assert not (run_dir / "model.keras").exists()

    processes = _start_workers(tmp_path, dataset, [run_dir] * 2)
    outputs = _outputs(processes)
    assert [p.returncode for p in processes] == [0, 0], "\n".join(e[-3000:] for _, e in outputs)
    for out, _ in outputs:
        assert f"Resuming {run_dir} at epoch {epoch + 1}, step {step} of 4." in out

    # The same epochs, logged once each with the same values, and the same
    # final weights, PS-KD table and a_t as the uninterrupted run.
    def history(path):
        with open(path / "history.csv") as f:
            rows = [line.split(",") for line in f.read().splitlines()]
        return [dict(zip(rows[0], row)) for row in rows[1:]]

    reference = trained_cluster / "run"
    assert [r["epoch"] for r in history(run_dir)] == [r["epoch"] for r in history(reference)]
    assert len(history(run_dir)) == 2
    for a, b in zip(history(reference), history(run_dir)):
        for key in ("loss", "ce", "alpha_t", "val_loss", "val_exit2_accuracy"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6), key
    a = load_trained_model(str(reference)).model
    b = load_trained_model(str(run_dir)).model
    np.testing.assert_array_equal(b.soft_target_valid.numpy(), np.ones(53))
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wb.numpy(), wa.numpy(), err_msg=wa.path)


def test_workers_that_disagree_refuse_to_start(trained_cluster, tmp_path):
    dataset = f"npz:{trained_cluster / 'data.npz'}"
    # A worker that cannot see the chief's run directory would start afresh
    # while the chief resumes after 2 epochs.
    chief_dir = tmp_path / "chief"
    shutil.copytree(trained_cluster / "run", chief_dir)
    for name in ("model.keras", "metrics.json"):
        (chief_dir / name).unlink()
    cases = [
        ([chief_dir, tmp_path / "elsewhere"], None,
         "selfkd-train: error: the chief resumes after 2 epochs and 0 steps, another "
         "worker after 0 epochs and 0 steps; every worker must see the chief's "
         "--model_dir (a filesystem they share)"),
        # A worker started with another learning rate.
        ([tmp_path / "a", tmp_path / "a"], [(), ("--lr=0.1",)],
         "selfkd-train: error: the workers were started with different settings; "
         "run the same command (the same flags and --dataset) on every worker"),
    ]
    for model_dirs, extras, message in cases:
        processes = _start_workers(tmp_path, dataset, model_dirs, extras)
        outputs = _outputs(processes)
        assert [p.returncode for p in processes] == [2, 2], outputs
        assert [last_line(err) for _, err in outputs] == [message] * 2
        assert not (tmp_path / "a").exists()
