"""The published structured pruners StructPrune is measured against (docs/METHOD.md, "Baselines").

The four layer-wise baselines share the engine's two streaming passes: pass 1 (`collect_stats`)
scores units from the dense model's Grams, pass 2 (`prune_sequential`) prunes each module on the
inputs that the already-pruned layers produce. A comparison therefore differs only in the
scores, the allocation and what happens to the kept weights:

| method      | unit score                                      | allocation            | kept weights      |
|-------------|-------------------------------------------------|-----------------------|-------------------|
| `magnitude` | L2 norm of all the unit's weights               | uniform               | unchanged         |
| `wanda-sp`  | sum_i |W_ij| ||X_j||, summed over a head        | uniform               | unchanged         |
| `flap`      | WIFV ||W_:j||^2 Var(X_j), z-scored per module   | AL-AM global threshold| bias compensation |
| `owl`       | wanda-sp                                        | OWL outlier ratios    | unchanged         |

Scores come from the augmented Gram G of the output projection's input (gram.py):
diag G[:n] = E[x_j^2] and G[:n, n] = E[x_j], so ||X_j|| = sqrt(T G_jj) (the constant sqrt(T) is
dropped: it never changes a ranking) and Var(X_j) = G_jj - G_jn^2.

Each method fixes its own allocation (it is part of the method): `cfg.allocation` is ignored and
the record's `allocation_scheme` says which scheme ran.

Choices where the original code differs from this harness (documented, not hidden):
- Units are query heads, equally many kept per KV group (docs/METHOD.md); FLAP's GQA port prunes whole
  KV groups instead.
- Allocation uses pass-1 (dense) scores, but the units of a module are chosen, and FLAP's bias
  compensation computed, in pass 2 on the pruned model's inputs (like every method here). FLAP's
  reference computes all metrics and means on the dense model once.
- FLAP squares the attention metric before standardizing and scores a head by the mean of its
  columns' z-scores, as its reference code does; heads and channels are then compared by these
  standardized scores directly, parameters weighing in only through the budget (AL-AM).
- `magnitude` scores all of the unit's weights (q/o, k/v under MHA, gate/up/down, biases), per
  docs/METHOD.md; FLAP's `magnitude_sp` uses only the output projection's columns.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters import Adapter, LayerLayout
from ..allocation import Allocation, ModuleSpec, allocate_owl, allocate_threshold, allocate_uniform
from ..pipeline import LayerStats, ModuleResult
from ..solver import reconstruction_error
from ..units import unit_groups
from .base import Method
from .common import group_aligned_costs, keep_top, unit_parameter_sums, with_scheme

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the reconstruction error of a pruned module


def _wt(W: Tensor, b: Tensor | None) -> Tensor:
    """[W, b] in float64, (d_out, n+1)."""
    bias = b if b is not None else W.new_zeros(W.shape[0])
    return torch.cat([W.double(), bias.double()[:, None]], 1)


# ---------------------------------------------------------------------------------------------
# column scores from the Gram


def wanda_column_scores(W: Tensor, G: Tensor) -> Tensor:
    """Wanda's structured score of input column j: sum_i |W_ij| sqrt(E[x_j^2]).
    W: (d_out, n), G: (n+1, n+1) -> float64 (n,)."""
    return W.double().abs().sum(0) * G.diagonal()[:-1].double().clamp_min(0).sqrt()


def wifv_column_scores(W: Tensor, G: Tensor) -> Tensor:
    """FLAP's weighted input feature variance: ||W_:j||^2 (E[x_j^2] - E[x_j]^2).
    W: (d_out, n), G: (n+1, n+1) -> float64 (n,)."""
    G = G.double()
    var = (G.diagonal()[:-1] - G[:-1, -1].pow(2)).clamp_min(0)
    return W.double().pow(2).sum(0) * var


def _standardize(x: Tensor) -> Tensor:
    """z-score with the unbiased std, as FLAP; a constant vector gives zeros."""
    sd = x.std()
    if not bool(torch.isfinite(sd)) or float(sd) <= 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / sd


# ---------------------------------------------------------------------------------------------
# the methods


class _ColumnScoreBaseline(Method):
    """Keeps a module's highest-scoring units; the kept weights stay as they are (FLAP also
    shifts the bias). Subclasses define `unit_scores` and the allocation."""

    compensate_bias = False

    def unit_scores(self, kind: str, W: Tensor, G: Tensor, lay: LayerLayout) -> Tensor:
        raise NotImplementedError

    def score(self, kind, W, b, G, lay) -> Tensor:
        return self.unit_scores(kind, W, G, lay)

    def rule(self, kind, layer, W, b, G, lay, k_keep) -> ModuleResult:
        t0 = time.perf_counter()
        kept = keep_top(self.unit_scores(kind, W, G, lay), lay, kind, k_keep)
        groups, _ = unit_groups(lay, kind)
        removed = torch.ones(W.shape[1], dtype=torch.bool)
        removed[groups[kept].reshape(-1)] = False
        removed = removed.to(W.device)
        W_new = W.clone()
        W_new[:, removed] = 0
        b_new = None
        if self.compensate_bias:  # b' = b + W_:,R E[x_R]: the module's mean output is unchanged
            shift = W[:, removed].double() @ G[:-1, -1][removed].double()  # (d_out,)
            b_new = ((b.double() if b is not None else 0.0) + shift).to(W.dtype)
        Wt = _wt(W, b)
        err_masked = reconstruction_error(Wt, _wt(W_new, b), G)
        err_final = reconstruction_error(Wt, _wt(W_new, b_new if b_new is not None else b), G)
        info = {"err_no_refit": err_masked, "err_after_refit": err_final,
                "solve_s": round(time.perf_counter() - t0, 4)}
        return ModuleResult(kept.to(W.device), W_new, b_new, info)


class WandaSP(_ColumnScoreBaseline):
    """Structured Wanda (FLAP repo's `wanda_sp`): column scores summed per head; uniform."""

    name = "wanda-sp"

    def unit_scores(self, kind, W, G, lay) -> Tensor:
        groups, _ = unit_groups(lay, kind)
        return wanda_column_scores(W, G)[groups.to(W.device)].sum(1)

    def allocate(self, specs: list[ModuleSpec], stats: list[LayerStats]) -> tuple[Allocation, dict]:
        return allocate_uniform(specs, self.cfg.sparsity, s_max=self.cfg.s_max), {"kind": "uniform"}


class OWL(WandaSP):
    """wanda-sp scores with OWL's layer-wise sparsities from outlier ratios (pass 1, M = owl_m)."""

    name = "owl"

    def allocate(self, specs, stats) -> tuple[Allocation, dict]:
        cfg = self.cfg
        d = np.array([st.outlier_ratio for st in stats])
        alloc = allocate_owl(specs, d, cfg.sparsity, lam=cfg.owl_lambda, s_max=cfg.s_max)
        return alloc, {"kind": "owl-outlier-ratio", "layer_values": d.tolist(),
                       "owl_m": cfg.owl_m, "owl_lambda": cfg.owl_lambda}


class FLAP(_ColumnScoreBaseline):
    """FLAP (An et al. 2024): WIFV fluctuation, standardized per module, one global threshold
    over the pooled standardized scores with a parameter budget (AL-AM), bias compensation."""

    name = "flap"
    compensate_bias = True

    def unit_scores(self, kind, W, G, lay) -> Tensor:
        m = wifv_column_scores(W, G)
        if kind == "attn":
            m = m.pow(2)  # as FLAP's reference code (o_proj metric ** 2)
        groups, _ = unit_groups(lay, kind)
        return _standardize(m)[groups.to(W.device)].mean(1)

    def allocate(self, specs, stats) -> tuple[Allocation, dict]:
        costs = [group_aligned_costs(stats[sp.layer].scores[sp.kind].numpy(), stats[sp.layer].layout, sp.kind)
                 for sp in specs]
        alloc = allocate_threshold(specs, costs, self.cfg.sparsity, s_max=self.cfg.s_max)
        return with_scheme(alloc, "al-am"), {"kind": "flap-standardized-wifv"}


class Magnitude(Method):
    """L2 norm of all the unit's weights, uniform allocation; weights only (no calibration)."""

    name = "magnitude"
    needs_calibration = False

    def allocate(self, specs, stats) -> tuple[Allocation, dict]:
        return allocate_uniform(specs, self.cfg.sparsity, s_max=self.cfg.s_max), {"kind": "uniform"}

    @staticmethod
    def unit_norms(adapter: Adapter, layer: nn.Module, lay: LayerLayout, kind: str) -> Tensor:
        """(U,) float64 L2 norm of each unit's parameters."""
        return unit_parameter_sums(adapter, layer, lay, kind, lambda p: p.detach().double().pow(2)).sqrt()

    @torch.no_grad()
    def prune_weights_only(self, model: nn.Module, adapter: Adapter, keep: list[dict[str, int]]) -> list[dict]:
        """Removes, per module, the units with the smallest norms; one info dict per module."""
        infos = []
        for i, layer in enumerate(adapter.layers(model)):
            lay = adapter.layout(layer)
            for kind in ("attn", "mlp"):
                n_units = lay.n_heads if kind == "attn" else lay.intermediate
                k_keep = keep[i][kind]
                if k_keep >= n_units:
                    infos.append({"layer": i, "module": kind, "kept": n_units, "skipped": True})
                    continue
                t0 = time.perf_counter()
                kept = keep_top(self.unit_norms(adapter, layer, lay, kind), lay, kind, k_keep)
                if kind == "attn":
                    adapter.keep_heads(layer, kept)
                else:
                    adapter.keep_channels(layer, kept)
                infos.append({"layer": i, "module": kind, "kept": int(len(kept)),
                              "solve_s": round(time.perf_counter() - t0, 4)})
        return infos

