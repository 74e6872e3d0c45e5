"""Which examples a run trains and evaluates on.

`select_positions` carves a validation split out of the training split,
caps the training and evaluation splits, and picks what the evaluation split
holds, from the labels alone (so images still in their files need not be
read); `select_examples` applies it to a dataset in memory. Every choice is a stratified draw (each class in proportion to its
size) fixed by one seed, and kept examples stay in their original relative
order, which defines their index in the PS-KD table.
"""

from __future__ import annotations

import numpy as np

from selfkd_tf.data.sources import DataError, ImageArrays

__all__ = ["select_examples", "select_positions", "stratified_halves", "stratified_sample"]

# Distinct streams of the numpy generator that selects examples, so that the
# validation carve-out and the size caps do not depend on one another.
_VALIDATION_STREAM, _TRAIN_CAP_STREAM, _EVAL_CAP_STREAM = 0, 1, 2


def select_examples(
    arrays: ImageArrays,
    *,
    validation_fraction: float,
    train_examples: int | None,
    eval_split: str,
    eval_examples: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training and evaluation examples of a run held in memory.

    `select_positions` chooses them; see there for the arguments.

    Returns:
        `(x_train, y_train, x_eval, y_eval)`.

    Raises:
        DataError: as `select_positions`.

    Example:

    >>> from selfkd_tf.data import load_arrays
    >>> x_train, y_train, x_eval, y_eval = select_examples(
    ...     load_arrays("digits"), validation_fraction=0.1,
    ...     train_examples=None, eval_split="validation", eval_examples=None,
    ...     seed=0,
    ... )
    >>> len(y_train), len(y_eval)
    (1298, 144)
    """
    train, (eval_from, evaluation) = select_positions(
        arrays.y_train, arrays.y_test, arrays.num_classes,
        validation_fraction=validation_fraction, train_examples=train_examples,
        eval_split=eval_split, eval_examples=eval_examples, seed=seed,
    )
    x_eval, y_eval = (
        (arrays.x_train, arrays.y_train) if eval_from == "train"
        else (arrays.x_test, arrays.y_test)
    )
    return (arrays.x_train[train], arrays.y_train[train],
            x_eval[evaluation], y_eval[evaluation])


def select_positions(
    y_train: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    validation_fraction: float,
    train_examples: int | None,
    eval_split: str,
    eval_examples: int | None,
    seed: int,
) -> tuple[np.ndarray, tuple[str, np.ndarray]]:
    """Which examples of the dataset's splits a run trains and evaluates on.

    Args:
        y_train, y_test: int `[N]`, `[M]` labels of the dataset's splits.
        num_classes: classes of the dataset.
        validation_fraction: in `[0, 1)`; when positive, this fraction of the
            training split is held out as the validation split.
        train_examples: optional cap on the training split.
        eval_split: `"test"`, `"validation"` (the held-out part) or `"train"`
            (the training split actually used).
        eval_examples: optional cap on the evaluation split.
        seed: non-negative seed of every draw.

    Returns:
        `(train, (eval_from, evaluation))`: the increasing positions of the
        training examples in the dataset's training split, and of the
        evaluation examples in its split `eval_from` (`"train"` or `"test"`).

    Raises:
        DataError: the validation split or what is left for training would be
            empty, or the training split holds fewer examples than classes.

    Example:

    >>> train, (eval_from, evaluation) = select_positions(
    ...     np.array([0, 0, 1, 1]), np.array([0, 1]), 2, validation_fraction=0.5,
    ...     train_examples=None, eval_split="validation", eval_examples=None,
    ...     seed=0)
    >>> eval_from, len(train), len(evaluation)
    ('train', 2, 2)
    """
    train = np.arange(len(y_train))
    eval_from, evaluation = "test", np.arange(len(y_test))
    if validation_fraction > 0:
        held_out = stratified_sample(
            y_train,
            round(validation_fraction * len(y_train)),
            seed,
            _VALIDATION_STREAM,
        )
        if not 0 < len(held_out) < len(y_train):
            raise DataError(
                f"validation_fraction={validation_fraction} of {len(y_train)} "
                f"training examples leaves {len(held_out)} for validation; "
                "both splits need examples"
            )
        train = np.setdiff1d(train, held_out)
        eval_from, evaluation = "train", held_out
    if train_examples is not None and train_examples < len(train):
        train = train[
            stratified_sample(y_train[train], train_examples, seed, _TRAIN_CAP_STREAM)
        ]
    if len(train) < num_classes:
        raise DataError(
            f"the training split holds {len(train)} examples for "
            f"{num_classes} classes (train_examples={train_examples}, "
            f"validation_fraction={validation_fraction}); every class needs "
            "at least one"
        )
    if eval_split == "train":
        eval_from, evaluation = "train", train
    if eval_examples is not None and eval_examples < len(evaluation):
        labels = (y_train if eval_from == "train" else y_test)[evaluation]
        evaluation = evaluation[
            stratified_sample(labels, eval_examples, seed, _EVAL_CAP_STREAM)
        ]
    return train, (eval_from, evaluation)


def stratified_sample(
    labels: np.ndarray, count: int, seed: int, stream: int
) -> np.ndarray:
    """Indices of `count` examples drawn per class, in proportion to its size.

    Args:
        labels: int `[N]`.
        count: number of examples to draw, at most `N`.
        seed: non-negative seed; with `stream`, fixes the draw.
        stream: distinguishes independent draws made with the same seed.

    Returns:
        int64 `[count]`, increasing.

    Example:

    >>> stratified_sample(np.array([0, 0, 0, 0, 1, 1]), 3, seed=0, stream=0)
    array([0, 2, 5])
    """
    rng = np.random.default_rng([seed, stream])
    classes, sizes = np.unique(labels, return_counts=True)
    quotas = sizes * (count / len(labels))
    taken = np.floor(quotas).astype(np.int64)
    # Largest remainders get the examples rounding left over; the stable sort
    # breaks ties towards lower class ids.
    leftover = count - int(taken.sum())
    taken[np.argsort(taken - quotas, kind="stable")[:leftover]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == label))[:size]
        for label, size in zip(classes, taken)
    ]
    return np.sort(np.concatenate(chosen))


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the examples, each holding half of every class.

    A class with an odd number of examples gives its odd one to the second
    half. Used to choose something on one half of a split (a threshold, a
    temperature) and report it on the other, so the report never peeks.

    Args:
        labels: int ``[n]``.
        seed: non-negative seed of the draw.

    Returns:
        ``(first, second)``: increasing int64 indices, together ``range(n)``.

    Example:

    >>> stratified_halves(np.array([0, 0, 1, 1, 1]), seed=0)
    (array([0, 4]), array([1, 2, 3]))
    """
    rng = np.random.default_rng(seed)
    first, second = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
