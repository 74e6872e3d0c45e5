"""The accuracy/cost curve of an early-exit cascade, and picking its threshold.

`selfkd_tf.serving.cascade.EarlyExitCascade` answers each example at the first exit
whose top softmax probability reaches the threshold ``T``. Lowering ``T``
answers more examples early, which costs less and usually loses accuracy.
This module sweeps ``T`` on a labelled split:

- `early_exit_curve` computes, from every exit's probabilities, the
  cascade's accuracy, the fraction of examples answered at each exit and the
  mean FLOPs per image for each ``T``, next to every single exit served alone;
- `measure_latency` times the real cascade (and every single exit) on
  example images at batch 1 and 64;
- `select_threshold` picks the cheapest ``T`` that keeps a target accuracy
  at less cost than the deepest exit served alone;
- `plot_curve` draws accuracy against cost; `write_curve` stores JSON + PNG.

Costs are FLOPs per image from the layer shapes (`selfkd_tf.models.costs.ExitCosts`):
an example answered at exit ``k`` has run stages ``1..k`` and exit heads
``1..k``. The deepest exit served alone skips every shallow head, so the
cascade with ``T > 1`` costs more than it; ``flops_vs_deepest`` compares
every point with the deepest exit served alone.

Example:

```python
exit_probs, labels = skd.predict_exit_probabilities(model, val_ds)
costs = skd.exit_costs(model.backbone)
curve = early_exit_curve(exit_probs, labels, costs)
choice = select_threshold(curve, max_accuracy_drop=0.5)
choice["threshold"], choice["flops_vs_deepest"]     # e.g. 0.9, 0.55
```
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Sequence

import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from selfkd_tf.metrics.record import write_metrics_json
from selfkd_tf.models.costs import ExitCosts
from selfkd_tf.models.multi_exit import exit_model
from selfkd_tf.serving.cascade import EarlyExitCascade, check_threshold

# Dense where trained exits' confidences usually lie; 1.01 (above 1) never
# answers early, so the sweep ends at the deepest exit's accuracy.
DEFAULT_THRESHOLDS = (
    *np.round(np.arange(0.0, 0.95, 0.05), 2).tolist(),
    0.925, 0.95, 0.975, 0.99, 0.995, 0.999, 1.01,
)
LATENCY_BATCH_SIZES = (1, 64)


def first_confident_exit(confidences, threshold: float) -> np.ndarray:
    """The cascade's rule: the 1-based exit that answers each example.

    Args:
        confidences: ``[N, n]``, exit ``k``'s top softmax probability for
            each of ``n`` examples in row ``k - 1``.
        threshold: ``T``; exit ``k < N`` answers when its confidence is
            ``>= T``, the deepest exit answers the rest.

    Returns:
        int ``[n]`` in ``1..N``.

    Example:

    >>> first_confident_exit([[0.9, 0.2, 0.3], [0.95, 0.7, 0.4]], 0.6)
    array([1, 2, 2])
    """
    confidences = np.asarray(confidences)
    sure = confidences[:-1] >= threshold
    return np.where(sure.any(axis=0), sure.argmax(axis=0) + 1, len(confidences))


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """The thresholds sorted, without repeats; ValueError if one is not ``>= 0``."""
    values = sorted({check_threshold(t) for t in thresholds})
    if not values:
        raise ValueError("thresholds: give at least one")
    return values


def early_exit_curve(
    exit_probs: Sequence[np.ndarray],
    labels: np.ndarray,
    costs: ExitCosts,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    latency: dict | None = None,
) -> dict:
    """Accuracy and cost of the cascade for every threshold, and of every exit.

    Args:
        exit_probs: ``N`` arrays float ``[n, classes]``, exit ``k``'s
            probabilities (e.g. from
            `selfkd_tf.evaluation.scoring.predict_exit_probabilities`).
        labels: int ``[n]``.
        costs: FLOPs per stage and head (`selfkd_tf.models.costs.exit_costs`).
        thresholds: values ``>= 0``; sorted and deduplicated.
        latency: optional `measure_latency` result, added to the points.

    Returns:
        A JSON-ready dict: ``num_examples``; ``stage_flops`` and
        ``head_flops``; ``exits``, one point per exit served alone
        (``exit``, ``accuracy`` in %, ``flops``); ``cascade``, one point per
        threshold in increasing order (``threshold``, ``accuracy`` in %,
        ``mean_flops``, ``exit_fractions`` ``[N]``); every point also has
        ``flops_vs_deepest`` (its FLOPs over the deepest exit's alone) and,
        with ``latency``, ``latency_ms`` (per image, keyed by batch size).
        The first point (``T = 0``) has exit 1's accuracy, a point with
        ``T > 1`` the deepest exit's.

    Raises:
        ValueError: a threshold is negative or not a number, or the arrays
            disagree in shape.
    """
    probs = np.stack([np.asarray(p, np.float64) for p in exit_probs])
    labels = np.asarray(labels)
    num_exits, num_examples = probs.shape[:2]
    if labels.shape != (num_examples,) or len(costs.stage_flops) != num_exits:
        raise ValueError(
            f"exit_probs: {num_exits} exits of {num_examples} examples do not "
            f"match {labels.shape} labels and {len(costs.stage_flops)} exit costs")
    correct = probs.argmax(axis=-1) == labels  # [N, n]
    confidences = probs.max(axis=-1)
    deepest = costs.single_exit(num_exits)
    answer_cost = np.array([costs.cascade_exit(k) for k in range(1, num_exits + 1)])
    timings = latency or {}
    exits = []
    for k in range(1, num_exits + 1):
        point = {"exit": k, "accuracy": 100.0 * float(correct[k - 1].mean()),
                 "flops": costs.single_exit(k),
                 "flops_vs_deepest": costs.single_exit(k) / deepest}
        if timings:
            point["latency_ms"] = timings["exits"][k - 1]
        exits.append(point)
    cascade = []
    for i, threshold in enumerate(check_thresholds(thresholds)):
        exit_ids = first_confident_exit(confidences, threshold)
        counts = np.bincount(exit_ids - 1, minlength=num_exits)
        mean_flops = float(counts @ answer_cost) / num_examples
        point = {
            "threshold": threshold,
            "accuracy": 100.0 * float(correct[exit_ids - 1, np.arange(num_examples)].mean()),
            "mean_flops": mean_flops,
            "flops_vs_deepest": mean_flops / deepest,
            "exit_fractions": (counts / num_examples).tolist(),
        }
        if timings:
            point["latency_ms"] = timings["cascade"][i]
        cascade.append(point)
    curve = {"num_examples": int(num_examples), "num_exits": int(num_exits),
             "stage_flops": list(costs.stage_flops), "head_flops": list(costs.head_flops),
             "exits": exits, "cascade": cascade}
    if timings:
        curve["latency"] = {key: timings[key] for key in ("examples", "batch_sizes", "rounds")}
    return curve


def required_accuracy(
    curve: dict,
    *,
    target_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
) -> float:
    """The accuracy (%) a threshold must keep: the target, or the deepest
    exit's accuracy less the drop (exactly one is given).

    Raises:
        ValueError: not exactly one criterion, or one out of range (NaN
            and infinity are).
    """
    if (target_accuracy is None) == (max_accuracy_drop is None):
        raise ValueError("target_accuracy: give it or max_accuracy_drop, not both or neither")
    if max_accuracy_drop is not None:
        if not 0 <= max_accuracy_drop < math.inf:
            raise ValueError(
                f"max_accuracy_drop: must be a finite number >= 0; got {max_accuracy_drop}")
        return curve["exits"][-1]["accuracy"] - max_accuracy_drop
    if not 0 <= target_accuracy <= 100:
        raise ValueError(
            f"target_accuracy: must be a percentage in [0, 100]; got {target_accuracy}")
    return target_accuracy


def select_threshold(curve: dict, **criterion) -> dict | None:
    """The cheapest threshold of ``curve`` that keeps the wanted accuracy.

    Only a threshold whose mean cost is below the deepest exit's served
    alone qualifies: otherwise serving the deepest exit is as accurate and
    cheaper. Pick on a validation split, never on the test split whose
    accuracy you then report.

    Args:
        curve: from `early_exit_curve`.
        **criterion: ``target_accuracy`` (the least accuracy to keep, %) or
            ``max_accuracy_drop`` (the most to give up against the deepest
            exit served alone, in percentage points), as for
            `required_accuracy`.

    Returns:
        The chosen ``cascade`` point (lowest ``mean_flops``, then highest
        accuracy) with ``required_accuracy`` added, or None when no
        threshold cheaper than the deepest exit reaches it (serve the
        deepest exit).

    Raises:
        ValueError: as `required_accuracy`.
    """
    required = required_accuracy(curve, **criterion)
    # Accuracies are computed in float64 from counts: a tolerance far below
    # one example keeps "the deepest exit's accuracy" itself reachable.
    deepest_flops = curve["exits"][-1]["flops"]
    feasible = [p for p in curve["cascade"]
                if p["accuracy"] >= required - 1e-9 and p["mean_flops"] < deepest_flops]
    if not feasible:
        return None
    best = min(feasible, key=lambda p: (p["mean_flops"], -p["accuracy"]))
    return {**best, "required_accuracy": required}


def measure_latency(
    backbone,
    images: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    rounds: int = 3,
) -> dict:
    """Wall-clock time per image of the cascade and of every exit alone.

    Each configuration runs as one `tf.function`: the graph a SavedModel
    serves, less the pixel normalisation (see `time_per_image`).

    Args:
        backbone: a multi-exit backbone (``model.backbone``).
        images: float32 ``[M, H, W, C]``, normalised as in training.
        thresholds: the cascade thresholds to time.
        batch_sizes, rounds: as for `time_per_image`.

    Returns:
        ``{"examples": M, "batch_sizes": [...], "rounds": rounds,
        "exits": [...], "cascade": [...]}``: for every exit (served alone)
        and every sorted threshold, a dict from batch size (a string, as in
        JSON) to milliseconds per image.
    """
    images = np.asarray(images, np.float32)
    spec = tf.TensorSpec([None, *images.shape[1:]], tf.float32)
    cascade = EarlyExitCascade(backbone, threshold=0.0)
    run_cascade = tf.function(lambda x, t: cascade(x, t)["logits"],
                              input_signature=[spec, tf.TensorSpec([], tf.float32)])
    functions = [_inference_function(exit_model(backbone, k), spec)
                 for k in range(1, cascade.num_exits + 1)]
    functions += [functools.partial(run_cascade, t=tf.constant(threshold))
                  for threshold in check_thresholds(thresholds)]
    timings = time_per_image(functions, images, batch_sizes, rounds)
    num_exits = cascade.num_exits
    return {"examples": len(images), "batch_sizes": sorted({int(b) for b in timings[0]}),
            "rounds": rounds, "exits": timings[:num_exits], "cascade": timings[num_exits:]}


def time_per_image(
    functions: Sequence,
    images: np.ndarray,
    batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    rounds: int = 3,
) -> list[dict[str, float]]:
    """Milliseconds per image of each function on ``images``, by batch size.

    Every function runs over ``images`` in batches of each size (a size
    above ``M = len(images)`` is measured with batches of ``M``), once to
    warm up and then ``rounds`` times, the functions interleaved so that a
    change of the machine's load affects all of them alike. Each batch
    counts with its fastest round, which discounts other load; a function's
    time is the mean over its batches, so a cascade's reflects the mix of
    exits the images take.

    Args:
        functions: callables of a batch, returning tensors (any structure).
        images: ``[M, ...]`` inputs.
        batch_sizes: the batch sizes to time.
        rounds: timed passes per function.

    Returns:
        One dict per function, from batch size (a string, as in JSON) to
        milliseconds per image.
    """
    sizes = sorted({min(int(b), len(images)) for b in batch_sizes})
    batches = {size: [images[i:i + size] for i in range(0, len(images) - size + 1, size)]
               for size in sizes}

    def seconds(run, batch):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), run(batch))
        return time.perf_counter() - start

    for run in functions:
        for size in sizes:
            run(batches[size][0])
    # fastest[f][s][b]: the fastest of the rounds for batch b of size s.
    fastest = [[np.full(len(batches[size]), np.inf) for size in sizes] for _ in functions]
    for _ in range(rounds):
        for f, run in enumerate(functions):
            for s, size in enumerate(sizes):
                times = [seconds(run, batch) for batch in batches[size]]
                fastest[f][s] = np.minimum(fastest[f][s], times)
    return [{str(size): 1000.0 * float(np.mean(t)) / size for t, size in zip(row, sizes)}
            for row in fastest]


def _inference_function(network, spec: tf.TensorSpec):
    """``network`` in inference mode as a `tf.function` traced once."""
    return tf.function(lambda x: network(x, training=False), input_signature=[spec])


def format_curve_table(curve: dict) -> str:
    """The curve as plain text: the single exits, then one row per threshold."""
    sizes = [str(b) for b in curve.get("latency", {}).get("batch_sizes", [])]
    head = (f"{'':<12}{'acc %':>8}{'MFLOPs':>10}{'vs deepest':>12}"
            + "".join(f"{f'ms@b{b}':>10}" for b in sizes))
    lines = [head + "  answered at exit 1..N (%)"]

    def row(name, point, flops, fractions=""):
        latency = "".join(f"{point['latency_ms'][b]:>10.3f}" for b in sizes)
        return (f"{name:<12}{point['accuracy']:>8.2f}{flops / 1e6:>10.3f}"
                f"{100 * point['flops_vs_deepest']:>11.1f}%{latency}{fractions}")

    for point in curve["exits"]:
        lines.append(row(f"exit {point['exit']}", point, point["flops"]))
    for point in curve["cascade"]:
        fractions = "  " + " ".join(f"{100 * f:.1f}" for f in point["exit_fractions"])
        lines.append(row(f"T={point['threshold']:g}", point, point["mean_flops"], fractions))
    return "\n".join(lines)


def plot_curve(curve: dict, path: str, selected: dict | None = None) -> None:
    """Accuracy against mean FLOPs (and batch-1 latency, when measured).

    The cascade is a line through its thresholds; the exits served alone are
    reference points, the deepest one a star; a chosen threshold is ringed.
    """
    timed = "latency" in curve and "1" in curve["cascade"][0].get("latency_ms", {})
    figure = Figure(figsize=(11.0 if timed else 6.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # attaches the headless Agg canvas
    panels = [("flops", "Mean cost per image (% of the deepest exit's FLOPs)")]
    if timed:
        panels.append(("latency", "Mean latency per image at batch 1 (ms)"))
    deepest = curve["exits"][-1]
    for index, (kind, label) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)

        def x(point):
            if kind == "flops":
                return 100.0 * point["flops_vs_deepest"]
            return point["latency_ms"]["1"]

        cascade = curve["cascade"]
        axes.plot([x(p) for p in cascade], [p["accuracy"] for p in cascade],
                  marker="o", markersize=3, label="cascade (one point per threshold)")
        for point in cascade:
            axes.annotate(f"{point['threshold']:g}", (x(point), point["accuracy"]),
                          textcoords="offset points", xytext=(3, -9), fontsize=6)
        shallow = curve["exits"][:-1]
        axes.scatter([x(p) for p in shallow], [p["accuracy"] for p in shallow],
                     color="tab:gray", label="exit served alone", zorder=3)
        for point in shallow:
            axes.annotate(f"exit {point['exit']}", (x(point), point["accuracy"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.scatter([x(deepest)], [deepest["accuracy"]], marker="*", s=160,
                     color="tab:red", label=f"deepest exit ({deepest['exit']})", zorder=3)
        if selected is not None:
            axes.scatter([x(selected)], [selected["accuracy"]], s=200, facecolors="none",
                         edgecolors="black", label=f"chosen T = {selected['threshold']:g}",
                         zorder=4)
        axes.set_xlabel(label)
        axes.set_ylabel("Top-1 accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Early exit: accuracy against cost ({curve['num_examples']} images; "
                    f"deepest exit {deepest['flops'] / 1e6:.2f} MFLOPs)")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp.png")
    figure.savefig(temporary, dpi=120)
    os.replace(temporary, path)


def write_curve(curve: dict, json_path: str, png_path: str,
                selected: dict | None = None) -> None:
    """Writes the curve (with ``selected``, if any) as JSON and as a figure."""
    write_metrics_json({**curve, "selected": selected}, json_path)
    plot_curve(curve, png_path, selected)
