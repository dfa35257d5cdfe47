"""Iterative refinements of a unit selection for the per-module subproblem: ADMM (METHOD.md,
"ADMM") and a swap local search. The shared notation, damping convention and helpers live in
``structprune.solver``.

    W' <- (Wt Gd + rho (Z - U)) (Gd + rho I)^-1     (Gd = Q diag(lam) Q^T, eigendecomposed once)
    Z  <- Proj_k(W' + U)    keep the k units (per-block quota) of largest saliency, zero the rest
    U  <- U + W' - Z
    rho <- min(rho * growth, rho_max)

``U`` is the *scaled* dual; when rho grows it is rescaled by rho_old / rho_new so the unscaled
multiplier rho * U is continuous (Boyd et al. 2011, sec. 3.4.1).

Initialization: Z0 = the exact refit on the greedy group-OBS support (``init="greedy"``) or on
the one-shot saliency top-k (``init="saliency"``), U0 = 0. The ADMM support is then compared
with the initial one by their exact refit loss and the better is returned (``keep_better``), so
ADMM never does worse than its initialization on the damped objective.

Measured on 50 brute-forced random problems (tests/test_solver.py): ADMM alone lands within 1%
of the optimum less often than greedy group-OBS (.86 vs .94 on the damped loss), for every
rho0 / growth / init / saliency tried; with ``keep_better`` it ties greedy, and the swap local
search lifts either to 1.0. Hence ``solve_module``'s default is greedy + local search; ADMM stays
available (``selector="admm"``) with its trace, at several times the cost (one eigh of Gd).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor

from structprune.solver import (
    DAMP_REL,
    _loss,
    _prepare,
    _quota,
    _cholesky,
    _inverse_from_factor,
    _refit_on,
    _spd_inverse,
    check_finite,
    greedy_obs_select,
    topk_per_block,
)

log = logging.getLogger(__name__)


@dataclass
class AdmmTrace:
    """Per-iteration diagnostics of one ``admm_select`` run (JSON-ready via ``to_dict``)."""

    rho: list[float] = field(default_factory=list)  # penalty used in the iteration
    primal_residual: list[float] = field(default_factory=list)  # ||W'-Z||_F / ||W'||_F
    dual_residual: list[float] = field(default_factory=list)  # rho ||Z-Z_prev||_F / ||W'||_F
    support_changes: list[int] = field(default_factory=list)  # units entering + leaving
    iterations: int = 0
    converged: bool = False  # stopped by the support/residual test, not by max_iter
    init: str = ""  # "greedy", "saliency", "given", or "trivial" (k_keep 0 or U: no iterations)
    loss_init: float = 0.0  # damped refit loss of the initial support
    loss_admm: float = 0.0  # damped refit loss of the final ADMM support
    kept_from: str = "admm"  # which support was returned: "admm" or "init"

    def to_dict(self) -> dict:
        return asdict(self)


def admm_select(Wt: Tensor, G: Tensor, groups: Tensor, k_keep: int,
                blocks: Tensor | None = None, saliency: Literal["obs", "diag"] = "obs",
                rho0_rel: float = 0.1, growth: float = 1.3, rho_max_rel: float = 1e6,
                max_iter: int = 200, tol: float = 1e-4, patience: int = 5,
                init_kept: Tensor | None = None, init: Literal["greedy", "saliency"] = "greedy",
                keep_better: bool = True, allow_bias: bool = True, damp_rel: float = DAMP_REL,
                per_step: int = 1) -> tuple[Tensor, AdmmTrace]:
    """Select ``k_keep`` units by ADMM. Wt: (d_out, n+1), G: (n+1, n+1) undamped, groups: (U, g),
    blocks: (U,) or None. rho0 and rho_max are relative to mean(diag G). ``init_kept`` (k,)
    overrides ``init``; ``per_step`` is passed to the greedy initialization.
    Returns (kept unit ids sorted (k_keep,), AdmmTrace)."""
    p = _prepare(Wt, G, groups, blocks, allow_bias, damp_rel)
    quota = _quota(p, k_keep)
    if not (rho0_rel > 0 and growth >= 1 and rho_max_rel >= rho0_rel and max_iter >= 0):
        raise ValueError("need rho0_rel > 0, growth >= 1, rho_max_rel >= rho0_rel, max_iter >= 0")
    trace = AdmmTrace()
    all_ids = torch.arange(p.n_units, device=p.W.device)
    if k_keep in (0, p.n_units):
        trace.converged, trace.init = True, "trivial"
        return all_ids[: k_keep], trace
    if init_kept is not None:
        kept = torch.as_tensor(init_kept, dtype=torch.long, device=p.W.device).sort().values
        counts = torch.bincount(p.block_of[kept], minlength=p.n_blocks)
        if kept.numel() != k_keep or not bool((counts == quota).all()):
            raise ValueError(f"init_kept must hold {quota} units of every block ({k_keep} in "
                             f"all), got {counts.tolist()}")
        trace.init = "given"
    elif init == "greedy":
        kept = greedy_obs_select(Wt, G, groups, k_keep, blocks, per_step, allow_bias, damp_rel)
        trace.init = "greedy"
    elif init == "saliency":
        kept = topk_per_block(_saliency_fn(p, saliency)(p.W), p.block_of, p.n_blocks, quota)
        trace.init = "saliency"
    else:
        raise ValueError(f"init must be 'greedy' or 'saliency', got {init!r}")
    kept0 = kept
    m = p.W.shape[1]
    lam, Q = torch.linalg.eigh(p.Gd)  # (m,), (m, m)
    sal_of = _saliency_fn(p, saliency, (lam, Q))
    AQ = (p.W @ Q) * lam  # (d, m): Wt Gd Q, i.e. Wt Gd in the eigenbasis
    scale = float(p.weight_diag().mean())
    rho, rho_max = rho0_rel * scale, rho_max_rel * scale
    Z = _refit_on(p, kept)  # (d, m)
    U = torch.zeros_like(Z)
    stable = 0
    for _ in range(max_iter):
        Wp = ((AQ + rho * (Z - U) @ Q) / (lam + rho)) @ Q.T  # (d, m)
        V = Wp + U
        new_kept = topk_per_block(sal_of(V), p.block_of, p.n_blocks, quota)
        Z_prev, Z = Z, V * _col_mask(p, new_kept, m)
        U = U + Wp - Z
        nW = float(Wp.norm()) or 1.0
        changes = int((_unit_mask(p, new_kept) ^ _unit_mask(p, kept)).sum())
        trace.rho.append(rho)
        trace.primal_residual.append(float((Wp - Z).norm()) / nW)
        trace.dual_residual.append(rho * float((Z - Z_prev).norm()) / nW)
        trace.support_changes.append(changes)
        trace.iterations += 1
        kept = new_kept
        stable = stable + 1 if changes == 0 else 0
        if stable >= patience and trace.primal_residual[-1] < tol:
            trace.converged = True
            break
        rho_new = min(rho * growth, rho_max)
        U *= rho / rho_new
        rho = rho_new
    check_finite("ADMM iterates", Z)
    trace.loss_init = _loss(p, _refit_on(p, kept0))
    trace.loss_admm = _loss(p, _refit_on(p, kept))
    if keep_better and trace.loss_init < trace.loss_admm:
        kept, trace.kept_from = kept0, "init"
    log.debug("admm_select: %d iterations, converged=%s, loss init %.4e admm %.4e -> %s",
              trace.iterations, trace.converged, trace.loss_init, trace.loss_admm,
              trace.kept_from)
    return kept, trace


def _unit_mask(p, kept: Tensor) -> Tensor:
    mask = torch.zeros(p.n_units, dtype=torch.bool, device=p.W.device)
    mask[kept] = True
    return mask


def _col_mask(p, kept: Tensor, m: int) -> Tensor:
    """(m,) float64 1 on the support of kept (bias column included when free), else 0."""
    mask = torch.zeros(m, dtype=p.W.dtype, device=p.W.device)
    mask[p.support(kept)] = 1.0
    return mask


def _saliency_fn(p, kind: str, eig: tuple[Tensor, Tensor] | None = None):
    """Saliency of every unit of a (d, m) matrix V -> (U,), with G-blocks precomputed; the
    (Gd^-1)_JJ blocks come from the eigendecomposition ``eig`` = (lam, Q) when given."""
    g = p.groups
    if kind == "diag":
        dg = p.weight_diag()[g].mean(1)  # (U,)
        return lambda V: V[:, g].pow(2).sum((0, 2)) * dg
    if kind != "obs":
        raise ValueError(f"saliency must be 'obs' or 'diag', got {kind!r}")
    if eig is None:
        HJJ = _spd_inverse(p.Gd, "damped G")[g[:, :, None], g[:, None, :]]  # (U, g, g)
    else:
        lam, Q = eig
        QJ = Q[g]  # (U, g, m)
        HJJ = torch.einsum("uam,m,ubm->uab", QJ, 1.0 / lam, QJ)  # (U, g, g) = (Gd^-1)_JJ
    if g.shape[1] == 1:
        hd = HJJ[:, 0, 0]  # (U,)
        return lambda V: V[:, g[:, 0]].pow(2).sum(0) / hd
    HJJ_inv = torch.linalg.inv(HJJ)  # (U, g, g)
    return lambda V: torch.einsum("dug,ugh,duh->u", V[:, g], HJJ_inv, V[:, g])


# --------------------------------------------------------------------------------------------
# swap refinement


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
    p = _prepare(Wt, G, groups, blocks, allow_bias, damp_rel)
    kept = torch.as_tensor(kept, dtype=torch.long, device=p.W.device).sort().values
    quota = _quota(p, kept.numel())
    if kept.numel() and not bool((torch.bincount(p.block_of[kept], minlength=p.n_blocks)
                                  == quota).all()):
        raise ValueError("kept does not hold the same number of units in every block")
    m = p.W.shape[1]
    is_kept = torch.zeros(p.n_units, dtype=torch.bool, device=p.W.device)
    is_kept[kept] = True
    S = p.support(kept)
    inv = None
    if S.numel():  # the kept block's inverse first, then the (m, m) buffer it is embedded in
        inv = _inverse_from_factor(_cholesky(p.Gd[S[:, None], S[None, :]], "damped G on the support"))
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
