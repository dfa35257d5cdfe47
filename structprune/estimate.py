"""Peak device memory predicted from a config, without weights (METHOD.md "Memory").

`estimate_memory` replays, phase by phase, the items the streaming pipeline holds on its device
(`memory.py` byte formulas; the same `hold` calls in streaming.py / pipeline.py), so on the CPU it
equals the accounted peak exactly (tests/test_memory.py). Global methods hold the whole model, its
gradients and the activations saved for backpropagation: O(N) instead of one layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapters import LayerLayout, adapter_for
from .memory import (DTYPE_BYTES, activation_bytes, forward_saved_bytes, forward_workspace_bytes, gram_bytes,
                     layer_weight_bytes, logits_bytes, saliency_bytes, solver_bytes)

_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
LAYERWISE_METHODS = ("structprune", "magnitude", "wanda-sp", "flap", "owl")


def config_layout(config) -> LayerLayout:
    """The dense layer layout a config describes (every layer alike before pruning)."""
    adapter_for(config)  # unsupported architectures fail here
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if config.model_type == "opt":
        return LayerLayout(hidden, heads, heads, hidden // heads, config.ffn_dim, False,
                           bool(getattr(config, "enable_bias", True)), bool(getattr(config, "enable_bias", True)))
    return LayerLayout(hidden, heads, kv, head_dim, config.intermediate_size, True,
                       bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False)))


def _opt_extras(config) -> tuple[int, int]:
    """OPT: (final layer norm params, one projection's params) around the layers."""
    h, wep = config.hidden_size, config.word_embed_proj_dim
    final = 2 * h if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False) else 0
    return final, (h * wep if wep != h else 0)


def _embedding_params(config) -> int:
    """Parameters of the model's base outside the layers (what `LayerStream.embed` moves)."""
    h = config.hidden_size
    if config.model_type == "opt":
        final, proj = _opt_extras(config)
        return (config.vocab_size * config.word_embed_proj_dim + (config.max_position_embeddings + 2) * h
                + final + 2 * proj)
    return config.vocab_size * h + h


def _head_params(config) -> int:
    """Final modules + LM head (what `LayerStream.logits_nll` moves)."""
    h = config.hidden_size
    if config.model_type == "opt":
        final, proj = _opt_extras(config)
        return final + proj + config.vocab_size * config.word_embed_proj_dim
    return h + config.vocab_size * h


def model_params(config) -> int:
    """All parameters (tied embeddings counted once), from the config alone."""
    lay = config_layout(config)
    per_layer = layer_weight_bytes(lay, 1)
    head = 0 if getattr(config, "tie_word_embeddings", True) else config.vocab_size * config.hidden_size
    return _embedding_params(config) + config.num_hidden_layers * per_layer + head


def estimate_memory(config, method: str = "structprune", nsamples: int = 64, seqlen: int = 512,
                    dtype: str = "float32", batch_size: int = 1, sensitivity: bool = True,
                    target: str = "local") -> dict:
    """Predicted peak device bytes, per phase, for one pruning run.

    Layer-wise methods: the maximum over embedding, pass 1 (both Grams, the layer, one batch and its
    forward workspace; the solver when sensitivities are measured), the head (logits), and pass 2
    (one Gram, the solver). Host memory for the activations (nsamples x seqlen x d, twice) is
    reported separately: it never sits on the device.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")
    db = _DTYPES[dtype]
    lay = config_layout(config)
    B, S = batch_size, seqlen
    act = activation_bytes(B, S, lay.hidden, db)
    work = forward_workspace_bytes(lay, B, S, db)
    layer = layer_weight_bytes(lay, db)
    g_attn, g_mlp = gram_bytes(lay.n_heads * lay.head_dim), gram_bytes(lay.intermediate)
    solve_attn = solver_bytes(lay.hidden, lay.n_heads * lay.head_dim, lay.head_dim)
    solve_mlp = solver_bytes(lay.hidden, lay.intermediate)
    n_params = model_params(config)
    phases: dict[str, int] = {}
    if method in LAYERWISE_METHODS:
        phases["embed"] = _embedding_params(config) * db + act
        run = act + work
        solver = method == "structprune"  # the methods whose scores and rules run OBS solves
        pass1 = layer + g_attn + g_mlp + run
        if solver:
            sal = max(saliency_bytes(lay.hidden, lay.n_heads * lay.head_dim, lay.head_dim),
                      saliency_bytes(lay.hidden, lay.intermediate))
            pass1 = max(pass1, layer + g_attn + g_mlp + sal)
        if sensitivity and solver:
            pass1 = max(pass1, layer + g_attn + g_mlp + max(solve_attn, solve_mlp))
        phases["pass1"] = pass1
        if sensitivity and solver:  # only the sensitivity streams run the LM head during pruning
            phases["head"] = _head_params(config) * db + act + logits_bytes(B, S, config.vocab_size)
        extra = layer if target == "dense" else 0
        p2 = [layer + extra + g + max(run, s if solver else 0) for g, s in ((g_attn, solve_attn), (g_mlp, solve_mlp))]
        phases["pass2"] = max(p2)
        peak = max(phases.values())
    elif method == "global-taylor":
        phases["global"] = global_taylor_bytes(config, n_params, B, S, db)
        peak = phases["global"]
    else:
        raise ValueError(f"unknown method {method!r}")
    return {
        "method": method, "peak_bytes": int(peak), "phases": {k: int(v) for k, v in phases.items()},
        "model_params": n_params, "model_weight_bytes": n_params * db,
        "layer_weight_bytes": layer, "n_layers": config.num_hidden_layers,
        "host_activation_bytes": 2 * nsamples * S * lay.hidden * db,
        "nsamples": nsamples, "seqlen": seqlen, "dtype": dtype, "batch_size": batch_size,
    }


def global_taylor_bytes(config, n_params: int, batch: int, seqlen: int, dtype_bytes: int) -> int:
    """Whole model + its gradients + activations kept for backprop of one batch + logits."""
    lay = config_layout(config)
    saved_per_layer = forward_saved_bytes(lay, batch, seqlen, dtype_bytes) + 4 * activation_bytes(
        batch, seqlen, lay.hidden, dtype_bytes)
    return (2 * n_params * dtype_bytes + config.num_hidden_layers * saved_per_layer
            + logits_bytes(batch, seqlen, config.vocab_size))


def load_config(name_or_path: str):
    """A config from a built-in / tiny name, a preset, a model folder, or a config.json file."""
    from transformers import AutoConfig

    from .models import BUILTIN_MODELS, TINY_MODELS, converted_dir, tiny_config
    from .presets import PRESETS, preset_config

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


__all__ = ["estimate_memory", "model_params", "config_layout", "load_config", "config_from_json", "DTYPE_BYTES"]
