"""Peak device memory predicted from a config, without weights (docs/METHOD.md "Memory"): the estimator's
entry point. The byte model itself (`estimate_memory`, `model_params`, global-taylor's terms) lives
in footprint.py and is re-exported here; this module adds `load_config`, which turns a tiny /
built-in model name, a preset (presets.py), a model folder or a config.json into a config.

Imports run one way: estimate -> presets -> footprint -> adapters / memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapters import adapter_for, config_layout
from .errors import ModelLoadError, UnknownModelError
from .footprint import (LAYERWISE_METHODS, WEIGHTS_ONLY_METHODS, estimate_memory, global_taylor_bytes,
                        global_taylor_terms, model_params)
from .memory import DTYPE_BYTES
from .presets import PRESETS, preset_config


def load_config(name_or_path: str):
    """A config from a built-in / tiny name, a preset, a model folder, or a config.json file."""
    from transformers import AutoConfig

    from .models import BUILTIN_MODELS, TINY_MODELS, converted_dir, model_config, tiny_config

    if name_or_path in TINY_MODELS:
        return tiny_config(name_or_path)
    if name_or_path in PRESETS:
        return preset_config(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        if not (converted_dir(name_or_path) / "config.json").is_file():
            raise ModelLoadError(f"built-in model {name_or_path!r} is not prepared yet: run `structprune prepare "
                                 f"--model {name_or_path}` (or `make prepare`)")
        return AutoConfig.from_pretrained(converted_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            return config_from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    if path.exists():
        return model_config(str(path)) or AutoConfig.from_pretrained(path)  # a pruned checkpoint: its own config
    if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):  # a hub id: its cached config
        try:
            return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"hub model {name_or_path!r} has no config in the local Hugging Face cache "
                                 f"({type(exc).__name__}); give a model folder or a config.json") from exc
    raise UnknownModelError(f"unknown model {name_or_path!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), "
                            f"a tiny model ({', '.join(TINY_MODELS)}), a preset ({', '.join(PRESETS)}), a model "
                            "folder or a config.json")


def config_from_json(text: str):
    """A config from pasted config.json text (ValueError, one line, when it is not one)."""
    from transformers import AutoConfig

    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError("config.json must hold a JSON object")
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    try:
        config = AutoConfig.for_model(model_type, **d)
    except Exception as exc:  # noqa: BLE001 - transformers raises several types for a bad config
        raise ValueError(f"not a usable {model_type!r} config: {' '.join(str(exc).split())[:300]}") from None
    adapter_for(config)  # UnsupportedArchitectureError, before any estimate
    return config


__all__ = ["estimate_memory", "model_params", "config_layout", "load_config", "config_from_json", "DTYPE_BYTES",
           "LAYERWISE_METHODS", "WEIGHTS_ONLY_METHODS", "global_taylor_bytes", "global_taylor_terms"]
