"""Helpers shared by the baselines (baselines.py) and global-taylor (global_taylor.py): what a unit's
parameters sum to, the per-KV-group top-k that keeps equally many heads per group, the group-aligned
costs that make `allocate_threshold` remove what that selection removes, and the allocation's scheme
label. No method lives here: every method module imports this one, never the other way round."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters import Adapter, LayerLayout
from ..allocation import Allocation
from ..solver import topk_per_block
from ..units import unit_groups


def unit_parameter_sums(adapter: Adapter, layer: nn.Module, lay: LayerLayout, kind: str, value) -> Tensor:
    """Per unit, the sum of ``value(p)`` (an elementwise tensor shaped like parameter p) over all
    of the unit's parameters: a head's q rows (+ k/v rows under MHA) with their biases and its o
    columns; a channel's gate/up (fc1) rows with their biases and its down (fc2) column.
    Returns float64 (U,) on the layer's device."""
    if kind == "attn":
        H, hd = lay.n_heads, lay.head_dim
        total = 0
        for role in ("q", "k", "v") if lay.mha else ("q",):
            lin = adapter.module(layer, role)
            total = total + value(lin.weight).double().view(H, hd, -1).sum((1, 2))  # rows of head h
            if lin.bias is not None:
                total = total + value(lin.bias).double().view(H, hd).sum(1)
        o = adapter.module(layer, "o")
        return total + value(o.weight).double().view(o.out_features, H, hd).sum((0, 2))  # o columns
    down = adapter.module(layer, "mlp_out")
    total = value(down.weight).double().sum(0)  # (I,) columns of down / fc2
    for j in range(len(adapter.spec.mlp_in)):
        lin = adapter.module(layer, f"mlp_in{j}")
        total = total + value(lin.weight).double().sum(1)  # (I,) rows of gate / up / fc1
        if lin.bias is not None:
            total = total + value(lin.bias).double()
    return total


def unit_blocks(lay: LayerLayout, kind: str) -> tuple[Tensor, int]:
    """(U,) KV group of each unit and the number of groups (1 for MLPs and MHA)."""
    _, blocks = unit_groups(lay, kind)
    n_units = lay.n_heads if kind == "attn" else lay.intermediate
    if blocks is None:
        return torch.zeros(n_units, dtype=torch.long), 1
    return blocks, lay.n_kv_heads


def keep_top(scores: Tensor, lay: LayerLayout, kind: str, k_keep: int) -> Tensor:
    """The ``k_keep`` highest-scoring units, equally many per KV group; sorted ids (k_keep,)."""
    block_of, n_blocks = unit_blocks(lay, kind)
    if k_keep % n_blocks:
        raise ValueError(f"k_keep={k_keep} is not divisible by the {n_blocks} KV groups")
    return topk_per_block(scores.detach().double().cpu(), block_of, n_blocks, k_keep // n_blocks)


def group_aligned_costs(costs: np.ndarray, lay: LayerLayout, kind: str) -> np.ndarray:
    """Costs that make `allocate_threshold`'s chunks the ones the per-group selection removes.

    Under GQA a module loses one head per KV group at a time, the cheapest remaining head of each
    group; `allocate_threshold` prices a chunk as the mean of the module's ``step`` cheapest units
    overall. Giving every head the mean cost of the heads of equal rank in their groups makes the
    two agree exactly. Other modules: unchanged. costs: (U,) -> (U,)."""
    block_of, n_blocks = unit_blocks(lay, kind)
    if n_blocks == 1:
        return costs
    per_group = np.asarray(costs, dtype=np.float64).reshape(n_blocks, -1)  # heads of a group are contiguous
    order = np.argsort(per_group, axis=1, kind="stable")
    rank_mean = np.take_along_axis(per_group, order, axis=1).mean(0)  # (r,) non-decreasing
    out = np.empty_like(per_group)
    np.put_along_axis(out, order, np.broadcast_to(rank_mean, per_group.shape), axis=1)
    return out.reshape(-1)


def with_scheme(alloc: Allocation, scheme: str) -> Allocation:
    """The allocation labelled with the scheme that produced it (the record's `allocation_scheme`)."""
    return dataclasses.replace(alloc, scheme=scheme)
