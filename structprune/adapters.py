"""Architecture adapters: the only place that knows module names of a model family.

An adapter names, for one family, where the decoder layers are, which linear maps make up a head
and an MLP channel, and which attributes must follow a change of head count. Everything else in
the library (streaming, solver, surgery, allocation) works through this interface, so adding a
family means adding one `AdapterSpec` here. The spec also holds what the rest of the library
needs to know about a family without a model in memory: its norm kind and position embeddings
(the memory formulas of memory.py), its dense layer layout and the parameters outside its layers
from a config (the estimator, footprint.py), and whether plain `transformers` loads a pruned
checkpoint of it (checkpoint.py). No other module branches on a family.

Head layout rules (docs/METHOD.md, "Units, costs, budget"):
- grouped-query attention (H query heads, H_kv < H KV heads): a unit is one query head; a layer
  keeps the same number of query heads in every KV group; k/v rows stay.
- multi-head attention (H_kv == H): a unit is one head together with its k/v rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedArchitectureError


NORMS = ("rmsnorm", "layernorm")


@dataclass(frozen=True)
class AdapterSpec:
    """Module names of one family, relative to the decoder layer (dotted paths), and the family's
    properties that other modules depend on (memory formulas, the estimator, checkpoints)."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # path from the CausalLM to the ModuleList of decoder layers
    base: str  # path to the module whose forward runs embeddings + all layers
    final: tuple[str, ...]  # modules applied after the last layer, in order (None entries skipped)
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # rows removed with a channel (gate/up, or fc1)
    mlp_out: str  # columns removed with a channel (down, fc2)
    norm: str  # "rmsnorm" | "layernorm": the kind of every norm (what memory.py's formulas branch on)
    learned_positions: bool  # position embeddings are a learned table (else rotary, in the layers)
    plain_loadable: bool  # transformers loads a pruned checkpoint from a rewritten config (checkpoint.py)
    # from a config alone (no weights; footprint.py):
    dense_layout: Callable[[Any], LayerLayout]  # the layout of every layer before pruning
    embedding_params: Callable[[Any], int]  # the base outside the layers (what `LayerStream.embed` moves)
    lm_head_params: Callable[[Any], int]  # final modules + LM head (what `LayerStream.logits_nll` moves)
    attn: str = "self_attn"
    # attention attributes that hold the head counts (set after surgery), by meaning
    heads_attr: str | None = None  # number of query heads, if the module keeps it
    kv_groups_attr: str | None = "num_key_value_groups"
    lm_head: str = "lm_head"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")


# --- what a config says, per family ------------------------------------------------------------


def _llama_dense_layout(config) -> LayerLayout:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return LayerLayout(hidden, heads, kv, head_dim, config.intermediate_size, True,
                       bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False)))


def _llama_embedding_params(config) -> int:
    """Token embeddings and the final norm."""
    h = config.hidden_size
    return config.vocab_size * h + h


def _llama_lm_head_params(config) -> int:
    """The final norm and the LM head."""
    h = config.hidden_size
    return h + config.vocab_size * h


def _opt_dense_layout(config) -> LayerLayout:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    bias = bool(getattr(config, "enable_bias", True))
    return LayerLayout(hidden, heads, heads, hidden // heads, config.ffn_dim, False, bias, bias)


def _opt_extras(config) -> tuple[int, int]:
    """OPT: (final layer norm params, one projection's params) around the layers."""
    h, wep = config.hidden_size, config.word_embed_proj_dim
    final = 2 * h if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False) else 0
    return final, (h * wep if wep != h else 0)


def _opt_embedding_params(config) -> int:
    """Token and (learned, offset 2) position embeddings, the final layer norm, project_in / out."""
    final, proj = _opt_extras(config)
    return (config.vocab_size * config.word_embed_proj_dim + (config.max_position_embeddings + 2) * config.hidden_size
            + final + 2 * proj)


def _opt_lm_head_params(config) -> int:
    """The final layer norm, project_out and the LM head."""
    final, proj = _opt_extras(config)
    return final + proj + config.vocab_size * config.word_embed_proj_dim


_LLAMA_LIKE = dict(
    layers="model.layers",
    base="model",
    final=("model.norm",),
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    norm="rmsnorm",
    learned_positions=False,
    plain_loadable=True,
    dense_layout=_llama_dense_layout,
    embedding_params=_llama_embedding_params,
    lm_head_params=_llama_lm_head_params,
)

SPECS: tuple[AdapterSpec, ...] = (
    AdapterSpec(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), **_LLAMA_LIKE),
    AdapterSpec(family="gemma3", model_types=("gemma3_text", "gemma3"), **_LLAMA_LIKE),
    AdapterSpec(
        family="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        base="model.decoder",
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        norm="layernorm",
        learned_positions=True,
        plain_loadable=False,  # OPT derives its head size from hidden / heads
        dense_layout=_opt_dense_layout,
        embedding_params=_opt_embedding_params,
        lm_head_params=_opt_lm_head_params,
        heads_attr="num_heads",
        kv_groups_attr=None,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for s in SPECS for t in s.model_types)


@dataclass(frozen=True)
class LayerLayout:
    """Shapes of one decoder layer's prunable structure."""

    hidden: int
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int
    intermediate: int  # MLP channels
    gated: bool  # gate/up (3 matrices per channel) vs fc1/fc2
    attn_bias: bool
    mlp_bias: bool

    @property
    def mha(self) -> bool:
        """Multi-head attention: each head has its own k/v rows, removed with it."""
        return self.n_kv_heads == self.n_heads

    @property
    def head_params(self) -> int:
        """Parameters removed with one query head (q rows + o columns, k/v too for MHA)."""
        per = 2 * self.hidden * self.head_dim + (self.head_dim if self.attn_bias else 0)
        if self.mha and self.n_heads > 0:
            per += 2 * (self.hidden * self.head_dim + (self.head_dim if self.attn_bias else 0))
        return per

    @property
    def channel_params(self) -> int:
        """Parameters removed with one MLP channel: 3d (gated) or 2d+1 (fc1 bias)."""
        return (3 if self.gated else 2) * self.hidden + (1 if self.mlp_bias else 0)

    @property
    def head_step(self) -> int:
        """Query heads removed together: one per KV group (1 for MHA)."""
        return 1 if self.mha else self.n_kv_heads


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


class Adapter:
    """Access to one model's decoder layers through its family's `AdapterSpec`."""

    def __init__(self, spec: AdapterSpec, config) -> None:
        self.spec = spec
        self.config = config

    # --- the whole model -------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.spec.layers)

    def base(self, model: nn.Module) -> nn.Module:
        return _get(model, self.spec.base)

    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in (_get(model, p) for p in self.spec.final) if m is not None]

    def lm_head(self, model: nn.Module) -> nn.Module:
        return _get(model, self.spec.lm_head)

    # --- one layer -------------------------------------------------------------------------
    def module(self, layer: nn.Module, role: str) -> nn.Linear:
        """role: 'q' | 'k' | 'v' | 'o' | 'mlp_out' | 'mlp_in0' | 'mlp_in1'."""
        if role.startswith("mlp_in"):
            return _get(layer, self.spec.mlp_in[int(role[-1])])
        return _get(layer, getattr(self.spec, role))

    def out_proj(self, layer: nn.Module, kind: str) -> nn.Linear:
        """The output projection of a module: kind 'attn' -> o, 'mlp' -> down/fc2."""
        return self.module(layer, "o" if kind == "attn" else "mlp_out")

    def layout(self, layer: nn.Module) -> LayerLayout:
        s = self.spec
        q, k, o = _get(layer, s.q), _get(layer, s.k), _get(layer, s.o)
        head_dim = _get(layer, s.attn).head_dim
        mlp_in0 = _get(layer, s.mlp_in[0])
        return LayerLayout(
            hidden=o.out_features,
            n_heads=q.out_features // head_dim,
            n_kv_heads=k.out_features // head_dim,
            head_dim=head_dim,
            intermediate=mlp_in0.out_features,
            gated=len(s.mlp_in) == 2,
            attn_bias=q.bias is not None,
            mlp_bias=mlp_in0.bias is not None,
        )

    def head_columns(self, layout: LayerLayout) -> torch.Tensor:
        """(H, head_dim) column indices of o_proj's input that belong to each query head."""
        return torch.arange(layout.n_heads * layout.head_dim).view(layout.n_heads, layout.head_dim)

    def head_blocks(self, layout: LayerLayout) -> torch.Tensor | None:
        """(H,) KV group of each query head under GQA (heads of a group are contiguous)."""
        if layout.mha:
            return None
        per_group = layout.n_heads // layout.n_kv_heads
        return torch.arange(layout.n_heads) // per_group

    # --- surgery ---------------------------------------------------------------------------
    def keep_heads(self, layer: nn.Module, kept: torch.Tensor) -> None:
        """Physically keep only query heads `kept` (sorted ids). Under GQA the kept heads must be
        equally many per KV group (k/v stay); under MHA k/v rows go with their heads."""
        lay = self.layout(layer)
        kept = kept.sort().values
        hd = lay.head_dim
        rows = (kept[:, None] * hd + torch.arange(hd)).reshape(-1)
        s = self.spec
        _set(layer, s.q, _slice_linear(_get(layer, s.q), rows=rows))
        _set(layer, s.o, _slice_linear(_get(layer, s.o), cols=rows))
        if lay.mha:
            _set(layer, s.k, _slice_linear(_get(layer, s.k), rows=rows))
            _set(layer, s.v, _slice_linear(_get(layer, s.v), rows=rows))
            n_kv = len(kept)
        else:
            blocks = self.head_blocks(lay)[kept]
            counts = torch.bincount(blocks, minlength=lay.n_kv_heads)
            if counts.min() != counts.max():
                raise ValueError(f"kept heads must be equal per KV group, got {counts.tolist()}")
            n_kv = lay.n_kv_heads
        attn = _get(layer, s.attn)
        if s.heads_attr:
            setattr(attn, s.heads_attr, len(kept))
        if s.kv_groups_attr:
            setattr(attn, s.kv_groups_attr, max(1, len(kept) // max(n_kv, 1)))

    def keep_channels(self, layer: nn.Module, kept: torch.Tensor) -> None:
        """Physically keep only MLP channels `kept` (sorted ids)."""
        kept = kept.sort().values
        for path in self.spec.mlp_in:
            _set(layer, path, _slice_linear(_get(layer, path), rows=kept))
        _set(layer, self.spec.mlp_out, _slice_linear(_get(layer, self.spec.mlp_out), cols=kept))


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the given rows (outputs) / columns (inputs) of `lin`."""
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        rows = rows.to(w.device)
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def set_output_bias(lin: nn.Linear, bias: torch.Tensor | None) -> None:
    """Give `lin` this bias (creating the parameter if the layer had none)."""
    if bias is None:
        return
    bias = bias.to(lin.weight.dtype).to(lin.weight.device)
    if lin.bias is None:
        lin.bias = nn.Parameter(bias.clone())
    else:
        lin.bias.data.copy_(bias)


def adapter_for(model_or_config) -> Adapter:
    """The adapter of a model (or config); fails before any work for unknown architectures."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return Adapter(spec, config)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


def config_layout(config) -> LayerLayout:
    """The dense layer layout a config describes (every layer alike before pruning)."""
    return adapter_for(config).spec.dense_layout(config)  # unsupported architectures fail here
