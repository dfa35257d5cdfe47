"""Saving a pruned model as a folder that plain transformers loads, and loading it back.

Pruned layers can differ in shape, which a family's own Hugging Face config cannot express. The
saved config.json keeps the model's own fields plus a `structprune` section with every layer's
shape (query heads, KV heads, MLP channels, which output projections gained a bias).

- Every layer alike and no bias added (and the family's config accepts the counts, see
  `AdapterSpec.plain_loadable`): the config's own head and channel counts are rewritten and the
  folder is a plain checkpoint of the family, no remote code.
- Otherwise the folder ships `modeling_structprune.py` (this package's file of that name, copied
  unchanged) and config.json names it in `auto_map` (model_type stays the family's):
  `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it without
  structprune (docs/EXPORT.md).

`load_pruned` reads either kind without remote code: it rebuilds the family's dense skeleton,
shrinks each layer to its recorded shape, then loads the weights. Folders are written atomically
with a completion mark (atomic.py), and both loaders here refuse a folder without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from . import modeling_structprune
from .adapters import adapter_for, set_output_bias
from .atomic import atomic_folder, check_complete
from .errors import ModelLoadError, UnsupportedArchitectureError
from .model_card import model_card

FORMAT_VERSION = 2  # 2: auto_map + modeling_structprune.py when shapes differ; completion mark
MODELING_FILE = "modeling_structprune.py"


def layer_shapes(model) -> list[dict]:
    ad = adapter_for(model)
    return [layer_shape(ad, layer) for layer in ad.layers(model)]


def layer_shape(adapter, layer) -> dict:
    """One decoder layer's shape as saved folders record it (`shrink_layer` gives a dense layer it)."""
    lay = adapter.layout(layer)
    return {
        "n_heads": lay.n_heads, "n_kv_heads": lay.n_kv_heads, "head_dim": lay.head_dim,
        "intermediate": lay.intermediate,
        "o_bias": adapter.out_proj(layer, "attn").bias is not None,
        "mlp_out_bias": adapter.out_proj(layer, "mlp").bias is not None,
    }


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


def _remote_code_config(folder: Path, base_type: str) -> None:
    """Points config.json at the shipped modeling file (auto_map). model_type stays the family's, so
    AutoConfig and AutoTokenizer read the folder without remote code (a custom model_type would make
    every AutoTokenizer call ask whether to run it)."""
    config_cls, model_cls = modeling_structprune.CLASSES[base_type]
    path = folder / "config.json"
    d = json.loads(path.read_text())
    d["architectures"] = [model_cls]
    module = Path(MODELING_FILE).stem
    d["auto_map"] = {"AutoConfig": f"{module}.{config_cls}", "AutoModelForCausalLM": f"{module}.{model_cls}"}
    path.write_text(json.dumps(d, indent=2, sort_keys=True, allow_nan=False))
    shutil.copyfile(modeling_structprune.__file__, folder / MODELING_FILE)


def save_pruned(model, tokenizer, folder: str | Path, provenance: dict | None = None, record: dict | None = None,
                overwrite: bool = False, write_weights=None) -> Path:
    """Writes weights (safetensors), config with per-layer shapes, the tokenizer, a model card
    (README.md, from `record` when given) and, when layers differ, the modeling file; atomically.
    An existing non-empty `folder` is refused unless `overwrite`. `write_weights(folder)` writes
    the weights and config.json instead of `model.save_pretrained` (a model whose weights stayed
    on disk: weights.streamed_weights)."""
    shapes = layer_shapes(model)
    config = model.config
    base_type = config.model_type
    plain = _plain_config(config, shapes)
    if plain is None and base_type not in modeling_structprune.CLASSES:
        raise UnsupportedArchitectureError(
            f"model type {base_type!r} with per-layer shapes cannot be exported for plain transformers; "
            f"supported: {', '.join(modeling_structprune.CLASSES)}")
    if plain is not None:
        model.config = config = plain
    config.structprune = {"format": FORMAT_VERSION, "layer_shapes": shapes, "provenance": provenance or {},
                          "plain_hf_loadable": plain is not None, "base_model_type": base_type}
    if plain is None:
        config.structprune["modeling_version"] = modeling_structprune.MODELING_VERSION
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (write_weights or model.save_pretrained)(tmp)
        if plain is None:
            _remote_code_config(tmp, base_type)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(record, shapes, plain is None, base_type))
    return Path(folder).expanduser()


def is_structprune_checkpoint(folder: str | Path) -> bool:
    cfg = Path(folder) / "config.json"
    if not cfg.exists():
        return False
    return "structprune" in json.loads(cfg.read_text())


def shrink_layer(adapter, layer, shape: dict) -> None:
    """Gives a dense layer (real or a skeleton on `meta`) the recorded shape; its weights are loaded after."""
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


def _base_config(folder: Path):
    """The family's own config class from config.json (remote-code fields dropped)."""
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    section = d.get("structprune")
    if not isinstance(section, dict) or "layer_shapes" not in section:
        raise ModelLoadError(f"{folder} is not a structprune model folder (config.json has no structprune section)")
    if section.get("format", 1) > FORMAT_VERSION:
        raise ModelLoadError(f"{folder} was written by a newer structprune (format {section['format']}); upgrade")
    base = section.get("base_model_type", d.get("model_type"))
    d.pop("auto_map", None)
    d["model_type"] = base
    return CONFIG_MAPPING[base].from_dict(d), section["layer_shapes"]


def load_pruned(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Loads a folder written by `save_pruned` (no remote code needed): (model, tokenizer or None)."""
    from safetensors.torch import load_file

    folder = check_complete(Path(folder).expanduser())
    config, shapes = _base_config(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    adapter = adapter_for(model)
    for layer, shape in zip(adapter.layers(model), shapes):
        shrink_layer(adapter, layer, shape)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.to(dtype).eval(), tok
