"""Swap local search on a kept unit set for the per-module subproblem (notation and damping:
``problem``): the refinement ``solve_module`` applies after greedy or ADMM selection. Imports
``problem`` only."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..cancel import check as check_cancel
from .problem import DAMP_REL, block_quota, cholesky, inverse_from_factor, prepare

log = logging.getLogger(__name__)


def _swap_costs(Wp: Tensor, Hinv: Tensor, groups: Tensor, kept: Tensor, rem: Tensor,
                X: Tensor, Rg: Tensor, Minv: Tensor) -> Tensor:
    """OBS cost of removing kept unit i after adding removed unit j, for all pairs -> (q, r).
    After adding j: W2 = Wp + r_j Minv_j v_j^T, Hinv2 = Hinv + v_j Minv_j v_j^T with
    v_j = e_J - Hinv Gd_:,J (X = Hinv Gd_:,J: (m, r, g); Rg: (d, r, g); Minv: (r, g, g))."""
    v = -X  # (m, r, g)
    v[groups[rem], torch.arange(rem.numel(), device=X.device)[:, None],
      torch.arange(groups.shape[1], device=X.device)[None, :]] += 1.0
    K = groups[kept]  # (q, g)
    if groups.shape[1] == 1:  # channels: everything in closed form, vectorized over pairs
        a = Rg[:, :, 0] * Minv[:, 0, 0]  # (d, r)
        WK, vK = Wp[:, K[:, 0]], v[K[:, 0], :, 0]  # (d, q), (q, r)
        num = WK.pow(2).sum(0)[:, None] + 2 * vK * (WK.T @ a) + vK.pow(2) * a.pow(2).sum(0)
        return num / (Hinv.diagonal()[K[:, 0]][:, None] + vK.pow(2) * Minv[:, 0, 0])
    cost = torch.empty(kept.numel(), rem.numel(), dtype=Wp.dtype, device=Wp.device)
    for c in range(rem.numel()):  # heads: few units, loop over the added one
        vK = v[K, c, :]  # (q, g, g)
        W2 = Wp[:, K]  # (d, q, g) a copy; the update added in place (no third (d, q, g))
        W2 += torch.einsum("dg,gh,qkh->dqk", Rg[:, c], Minv[c], vK)
        H2 = Hinv[K[:, :, None], K[:, None, :]] + torch.einsum("qag,gh,qbh->qab", vK, Minv[c], vK)
        cost[:, c] = torch.einsum("dqa,qab,dqb->q", W2, torch.linalg.inv(H2), W2)
    return cost


def local_search(Wt: Tensor, G: Tensor, groups: Tensor, kept: Tensor,
                 blocks: Tensor | None = None, max_swaps: int = 8, candidates: int = 32,
                 allow_bias: bool = True, damp_rel: float = DAMP_REL) -> Tensor:
    """Swap refinement of a kept set: repeatedly apply the best (kept i, removed j, same block)
    swap that lowers the refit (damped) loss, at most ``max_swaps`` times. Each round ranks the
    removed units by the exact gain of adding them alone (after a prefilter to the best
    4 * ``candidates`` by a cheap lower bound when many are removed), takes the best
    ``candidates``, and for each evaluates every kept partner of its block in closed form (add j
    by a block-inverse update, then the OBS cost of removing i). A round costs about
    (m x m) @ (m x 4 * candidates * g) flops; set-up one inverse of the kept Gram block.
    Returns the new kept unit ids, sorted: LongTensor (k,)."""
    p = prepare(Wt, G, groups, blocks, allow_bias, damp_rel)
    kept = torch.as_tensor(kept, dtype=torch.long, device=p.W.device).sort().values
    quota = block_quota(p, kept.numel())
    if kept.numel() and not bool((torch.bincount(p.block_of[kept], minlength=p.n_blocks)
                                  == quota).all()):
        raise ValueError("kept does not hold the same number of units in every block")
    m = p.W.shape[1]
    is_kept = torch.zeros(p.n_units, dtype=torch.bool, device=p.W.device)
    is_kept[kept] = True
    S = p.support(kept)
    inv = None
    if S.numel():  # the kept block's inverse first, then the (m, m) buffer it is embedded in
        inv = inverse_from_factor(cholesky(p.Gd[S[:, None], S[None, :]], "damped G on the support"))
    Hinv = torch.zeros(m, m, dtype=p.W.dtype, device=p.W.device)  # Gd_SS^-1 embedded
    if inv is not None:
        Hinv[S[:, None], S[None, :]] = inv
        del inv
    Wp = p.W @ p.Gd @ Hinv  # (d, m) optimal weights on S, zero elsewhere
    Dw = p.W - Wp  # (d, m) the residual, once (two (d, m) temporaries fewer)
    base = float((Dw @ p.Gd).mul_(Dw).sum())
    del Dw
    swaps = 0
    while swaps < max_swaps and 0 < int(is_kept.sum()) < p.n_units:
        check_cancel()
        rem = (~is_kept).nonzero().squeeze(1)  # removed units
        Rg = (p.W - Wp) @ p.Gd[:, p.groups[rem].reshape(-1)]  # (d, r*g) loss gradient on R
        Rg = Rg.reshape(Rg.shape[0], rem.numel(), -1)  # (d, r, g)
        if rem.numel() > 4 * candidates:  # prefilter by the cheap lower bound r G_JJ^-1 r^T
            GJJ = p.Gd[p.groups[rem][:, :, None], p.groups[rem][:, None, :]]  # (r, g, g)
            bound = torch.einsum("drg,rgh,drh->r", Rg, torch.linalg.inv(GJJ), Rg)
            pre = bound.topk(4 * candidates).indices
            rem, Rg = rem[pre], Rg[:, pre]
        JR = p.groups[rem]  # (r, g)
        GdJ = p.Gd[:, JR.reshape(-1)]  # (m, r*g)
        X = (Hinv @ GdJ).reshape(m, *JR.shape)  # (m, r, g) = Hinv Gd_:,J
        M = p.Gd[JR[:, :, None], JR[:, None, :]] - torch.einsum(
            "mrg,mrh->rgh", GdJ.reshape(m, *JR.shape), X)  # (r, g, g) Schur complements
        del GdJ  # (m, r*g): not needed by the swap costs
        Minv = torch.linalg.inv(M)
        gain = torch.einsum("drg,rgh,drh->r", Rg, Minv, Rg)  # damped loss drop of adding j
        if rem.numel() > candidates:  # exact gains of the prefiltered; keep the best
            top = gain.topk(candidates).indices
            rem, Rg, X, Minv, gain = rem[top], Rg[:, top], X[:, top], Minv[top], gain[top]
        kept_ids = is_kept.nonzero().squeeze(1)  # (q,)
        cost = _swap_costs(Wp, Hinv, p.groups, kept_ids, rem, X, Rg, Minv)  # (q, r)
        cost[p.block_of[kept_ids][:, None] != p.block_of[rem][None, :]] = float("inf")
        delta_all = cost - gain[None, :]  # damped loss change of swapping (i out, j in)
        flat = int(delta_all.argmin())
        delta = float(delta_all.view(-1)[flat])
        if not delta < -1e-12 * base:
            break
        i, c = int(kept_ids[flat // rem.numel()]), flat % rem.numel()
        j = int(rem[c])
        # add j: block-inverse update; then remove i: block OBS
        v = -X[:, c, :]
        v[p.groups[j]] += torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
        # in place, fused (as greedy_obs_select): no (m, m) product next to Hinv and Gd
        Wp.addmm_(Rg[:, c] @ Minv[c], v.T)
        Hinv.addmm_(v @ Minv[c], v.T)
        I_ = p.groups[i]
        HII_inv = torch.linalg.inv(Hinv[I_][:, I_])
        HI = Hinv[I_, :]  # (g, m)
        Wp.addmm_(Wp[:, I_] @ HII_inv, HI, alpha=-1.0)
        Hinv.addmm_(Hinv[:, I_] @ HII_inv, HI, alpha=-1.0)
        del HI
        Wp[:, I_] = 0.0
        Hinv[I_, :] = 0.0
        Hinv[:, I_] = 0.0
        is_kept[j], is_kept[i] = True, False
        base += delta
        swaps += 1
        log.debug("local_search swap %d: +%d -%d, damped loss %+.3e -> %.6e", swaps, j, i,
                  delta, base)
    return is_kept.nonzero().squeeze(1)
