"""``selfkd-train``: train (or resume) a multi-exit classifier with PS-KD, BYOT, DMFL.

Usage:

    selfkd-train --flagfile=configs/cifar100_resnet18.flags --methods=pskd,byot,dmfl
    selfkd-train --flagfile=configs/smoke.flags --dataset=npz:/data/tiny.npz --model_dir=/tmp/smoke

Every field of `selfkd_tf.experiment.settings.TrainSettings` is a flag
(``--helpshort`` lists them). The run directory (``--model_dir``) receives
``flags.json``, ``history.csv``, ``tensorboard/``, ``checkpoints/``,
``model.keras`` and ``metrics.json``. Rerunning the same command resumes a
killed run from its last checkpoint; while another process still trains the
run, it is refused (one line naming that process) and writes nothing.
``--train_examples`` and ``--eval_examples`` ask for at most so many
examples: a line says when a split holds fewer, and ``flags.json`` records
the number used. At the end the command prints the
scores, where the run's files are and the commands that use them
(``selfkd-eval``, ``selfkd-export``, ``selfkd-report``, ``tensorboard``).

Exit status: 0 on success; 2 for invalid flags or data, or a run directory
another process is training (one error line, nothing written); 1 when the
loss diverges (the last good checkpoint is kept); 75 when a multi-worker
cluster lost a worker (rerun every worker); 130 after Ctrl-C, 143 after
SIGTERM (one line says where; rerunning resumes).
"""

from __future__ import annotations

import os
import shlex

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages
from absl import flags  # noqa: E402

from selfkd_tf.distribution import cluster  # noqa: E402
from selfkd_tf.experiment import builders, training  # noqa: E402
from selfkd_tf.models import applications, multi_exit, stages  # noqa: E402
from selfkd_tf.cli import flags as train_flags  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402
from selfkd_tf.evaluation.scoring import format_metrics_table  # noqa: E402
from selfkd_tf.experiment.settings import as_settings_error  # noqa: E402
from selfkd_tf.rundir.layout import HISTORY_FILE, METRICS_FILE, MODEL_FILE, TENSORBOARD_DIR  # noqa: E402

PROGRAM = "selfkd-train"
flags.adopt_module_key_flags(train_flags)  # --helpshort lists them
LIST_STAGES = flags.DEFINE_bool(
    "list_stages", False,
    "Print where exits can attach to --arch at the data's image size (--image_size, "
    "or the dataset's), marking those --exits picks, and exit without training.")


def stage_listing(settings) -> str:
    """The stages of ``settings.arch`` for the run's images, as a table.

    Raises:
        SettingsError: the flags, the data or the backbone are refused.
    """
    settings.validate()
    _, _, info = builders.build_datasets(settings)
    shape = info.image_shape
    if applications.is_foreign(settings.arch):
        with as_settings_error():
            trunk = applications.build_foreign_backbone(settings.arch, shape)
            flat = stages.flatten(trunk, shape)
            chosen = {id(t) for t in stages.resolve_exits(
                flat, builders.parse_exits(settings.exits))}
        rows = [(id(t) in chosen, flat.reference_of(t), t.shape[1:])
                for t in stages.stage_tensors(flat) if t is not flat.output]
        rows.append((True, flat.reference_of(flat.output) + "  (the deepest exit)",
                     flat.output.shape[1:]))
    else:
        backbone = builders.build_backbone(settings, info.num_classes, shape)
        count = multi_exit.check_multi_exit(backbone)[0]
        rows = [(True, tensor._keras_history.operation.name, tensor.shape[1:])
                for tensor in (multi_exit.exit_stage(backbone, k) for k in range(1, count + 1))]
    lines = [f"Stages of {settings.arch} on {'x'.join(map(str, shape))} images "
             f"(* = an exit with --exits={settings.exits}):",
             f"  {'reference':<58} {'shape':<16} stride"]
    for picked, reference, tensor_shape in rows:
        # Features [B, D] have no resolution, so no stride.
        stride = f"{shape[0] / tensor_shape[0]:g}" if len(tensor_shape) == 3 else "-"
        lines.append(f"{'*' if picked else ' '} {reference:<58} "
                     f"{'x'.join(map(str, tensor_shape)):<16} {stride}")
    return "\n".join(lines)


def next_steps(run_dir: str) -> str:
    """Where a finished run's files are, and the commands that use them.

    ``run_dir`` is shown as given (relative paths stay relative, so the
    commands work from the directory training ran in).
    """
    def path(*names: str) -> str:
        return shlex.quote(os.path.join(run_dir, *names))

    return "\n".join([
        f"Run directory: {path()}",
        f"  model:    {path(MODEL_FILE)}",
        f"  metrics:  {path(METRICS_FILE)}",
        f"  history:  {path(HISTORY_FILE)}",
        "Next:",
        f"  selfkd-eval --model={path()}  # every exit on the whole evaluation split",
        f"  selfkd-export --model={path()} --out={path('export')}  # SavedModel of the deepest exit",
        f"  selfkd-report --runs={path()} --out={path('report')}  # tables and figures",
        f"  tensorboard --logdir={path(TENSORBOARD_DIR)}",
    ])


def main(argv: list[str]) -> int:
    del argv  # program.run rejects positional arguments
    settings = train_flags.settings_from_flags()
    if LIST_STAGES.value:
        print(stage_listing(settings))
        return 0
    try:
        record = training.train(settings)
    except training.TrainingDivergedError as err:
        program.fail(PROGRAM, err, status=1)
    except KeyboardInterrupt as err:
        print(flush=True)  # ends the progress bar's line
        # Checkpoints and run files are written whole, so a rerun resumes.
        program.fail(PROGRAM, err if isinstance(err, training.TrainingInterrupted)
                    else "interrupted; rerun the same command to resume",
                    status=program.interrupt_status())
    except cluster.WORKER_FAILURES as err:
        if settings.distribute != "multiworker":
            raise
        program.fail(PROGRAM, cluster.describe_worker_failure(err),
                    status=cluster.LOST_WORKER_EXIT)
    scored = record.get("num_examples")
    print(f"\n{record['dataset']} ({record['split']} split"
          f"{f', {scored} examples' if scored else ''}):")
    print(format_metrics_table(record))
    print()
    print(next_steps(settings.model_dir or settings.default_model_dir()))
    return 0


def run() -> None:
    program.run(main, PROGRAM)


if __name__ == "__main__":
    run()
