"""Per-layer shapes for a model pruned by structprune (the modeling file shipped in its folder).

This file is copied, unchanged, into every exported folder whose layers differ in shape (or that
gained output biases), so that plain transformers loads it:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

`trust_remote_code=True` lets transformers import this file from the folder; it is the only code
it runs. The file imports only torch and transformers, reads nothing but the config it is given,
and makes no network access. Read it before you trust it: it is short.

config.json keeps every field of the base family's config (the dense head and channel counts, so
embeddings, norms and rotary embeddings are built as before) and adds `structprune.layer_shapes`:
per decoder layer, the query heads, KV heads and MLP channels it kept and whether the attention /
MLP output projection carries a bias (the refit may add one). The model builds the family's dense
skeleton (on the meta device while transformers loads, so nothing large is allocated), gives
each layer's projections their pruned shapes, and the weights then load by their usual names.
No computation changes: the family's own attention and MLP code runs on narrower matrices.

MODELING_VERSION counts changes of this file; `structprune.modeling_version` in config.json says
which version wrote the folder, and a folder written by a newer version is refused here.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

MODELING_VERSION = 1

# Module paths relative to a decoder layer, per family (the structprune adapters say the same).
_LLAMA_LIKE = dict(layers="model.layers", attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
                   v="self_attn.v_proj", o="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"),
                   mlp_out="mlp.down_proj", heads_attr=None, kv_groups_attr="num_key_value_groups")
_OPT = dict(layers="model.decoder.layers", attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
            v="self_attn.v_proj", o="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2",
            heads_attr="num_heads", kv_groups_attr=None)


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _resize(layer: nn.Module, path: str, n_in: int, n_out: int, bias: bool) -> None:
    """Replaces the Linear at `path` by an uninitialised one of the pruned shape."""
    old = _get(layer, path)
    parent, _, name = path.rpartition(".")
    new = nn.Linear(n_in, n_out, bias=bias, device=old.weight.device, dtype=old.weight.dtype)
    setattr(_get(layer, parent) if parent else layer, name, new)


def apply_layer_shapes(model: nn.Module, config, names: dict) -> None:
    """Gives every decoder layer the shape recorded in `config.structprune["layer_shapes"]`."""
    section = config.structprune
    written_by = section.get("modeling_version", 1)
    if written_by > MODELING_VERSION:
        raise ValueError(f"this folder was written by structprune modeling version {written_by}; this file "
                         f"reads up to version {MODELING_VERSION}: export the model again with its writer")
    shapes = section["layer_shapes"]
    layers = _get(model, names["layers"])
    if len(shapes) != len(layers):
        raise ValueError(f"config.json lists {len(shapes)} layer shapes for {len(layers)} decoder layers")
    for layer, s in zip(layers, shapes):
        hidden, hd = _get(layer, names["o"]).out_features, s["head_dim"]
        for role, heads in (("q", s["n_heads"]), ("k", s["n_kv_heads"]), ("v", s["n_kv_heads"])):
            _resize(layer, names[role], hidden, heads * hd, _get(layer, names[role]).bias is not None)
        _resize(layer, names["o"], s["n_heads"] * hd, hidden, s["o_bias"])
        for path in names["mlp_in"]:
            _resize(layer, path, hidden, s["intermediate"], _get(layer, path).bias is not None)
        _resize(layer, names["mlp_out"], s["intermediate"], hidden, s["mlp_out_bias"])
        attn = _get(layer, names["attn"])
        if names["heads_attr"]:
            setattr(attn, names["heads_attr"], s["n_heads"])
        if names["kv_groups_attr"]:  # query heads per KV head (repeat_kv); at least 1 when a layer keeps none
            setattr(attn, names["kv_groups_attr"], max(1, s["n_heads"] // max(s["n_kv_heads"], 1)))


def _pruned_pair(base_config: type, base_model: type, model_type: str, names: dict, title: str):
    """A config class and a causal-LM class for one family: the family's own, plus per-layer shapes."""
    config_cls = type(f"StructPruned{title}Config", (base_config,), {"model_type": model_type})

    def __init__(self, config):
        base_model.__init__(self, config)
        apply_layer_shapes(self, config, names)

    model_cls = type(f"StructPruned{title}ForCausalLM", (base_model,),
                     {"config_class": config_cls, "__init__": __init__})
    config_cls.__module__ = model_cls.__module__ = __name__
    return config_cls, model_cls


# One pair per supported family; config.json's auto_map names the pair of its family.
StructPrunedLlamaConfig, StructPrunedLlamaForCausalLM = _pruned_pair(
    LlamaConfig, LlamaForCausalLM, "structprune_llama", _LLAMA_LIKE, "Llama")
StructPrunedMistralConfig, StructPrunedMistralForCausalLM = _pruned_pair(
    MistralConfig, MistralForCausalLM, "structprune_mistral", _LLAMA_LIKE, "Mistral")
StructPrunedQwen2Config, StructPrunedQwen2ForCausalLM = _pruned_pair(
    Qwen2Config, Qwen2ForCausalLM, "structprune_qwen2", _LLAMA_LIKE, "Qwen2")
StructPrunedQwen3Config, StructPrunedQwen3ForCausalLM = _pruned_pair(
    Qwen3Config, Qwen3ForCausalLM, "structprune_qwen3", _LLAMA_LIKE, "Qwen3")
StructPrunedGemma3TextConfig, StructPrunedGemma3TextForCausalLM = _pruned_pair(
    Gemma3TextConfig, Gemma3ForCausalLM, "structprune_gemma3_text", _LLAMA_LIKE, "Gemma3Text")
StructPrunedOPTConfig, StructPrunedOPTForCausalLM = _pruned_pair(
    OPTConfig, OPTForCausalLM, "structprune_opt", _OPT, "OPT")

# base model_type -> (config class name, model class name) for config.json's auto_map
CLASSES = {
    "llama": ("StructPrunedLlamaConfig", "StructPrunedLlamaForCausalLM"),
    "mistral": ("StructPrunedMistralConfig", "StructPrunedMistralForCausalLM"),
    "qwen2": ("StructPrunedQwen2Config", "StructPrunedQwen2ForCausalLM"),
    "qwen3": ("StructPrunedQwen3Config", "StructPrunedQwen3ForCausalLM"),
    "gemma3_text": ("StructPrunedGemma3TextConfig", "StructPrunedGemma3TextForCausalLM"),
    "opt": ("StructPrunedOPTConfig", "StructPrunedOPTForCausalLM"),
}
