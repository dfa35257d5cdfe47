"""Structured units of a model: which heads and channels each module has and what they cost.

Prunable parameters are the parameters of units (docs/METHOD.md): per query head its q rows and o
columns (with MHA also its k/v rows), per MLP channel its gate/up/down (or fc1/fc2) slices. Under
grouped-query attention k/v are not part of any unit, so they are not counted as prunable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, LayerLayout
from .allocation import ModuleSpec
from .errors import InvalidConfigError

log = logging.getLogger(__name__)


def mlp_step(intermediate: int, align: int, layer: int = 0) -> int:
    """Channels an MLP gains or loses at a time so that it always keeps a multiple of `align`.

    A width that is a multiple of `align` (every released size of the supported families is a
    multiple of 128) steps by `align`; any other steps by gcd(align, width), the largest alignment
    it can keep exactly (logged). A width below `align` cannot keep a single aligned block."""
    if align > intermediate:
        raise InvalidConfigError(
            f"align_channels={align} is wider than the MLP of layer {layer} ({intermediate} channels); "
            f"use at most {intermediate}, or 1 for no alignment")
    step = math.gcd(align, intermediate)
    if step < align:
        log.info("MLP width %d is not a multiple of align_channels=%d; aligned to %d", intermediate, align, step)
    return step


def module_specs(layouts: list[LayerLayout], align: int = 1) -> list[ModuleSpec]:
    """Two allocation units per layer, attention then MLP, in layer order.

    Attention loses whole query heads, one per KV group at a time (GQA), so its projections keep
    multiples of head_dim columns (64 or 128 in the supported families) and every KV head stays;
    heads need no further alignment (the attention kernels work per head). The MLP steps by
    `align` channels (`mlp_step`) and keeps at least one step."""
    specs = []
    for i, lay in enumerate(layouts):
        specs.append(ModuleSpec(layer=i, kind="attn", n_units=lay.n_heads, unit_params=lay.head_params,
                                step=lay.head_step, min_keep=lay.head_step if not lay.mha else 1))
        step = mlp_step(lay.intermediate, align, i)
        specs.append(ModuleSpec(layer=i, kind="mlp", n_units=lay.intermediate,
                                unit_params=lay.channel_params, step=step, min_keep=step))
    return specs


def layouts_of(model: nn.Module, adapter: Adapter) -> list[LayerLayout]:
    return [adapter.layout(layer) for layer in adapter.layers(model)]


def unit_groups(lay: LayerLayout, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Columns of the output projection per unit (U, g) and the KV block of each unit (or None)."""
    if kind == "attn":
        groups = torch.arange(lay.n_heads * lay.head_dim).view(lay.n_heads, lay.head_dim)
        blocks = None if lay.mha else torch.arange(lay.n_heads) // (lay.n_heads // lay.n_kv_heads)
        return groups, blocks
    return torch.arange(lay.intermediate).view(-1, 1), None


@dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter of the model (embeddings, norms, head included; tied counted once)
    prunable: int  # parameters of units

    def to_dict(self) -> dict:
        return {"total": self.total, "prunable": self.prunable}


def count_params(model: nn.Module, adapter: Adapter) -> ParamCount:
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    prunable = sum(s.n_units * s.unit_params for s in module_specs(layouts_of(model, adapter)))
    return ParamCount(total, prunable)
