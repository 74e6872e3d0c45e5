"""Hyperparameter search with KerasTuner on a held-out part of the training set."""

from selfkd_tf.tuning.search import tune
from selfkd_tf.tuning.search_space import TuneSettings
