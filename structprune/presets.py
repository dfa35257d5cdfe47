"""Published model shapes as configs without weights: the memory estimator's presets and the
depth-vs-width view of the O(sqrt N) argument (docs/METHOD.md "Memory").

Numbers are copied from each model's config.json on the Hugging Face hub (`PRESET_SOURCES`).
Only shapes matter here: hidden size, layers, query / KV heads, MLP width, vocabulary, context.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .adapters import config_layout
from .footprint import LAYERWISE_METHODS, estimate_memory, model_params
from .memory import layer_weight_bytes

# name -> config kwargs (model_type picks the transformers config class)
PRESETS: dict[str, dict[str, Any]] = {
    # facebook/opt-*: MHA, fc1/fc2 MLP with biases, vocab 50272, context 2048, tied embeddings
    "opt-125m": dict(model_type="opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(model_type="opt", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": dict(model_type="opt", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "opt-30b": dict(model_type="opt", hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672),
    "opt-66b": dict(model_type="opt", hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864),
    # meta-llama/Llama-2-*-hf: vocab 32000, context 4096, untied; 70b uses GQA (8 KV heads)
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                        max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=32000,
                        max_position_embeddings=4096, tie_word_embeddings=False),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    # Qwen/Qwen2.5-7B (q/k/v carry biases in Qwen2's code)
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M (the built-in model's shape)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
}

PRESET_SOURCES: dict[str, str] = {
    **{f"opt-{s}": f"facebook/opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")},
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
}

_OPT_DEFAULTS = dict(vocab_size=50272, max_position_embeddings=2048, enable_bias=True, tie_word_embeddings=True,
                     activation_function="relu")


def family(name: str) -> str:
    """'OPT', 'Llama-2', 'Llama-3', 'Qwen2.5' or 'SmolLM2' (for colours and fits)."""
    prefix = {"opt": "OPT", "llama-2": "Llama-2", "llama-3": "Llama-3", "qwen2.5": "Qwen2.5", "smollm2": "SmolLM2"}
    return next(v for k, v in prefix.items() if name.startswith(k))


def preset_config(name: str):
    """A transformers config (OPTConfig / LlamaConfig / Qwen2Config) for a preset, no weights."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    model_type = kw.pop("model_type")
    if model_type == "opt":
        kw = {**_OPT_DEFAULTS, "word_embed_proj_dim": kw["hidden_size"], **kw}
        cfg = OPTConfig(**kw)
    elif model_type == "llama":
        cfg = LlamaConfig(**kw)
    else:
        cfg = Qwen2Config(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def scaling_rows(names: list[str] | None = None) -> list[dict]:
    """Per preset: total parameters N, layers L, hidden d and one decoder layer's parameters: the
    numbers behind "one layer is about sqrt(N)" (docs/METHOD.md). Sorted by N."""
    rows = []
    for name in names or list(PRESETS):
        cfg = preset_config(name)
        n = model_params(cfg)
        layer = layer_weight_bytes(config_layout(cfg), 1)
        rows.append({"preset": name, "family": family(name), "n_params": n, "n_layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "layer_params": layer, "layer_fraction": layer / n,
                     "sqrt_n": math.sqrt(n)})
    return sorted(rows, key=lambda r: r["n_params"])


def estimate_rows(configs: dict[str, object], methods=("global-taylor", "wanda-sp", "structprune"),
                  nsamples: int = 128, seqlen: int = 2048, dtype: str = "bfloat16", batch_size: int = 1) -> list[dict]:
    """`footprint.estimate_memory` for every (config, method), on a GPU: preset, n_params, method,
    peak_gib and the phase that sets the peak, and the host's peak with the weights in host
    memory (host_memory_gib) and, for the layer-wise methods, streamed from disk (host_disk_gib;
    NaN where the method needs the whole model). structprune is estimated with its sensitivity
    pass and, as on CUDA, with its Grams in host memory between accumulation and solve."""
    rows = []
    for name, cfg in configs.items():
        for method in methods:
            opts = dict(sensitivity=method == "structprune", host_grams=True)
            est = estimate_memory(cfg, method, nsamples, seqlen, dtype, batch_size, **opts)
            disk = (estimate_memory(cfg, method, nsamples, seqlen, dtype, batch_size, weights="disk", **opts)
                    if method in LAYERWISE_METHODS else None)
            phase = max(est["phases"], key=est["phases"].get)
            rows.append({"preset": name, "family": family(name) if name in PRESETS else "", "n_params": est["model_params"],
                         "method": method,
                         "peak_gib": est["peak_bytes"] / 2**30, "peak_phase": phase,
                         "layer_gib": est["layer_weight_bytes"] / 2**30, "model_gib": est["model_weight_bytes"] / 2**30,
                         "host_activation_gib": est["host_activation_bytes"] / 2**30,
                         "host_memory_gib": est["host_peak_bytes"] / 2**30,
                         "host_disk_gib": disk["host_peak_bytes"] / 2**30 if disk else math.nan})
    return rows


def loglog_slope(x, y) -> float:
    """Least-squares slope of log y on log x (the exponent a of y ~ x^a)."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if lx.size < 2 or np.ptp(lx) == 0:
        return float("nan")
    return float(np.polyfit(lx, ly, 1)[0])


__all__ = ["PRESETS", "PRESET_SOURCES", "preset_config", "scaling_rows", "estimate_rows", "loglog_slope", "family"]
