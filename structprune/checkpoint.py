"""Saving a pruned model and loading it back with one call.

Pruned layers can differ in shape, which a plain Hugging Face config cannot express. The saved
config.json keeps the model's own fields plus a `structprune` section with every layer's shape
(query heads, KV heads, MLP channels, which output projections gained a bias). `load_pruned`
rebuilds the dense skeleton, shrinks each layer to its recorded shape, then loads the weights.
Where every layer has the same shape and no bias was added, the config's own head and channel
counts are rewritten too, so plain `AutoModelForCausalLM.from_pretrained` loads the folder
(families whose `AdapterSpec.plain_loadable` says so: Llama-family models; OPT derives its head size
from hidden/heads and always needs `load_pruned`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .adapters import adapter_for, set_output_bias

FORMAT_VERSION = 1


def layer_shapes(model) -> list[dict]:
    ad = adapter_for(model)
    shapes = []
    for layer in ad.layers(model):
        lay = ad.layout(layer)
        shapes.append({
            "n_heads": lay.n_heads, "n_kv_heads": lay.n_kv_heads, "head_dim": lay.head_dim,
            "intermediate": lay.intermediate,
            "o_bias": ad.out_proj(layer, "attn").bias is not None,
            "mlp_out_bias": ad.out_proj(layer, "mlp").bias is not None,
        })
    return shapes


def _plain_loadable(config, shapes: list[dict]) -> bool:
    first = shapes[0]
    same = all(s == first for s in shapes)
    no_new_bias = not any(s["o_bias"] and not getattr(config, "attention_bias", False) for s in shapes) and \
        not any(s["mlp_out_bias"] and not getattr(config, "mlp_bias", False) for s in shapes)
    return same and no_new_bias and adapter_for(config).spec.plain_loadable


def _plain_config(config, shapes: list[dict]):
    """The config with the pruned head / channel counts, if one shape fits all layers and the
    config class accepts it (transformers validates e.g. hidden % heads); else None."""
    if not _plain_loadable(config, shapes):
        return None
    s = shapes[0]
    d = config.to_dict()
    d.update(num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"], head_dim=s["head_dim"],
             intermediate_size=s["intermediate"])
    try:
        new = type(config).from_dict(d)
    except Exception:  # noqa: BLE001 - transformers raises its own validation error types
        return None
    new._attn_implementation = config._attn_implementation
    return new


def save_pruned(model, tokenizer, folder: str | Path, provenance: dict | None = None) -> Path:
    """Writes weights (safetensors), config with per-layer shapes, and the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = layer_shapes(model)
    config = model.config
    plain = _plain_config(config, shapes)
    if plain is not None:
        model.config = config = plain
    config.structprune = {"format": FORMAT_VERSION, "layer_shapes": shapes, "provenance": provenance or {},
                          "plain_hf_loadable": plain is not None}
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def is_structprune_checkpoint(folder: str | Path) -> bool:
    cfg = Path(folder) / "config.json"
    if not cfg.exists():
        return False
    return "structprune" in json.loads(cfg.read_text())


def _shrink_layer(adapter, layer, shape: dict) -> None:
    lay = adapter.layout(layer)
    if shape["n_heads"] != lay.n_heads:
        if lay.mha:
            heads = torch.arange(shape["n_heads"])
        else:  # the first heads of every KV group
            per_group = lay.n_heads // lay.n_kv_heads
            keep_per = shape["n_heads"] // lay.n_kv_heads
            heads = (torch.arange(lay.n_kv_heads)[:, None] * per_group + torch.arange(keep_per)).reshape(-1)
        adapter.keep_heads(layer, heads)
    if shape["intermediate"] != lay.intermediate:
        adapter.keep_channels(layer, torch.arange(shape["intermediate"]))
    for kind, key in (("attn", "o_bias"), ("mlp", "mlp_out_bias")):
        lin = adapter.out_proj(layer, kind)
        if shape[key] and lin.bias is None:
            set_output_bias(lin, torch.zeros(lin.out_features))


def load_pruned(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Loads a folder written by `save_pruned`: (model, tokenizer or None)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    shapes = config.structprune["layer_shapes"]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    adapter = adapter_for(model)
    for layer, shape in zip(adapter.layers(model), shapes):
        _shrink_layer(adapter, layer, shape)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.to(dtype).eval(), tok
