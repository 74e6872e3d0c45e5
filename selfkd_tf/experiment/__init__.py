"""One training run as a recipe: settings, builders, training, resuming, trained runs."""

from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.experiment.trained import TrainedModel
from selfkd_tf.experiment.trained import evaluate_trained
from selfkd_tf.experiment.trained import load_trained_model
from selfkd_tf.experiment.training import train
