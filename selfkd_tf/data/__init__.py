"""Image data with a stable sample index: sources, splits and tf.data pipelines."""

from selfkd_tf.data.augmentation import AUGMENTATIONS
from selfkd_tf.data.pipeline import CACHE_MODES
from selfkd_tf.data.pipeline import DatasetInfo
from selfkd_tf.data.pipeline import class_names
from selfkd_tf.data.pipeline import load_arrays
from selfkd_tf.data.pipeline import make_datasets
from selfkd_tf.data.plan import WorkerShare
from selfkd_tf.data.sources import DataError
from selfkd_tf.data.sources import ImageArrays
