"""Training, pseudo-labelling and evaluation: the paper's Algorithm 1 plus self-training, as stages."""
from .config import Config, ConfigError, load_config, presets
from .evaluator import evaluate, format_table
from .pseudo_label import generate_pseudo_labels
from .runner import Interrupted, Runner

__all__ = ["Config", "ConfigError", "load_config", "presets", "evaluate", "format_table", "generate_pseudo_labels",
           "Runner", "Interrupted"]
