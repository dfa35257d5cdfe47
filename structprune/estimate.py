"""Peak device memory predicted from a config, without weights (docs/METHOD.md "Memory"): the estimator's
entry point. The byte model itself (`estimate_memory`, `model_params`, global-taylor's terms) lives
in footprint.py and is re-exported here; this module adds `load_config`, which turns a tiny /
built-in model name, a preset (presets.py), a model folder or a config.json into a config.

Imports run one way: estimate -> presets -> footprint -> adapters / memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapters import config_layout
from .footprint import (LAYERWISE_METHODS, WEIGHTS_ONLY_METHODS, estimate_memory, global_taylor_bytes,
                        global_taylor_terms, model_params)
from .memory import DTYPE_BYTES
from .presets import PRESETS, preset_config


def load_config(name_or_path: str):
    """A config from a built-in / tiny name, a preset, a model folder, or a config.json file."""
    from transformers import AutoConfig

    from .models import BUILTIN_MODELS, TINY_MODELS, converted_dir, tiny_config

    if name_or_path in TINY_MODELS:
        return tiny_config(name_or_path)
    if name_or_path in PRESETS:
        return preset_config(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        return AutoConfig.from_pretrained(converted_dir(name_or_path))
    path = Path(name_or_path)
    if path.is_file():
        return config_from_json(path.read_text())
    return AutoConfig.from_pretrained(path)


def config_from_json(text: str):
    """A config from pasted config.json text."""
    from transformers import AutoConfig

    d = json.loads(text)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    return AutoConfig.for_model(model_type, **d)


__all__ = ["estimate_memory", "model_params", "config_layout", "load_config", "config_from_json", "DTYPE_BYTES",
           "LAYERWISE_METHODS", "WEIGHTS_ONLY_METHODS", "global_taylor_bytes", "global_taylor_terms"]
