"""Greedy group-OBS selection for the per-module subproblem (notation and damping: ``problem``):
``solve_module``'s default selector and ADMM's default initialization. Imports ``problem`` only."""

from __future__ import annotations

import torch
from torch import Tensor

from ..cancel import check as check_cancel
from .problem import (
    DAMP_REL,
    block_quota,
    check_finite,
    obs_saliency,
    prepare,
    spd_inverse,
    take_inverse,
)


def greedy_obs_select(Wt: Tensor, G: Tensor, groups: Tensor, k_keep: int,
                      blocks: Tensor | None = None, per_step: int = 1, allow_bias: bool = True,
                      damp_rel: float = DAMP_REL) -> Tensor:
    """Backward elimination by group OBS: remove the unit(s) with the smallest
    tr(W_J [Hinv_JJ]^-1 W_J^T), then update ``W -= W_J Hinv_JJ^-1 Hinv_J,:`` and
    ``Hinv -= Hinv_:,J Hinv_JJ^-1 Hinv_J,:`` (Hinv = Gd^-1). Only blocks above their quota lose
    units. ``per_step`` units leave per update (cheaper for 10k channels, slightly worse).
    Returns the kept unit ids, sorted: LongTensor (k_keep,)."""
    p = prepare(Wt, G, groups, blocks, allow_bias, damp_rel)
    quota = block_quota(p, k_keep)
    if per_step < 1:
        raise ValueError(f"per_step must be >= 1, got {per_step}")
    # (d, m'), compensated as units leave; m' shrinks by compaction. p.W is already a private
    # copy unless Wt was in the solve dtype (then p.W is Wt or a view of it)
    shared = p.W.untyped_storage().data_ptr() == Wt.untyped_storage().data_ptr()
    W, p.W = (p.W.clone() if shared else p.W), None
    Hinv = take_inverse(p)  # (m', m'), zero rows/cols for removed columns
    cols = p.groups.clone()  # (U, g) positions of each unit's columns in W / Hinv
    single = cols.shape[1] == 1  # channels: saliency from incrementally kept column norms
    sq = W.pow(2).sum(0) if single else None  # (m',) squared column norms of W
    alive = torch.ones(p.n_units, dtype=torch.bool, device=W.device)
    left = torch.bincount(p.block_of, minlength=p.n_blocks).tolist()  # units alive per block
    block_of = p.block_of.tolist()
    n_alive, dead_cols = p.n_units, 0
    while n_alive > k_keep:
        check_cancel()  # one check per removal step (a wide MLP takes hundreds)
        live = alive.nonzero().squeeze(1)
        sal = torch.full((p.n_units,), float("inf"), dtype=W.dtype, device=W.device)
        if single:
            c = cols[live, 0]
            sal[live] = sq[c] / Hinv.diagonal()[c]
        else:
            sal[live] = obs_saliency(W, Hinv, cols[live])
        picked, want = [], min(per_step, n_alive - k_keep)
        for u in sal.argsort()[:n_alive].tolist():  # alive units, cheapest first
            b = block_of[u]
            if left[b] > quota:
                picked.append(u)
                left[b] -= 1
                if len(picked) == want:
                    break
        J = cols[picked].reshape(-1)  # (|J|,)
        HJJ_inv = spd_inverse(Hinv[J][:, J], "Hinv block of the removed units")
        HJ = Hinv[J, :]  # (|J|, m')
        a = W[:, J] @ HJJ_inv  # (d, |J|)
        if single:  # ||W_i - a HJ_i||^2 = ||W_i||^2 - 2 HJ_i.(a^T W_i) + HJ_i^T a^T a HJ_i
            sq += -2.0 * ((a.T @ W) * HJ).sum(0) + ((a.T @ a @ HJ) * HJ).sum(0)
        W.addmm_(a, HJ, alpha=-1.0)  # in place: the (m', m') update below dominates
        Hinv.addmm_(HJ.T, HJJ_inv @ HJ, alpha=-1.0)
        W[:, J] = 0.0
        Hinv[J, :] = 0.0
        Hinv[:, J] = 0.0
        alive[picked] = False
        n_alive -= len(picked)
        dead_cols += J.numel()
        if dead_cols * 8 >= W.shape[1] and n_alive > k_keep:  # compact: drop removed columns
            keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
            dead = cols[~alive].reshape(-1)
            keep[dead[dead >= 0]] = False
            new_pos = keep.long().cumsum(0) - 1  # old position -> new position
            idx = keep.nonzero().squeeze(1)
            W, Hinv = W[:, idx], Hinv[idx[:, None], idx[None, :]]  # one copy, not two
            cols = torch.where(alive[:, None], new_pos[cols], -1)
            sq = W.pow(2).sum(0) if single else None  # also resets rounding drift
            dead_cols = 0
    check_finite("greedy OBS weights", W)
    return alive.nonzero().squeeze(1)
