"""Unit costs and module energies from pass-1 statistics (docs/METHOD.md "Allocation across layers").

A unit's cost is a loss per parameter removed, so heads and channels compare on one scale:

- `module`:   saliency / the module's own output energy tr(W~ G W~^T)  (local; the prototype found
              it sends the most sensitive layers to 90%)
- `relative`: saliency x E[1 / ||h_t||^2], the expected change of each token's residual stream
              relative to its own size (what the next RMSNorm sees); i.e. saliency / the harmonic
              mean of ||h_t||^2, the typical token's energy
- `residual`: saliency / E||h||^2 of the residual stream the module writes into (the mean over
              tokens, which the attention-sink token dominates in the middle and late layers)
- `sensitivity`: measured calibration-loss increase (nats/token) when the module alone is pruned
              at the uniform target, spread over its units in proportion to their local saliency

A module's mean-field energy is the mean cost of the units it would lose at the uniform target
(the cheapest ceil(s n) units): the costs of units that are never pruned say nothing about
pruning there.
"""

from __future__ import annotations

import math

import numpy as np

from .allocation import ModuleSpec
from .pipeline import LayerStats

_EPS = 1e-12


def _stats_for(stats: list[LayerStats], spec: ModuleSpec) -> LayerStats:
    return stats[spec.layer]


def _cheapest_mean(costs: np.ndarray, s: float) -> float:
    k = max(1, math.ceil(s * len(costs)))
    return float(np.sort(costs)[:k].mean())


def unit_costs(stats: list[LayerStats], specs: list[ModuleSpec], energy: str, s: float) -> list[np.ndarray]:
    """Per module, the cost per parameter of removing each unit (lower = prune first)."""
    out = []
    for spec in specs:
        st = _stats_for(stats, spec)
        sal = st.scores[spec.kind].numpy().clip(min=0.0) / spec.unit_params
        if energy == "module":
            out.append(sal / max(st.out_energy[spec.kind], _EPS))
        elif energy == "residual":
            out.append(sal / max(st.residual_energy, _EPS))
        elif energy == "relative":
            if st.residual_energy_hm <= 0:
                raise ValueError("relative energies need the residual stream's per-token energies from pass 1")
            out.append(sal / st.residual_energy_hm)
        elif energy == "sensitivity":
            if spec.kind not in st.sensitivity:
                raise ValueError("sensitivity energies need pass 1 run with a sensitivity rule")
            measured = max(st.sensitivity[spec.kind], 0.0)
            pruned_params = max(1, math.ceil(s * spec.n_units)) * spec.unit_params
            per_param = measured / pruned_params
            local_mean = _cheapest_mean(sal, s)
            out.append(sal * (per_param / max(local_mean, _EPS)) + _EPS)
        else:
            raise ValueError(f"unknown energy {energy!r}")
    return out


def module_energies(stats: list[LayerStats], specs: list[ModuleSpec], energy: str, s: float) -> np.ndarray:
    """(M,) positive mean-field energy per module."""
    costs = unit_costs(stats, specs, energy, s)
    return np.array([max(_cheapest_mean(c, max(s, 1e-3)), _EPS) for c in costs])
