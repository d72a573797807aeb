"""Training, pseudo-labelling and evaluation: the paper's Algorithm 1 plus self-training, as stages.

Names are imported on first use, so that the torch-free parts (the stage records, the data kinds) can be read by
`sdca --help` without loading torch.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    **{n: "sdca.engine.config" for n in ("Config", "ConfigError", "load_config", "presets")},
    **{n: "sdca.engine.evaluator" for n in ("evaluate", "format_table")},
    "generate_pseudo_labels": "sdca.engine.pseudo_label",
    **{n: "sdca.engine.runner" for n in ("Interrupted", "Runner")},
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
