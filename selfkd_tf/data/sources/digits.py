"""`digits`: handwritten digits that ship inside scikit-learn, no download.

The 1,797 images of `sklearn.datasets.load_digits` (the test part of the UCI
optical recognition of handwritten digits data set): 8x8 greyscale, 10
classes "0" ... "9", read from a file inside the installed scikit-learn
package. Each pixel counts the set pixels of a 4x4 block of the original
32x32 bitmap, an integer 0..16; it is mapped to uint8 as
`round(255 * v / 16)`, so 0 stays black and 16 becomes 255, and the images
are `[N, 8, 8, 1]`.

The split is fixed and stratified: in the order of the file, every fifth
example of each class (its 5th, 10th, 15th, ...) is a test example. That gives
1,442 training and 355 test examples; each class has 34 to 36 (about 20
percent) of its examples in the test split.
"""

from __future__ import annotations

import numpy as np

from selfkd_tf.data.sources import registry
from selfkd_tf.data.sources.arrays import ImageArrays, image_arrays

__all__ = ["TEST_EVERY", "in_test_split", "load"]

# Every TEST_EVERY-th example of a class goes to the test split.
TEST_EVERY = 5
_MAX_LEVEL = 16


@registry.register("digits")
def load(spec: registry.SourceSpec) -> ImageArrays:
    """Loads scikit-learn's digits with the fixed split described above."""
    del spec  # Nothing to choose: the data ship with scikit-learn.
    # Imported here: scikit-learn takes seconds to import and only this
    # source needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / _MAX_LEVEL)).astype(np.uint8)
    labels = digits.target
    test = in_test_split(labels)
    return image_arrays(
        "digits (scikit-learn)",
        images[~test],
        labels[~test],
        images[test],
        labels[test],
        [str(name) for name in digits.target_names],
    )


def in_test_split(labels: np.ndarray) -> np.ndarray:
    """bool `[N]`: True for every `TEST_EVERY`-th example of each class.

    Example:

    >>> in_test_split(np.array([0, 0, 0, 0, 0, 1, 0])).astype(int)
    array([0, 0, 0, 0, 1, 0, 0])
    """
    mask = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        mask[np.flatnonzero(labels == label)[TEST_EVERY - 1 :: TEST_EVERY]] = True
    return mask
