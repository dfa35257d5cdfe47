"""``solve_module``: one output projection end to end: select the kept units (greedy group-OBS,
ADMM or one-shot saliency), refine them by swaps, refit. The top layer of ``structprune.solver``:
it imports ``problem``, ``greedy``, ``swaps`` and ``admm``, and none of them imports it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .admm import AdmmTrace, admm_select
from .greedy import greedy_obs_select
from .problem import (
    DAMP_REL,
    augmented_weights,
    block_quota,
    group_saliency,
    prepare,
    reconstruction_error,
    refit,
    topk_per_block,
)
from .swaps import local_search

log = logging.getLogger(__name__)

LOCAL_SWAPS = 8  # solve_module's default swap budget after greedy / ADMM (none after saliency)


@dataclass
class ModuleSolution:
    """Result of ``solve_module`` for one output projection."""

    kept: Tensor  # (k,) sorted kept unit ids
    W_new: Tensor  # (d_out, n) dtype of W; zero columns for removed units
    b_new: Tensor | None  # (d_out,); None iff allow_bias=False and the module had no bias
    error_dense_to_masked_no_refit: float  # loss of zeroing the removed columns, undamped G
    error_after_refit: float  # loss of (W_new, b_new), undamped G
    trace: AdmmTrace | None  # ADMM diagnostics (selector="admm") else None
    seconds: float  # wall time of the whole solve


def solve_module(W: Tensor, b: Tensor | None, G: Tensor, groups: Tensor, k_keep: int,
                 blocks: Tensor | None = None,
                 selector: Literal["admm", "greedy", "saliency"] = "greedy",
                 saliency: Literal["obs", "diag"] = "obs", refit_weights: bool = True,
                 allow_bias: bool = True, damp_rel: float = DAMP_REL,
                 local_swaps: int | None = None, per_step: int = 1, **admm_kw) -> ModuleSolution:
    """Choose ``k_keep`` of the U units of one output projection and refit the kept columns.

    W: (d_out, n), b: (d_out,) or None, G: (n+1, n+1) undamped augmented Gram, groups: (U, g),
    blocks: (U,) or None. ``selector``: ``greedy`` (group-OBS backward elimination),
    ``admm`` (see ``admm.admm_select``; ``admm_kw`` go there) or ``saliency`` (one-shot
    top-k by ``saliency``, no updates: the baselines' rule). ``local_swaps``: swap budget of
    ``swaps.local_search`` on the selection; None = ``LOCAL_SWAPS`` after greedy / ADMM and
    0 after saliency (baselines stay one-shot). ``per_step``: units removed per greedy update
    (raise it for modules with thousands of channels). Errors are undamped losses.
    """
    t0 = time.perf_counter()
    if selector not in ("admm", "greedy", "saliency"):
        raise ValueError(f"selector must be 'admm', 'greedy' or 'saliency', got {selector!r}")
    if saliency not in ("obs", "diag"):
        raise ValueError(f"saliency must be 'obs' or 'diag', got {saliency!r}")
    if W.dim() != 2:
        raise ValueError(f"W must be (d_out, n), got {tuple(W.shape)}")
    if b is not None and b.shape != (W.shape[0],):
        raise ValueError(f"b must be ({W.shape[0]},), got {tuple(b.shape)}")
    Wt = augmented_weights(W, b)  # every step below converts to the solve dtype anyway
    p = prepare(Wt, G, groups, blocks, allow_bias, damp_rel, gram=False)  # units and quota only
    quota = block_quota(p, k_keep)
    ids = torch.arange(p.n_units, device=W.device)
    trace = None
    if k_keep == p.n_units:  # nothing to remove: the original weights, exactly
        return ModuleSolution(ids, W.clone(), None if b is None else b.clone(), 0.0, 0.0, None,
                              time.perf_counter() - t0)
    kw = dict(allow_bias=allow_bias, damp_rel=damp_rel)
    if local_swaps is None:
        local_swaps = 0 if selector == "saliency" else LOCAL_SWAPS
    if selector == "greedy":
        kept = greedy_obs_select(Wt, G, groups, k_keep, blocks, per_step=per_step, **kw)
    elif selector == "admm":
        kept, trace = admm_select(Wt, G, groups, k_keep, blocks, saliency=saliency,
                                  per_step=per_step, **kw, **admm_kw)
    else:  # one-shot saliency top-k
        sal = group_saliency(Wt, G, groups, saliency, **kw)
        kept = topk_per_block(sal, p.block_of, p.n_blocks, quota)
    if local_swaps > 0:
        kept = local_search(Wt, G, groups, kept, blocks, max_swaps=local_swaps, **kw)
    masked = Wt.clone()
    keep_col = torch.zeros(Wt.shape[1], dtype=torch.bool, device=W.device)
    keep_col[p.groups[kept].reshape(-1)] = True
    keep_col[-1] = True  # the bias stays (masked baseline: simply zero the removed columns)
    masked[:, ~keep_col] = 0.0
    err_mask = reconstruction_error(Wt, masked, G)
    if refit_weights:
        del masked  # not needed next to the refit's buffers
        new = refit(Wt, G, kept, groups, **kw)
    else:
        new = masked
    err_new = reconstruction_error(Wt, new, G) if refit_weights else err_mask
    b_new = None
    if allow_bias or b is not None:
        b_new = new[:, -1].to((b if b is not None else W).dtype)
    seconds = time.perf_counter() - t0
    log.debug("solve_module %s: kept %d/%d units, error masked %.4e -> refit %.4e, %.2f s",
              selector, k_keep, p.n_units, err_mask, err_new, seconds)
    return ModuleSolution(kept, new[:, :-1].to(W.dtype), b_new, err_mask, err_new, trace, seconds)
