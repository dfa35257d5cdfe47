"""The interface a pruning method implements."""

from __future__ import annotations

import numpy as np
import torch

from ..adapters import LayerLayout
from ..allocation import Allocation, ModuleSpec, allocate_owl, allocate_uniform
from ..config import PruneConfig
from ..gram import TokenWeights, relative_weights
from ..pipeline import LayerStats, ModuleResult


class Method:
    """Defaults: uniform allocation, no sensitivity pass. Subclasses override what differs."""

    name = "base"
    needs_calibration = True  # False: scores from weights only (magnitude)
    whole_model = False  # True: not layer-wise (global-taylor); runs its own `prune_whole`
    solves = False  # True: scores and rules run OBS solves (their device memory is accounted)

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg

    def score(self, kind: str, W: torch.Tensor, b: torch.Tensor | None, G: torch.Tensor, lay: LayerLayout) -> torch.Tensor:
        """(U,) unit scores from pass 1, lower = pruned first."""
        raise NotImplementedError

    def rule(self, kind: str, layer: int, W, b, G, lay: LayerLayout, k_keep: int) -> ModuleResult:
        """Which units of a module to keep and its new output-projection weights."""
        raise NotImplementedError

    def wants_sensitivity(self) -> bool:
        return False

    def relative_grams(self) -> bool:
        """Whether pass 1 and pass 2 weigh tokens by their residual stream (gram.py); the
        baselines keep their published, unweighted statistics."""
        return False

    def token_weights(self) -> TokenWeights | None:
        """The Grams' token weights, (y, residual) -> (T,), or None for plain Grams. The extension
        point for other weightings: a subclass returns its own function (benchmarks/ablations.py)."""
        return relative_weights if self.relative_grams() else None

    def allocate(self, specs: list[ModuleSpec], stats: list[LayerStats]) -> tuple[Allocation, dict]:
        """The allocation and what it was computed from (energies), for the record."""
        cfg = self.cfg
        if cfg.allocation == "owl":
            d = np.array([st.outlier_ratio for st in stats])
            return allocate_owl(specs, d, cfg.sparsity, lam=cfg.owl_lambda, s_max=cfg.s_max), {
                "kind": "owl-outlier-ratio", "layer_values": d.tolist()}
        return allocate_uniform(specs, cfg.sparsity, s_max=cfg.s_max), {}
