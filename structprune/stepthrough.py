"""One module's structured solve, step by step, for the Method page (docs/METHOD.md "ADMM").

`admm_stepthrough` streams a few calibration windows through the dense model up to one decoder
layer, takes the Gram matrix of that layer's attention (o_proj) or MLP (down_proj) input, and runs
the engine's own solver on it: `solver.admm_select` for the support at every iteration (the
solver is deterministic, so the support after t iterations is the result of a run capped at
t iterations: no second implementation of the update rules), its residual trace, and
`solver.solve_module` with each selector for the reconstruction error before and after the
least-squares refit. The result is JSON-ready (the run store caches it).
"""

from __future__ import annotations

import copy
import time

import torch

from .adapters import adapter_for
from .allocation import allocate_uniform
from .config import PruneConfig
from .data.calibration import calibration_ids
from .engine import PruneEngine
from .solver import admm_select, solve_module
from .units import layouts_of, module_specs, unit_groups

SCHEMA = "structprune.admm-stepthrough/1"


def module_gram(loaded, layer: int, kind: str, calib_ids: torch.Tensor, on_event=None, cancel=None):
    """(W (d_out, n), b or None, G ((n+1)^2), layout) of one dense module, on the CPU, streamed by
    the engine through a copy of the model (the stream swaps layers in and out of its model)."""
    model = copy.deepcopy(loaded.model).float().eval()
    return PruneEngine(model, "cpu", on_event=on_event, cancel=cancel).module_gram(calib_ids, layer, kind)


def stepthrough_key(model: str, layer: int, kind: str, sparsity: float) -> str:
    """The run store's (and the shipped demo's) key of a step-through at the Method page's 8 x 256."""
    return f"stepthrough|{model}|{layer}|{kind}|{sparsity:g}|8x256"


def admm_stepthrough(loaded, layer: int = 3, kind: str = "attn", sparsity: float = 0.3,
                     calib_data: str = "sotu", nsamples: int = 8, seqlen: int = 256, seed: int = 0,
                     max_steps: int = 40, rho0_rel: float = 0.1, growth: float = 1.3,
                     on_event=None, cancel=None) -> dict:
    """The support of each ADMM iteration (from the one-shot saliency start, so it has room to
    move), the residual trace, and the refit's effect for each selector, on one module."""
    t0 = time.perf_counter()
    cfg = PruneConfig(calib_data=calib_data, nsamples=nsamples, seqlen=seqlen, seed=seed)
    W, b, G, lay = module_gram(loaded, layer, kind, calibration_ids(cfg, loaded.tokenizer, loaded.model.config.vocab_size),
                               on_event=on_event, cancel=cancel)
    specs = module_specs(layouts_of(loaded.model, adapter_for(loaded.model)), cfg.align_channels)
    m = next(j for j, sp in enumerate(specs) if sp.layer == layer and sp.kind == kind)
    k_keep = int(allocate_uniform(specs, sparsity).units_kept[m])
    groups, blocks = unit_groups(lay, kind)
    bias = b if b is not None else W.new_zeros(W.shape[0])
    Wt = torch.cat([W.double(), bias.double()[:, None]], 1)  # (d_out, n+1)
    kw = dict(blocks=blocks, saliency="obs", init="saliency", keep_better=False, rho0_rel=rho0_rel, growth=growth)
    _, trace = admm_select(Wt, G, groups, k_keep, max_iter=max_steps, **kw)
    supports = []
    for t in range(trace.iterations + 1):  # t = 0: the saliency start
        kept, _ = admm_select(Wt, G, groups, k_keep, max_iter=t, **kw)
        supports.append(sorted(int(u) for u in kept))
    errors = []
    energy = float(((Wt @ G.double()) * Wt).sum())  # tr(W~ G W~^T): the module's output energy
    for selector in ("saliency", "greedy", "admm"):
        sol = solve_module(W, b, G, groups, k_keep, blocks, selector=selector, saliency="obs")
        errors.append({"selector": selector, "err_no_refit": sol.error_dense_to_masked_no_refit,
                       "err_after_refit": sol.error_after_refit, "kept": sorted(int(u) for u in sol.kept)})
    return {
        "schema": SCHEMA, "model": loaded.name, "layer": layer, "module": kind, "sparsity": sparsity,
        "calibration": {"calib_data": calib_data, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
        "n_units": int(groups.shape[0]), "k_keep": k_keep, "output_energy": energy,
        "kv_groups": None if blocks is None else int(blocks.max()) + 1,
        "supports": supports, "trace": trace.to_dict(), "errors": errors,
        "seconds": time.perf_counter() - t0,
    }


def support_rows(data: dict, upto: int | None = None) -> list[dict]:
    """Long rows (iteration, unit, kept 0/1) of a step-through's supports up to iteration `upto`."""
    supports = data["supports"][: (upto if upto is not None else len(data["supports"]) - 1) + 1]
    return [{"iteration": i, "unit": u, "kept": int(u in kept)}
            for i, kept in enumerate(map(set, supports)) for u in range(data["n_units"])]


__all__ = ["admm_stepthrough", "module_gram", "stepthrough_key", "support_rows"]
