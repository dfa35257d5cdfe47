"""One module's structured solve, step by step, for the Method page (docs/METHOD.md "ADMM").

`admm_stepthrough` streams a few calibration windows through the dense model up to one decoder
layer, takes the Gram matrix of that layer's attention (o_proj) or MLP (down_proj) input, and runs
the engine's own solver on it: one `solver.admm_select` run, whose `on_iteration` hands over the
support after every iteration (what a run capped at that many iterations ends on: no second
implementation of the update rules), its residual trace, and `solver.solve_module` with each
selector for the reconstruction error before and after the least-squares refit. The result is
JSON-ready (the run store caches it).

Progress: the stages of planning.stepthrough_stages ("prepare", "gram" per layer, "admm" per
iteration, "solves" per selector) as ProgressEvents to `on_event`; `cancel` is checked at each of
them and inside every loop below (cancel.py).
"""

from __future__ import annotations

import copy
import time

import torch

from .adapters import adapter_for
from .allocation import allocate_uniform
from .config import PruneConfig
from .data.calibration import calibration_ids
from .cancel import cancel_scope
from .engine import PruneEngine
from .pipeline import ProgressEvent
from .solver import admm_select, solve_module
from .units import layouts_of, module_specs, unit_groups

SCHEMA = "structprune.admm-stepthrough/1"
MAX_STEPS = 40  # ADMM iterations shown (it stops earlier once the support is stable)


def module_gram(loaded, layer: int, kind: str, calib_ids: torch.Tensor, on_event=None, cancel=None):
    """(W (d_out, n), b or None, G ((n+1)^2), layout) of one dense module, on the CPU, streamed by
    the engine through a copy of the model (the stream swaps layers in and out of its model)."""
    return _engine(loaded, on_event, cancel).module_gram(calib_ids, layer, kind)


def _engine(loaded, on_event=None, cancel=None) -> PruneEngine:
    model = copy.deepcopy(loaded.model).float().eval()
    return PruneEngine(model, "cpu", on_event=on_event, cancel=cancel)


def stepthrough_key(model: str, layer: int, kind: str, sparsity: float) -> str:
    """The run store's (and the shipped demo's) key of a step-through at the Method page's 8 x 256."""
    return f"stepthrough|{model}|{layer}|{kind}|{sparsity:g}|8x256"


def admm_stepthrough(loaded, layer: int = 3, kind: str = "attn", sparsity: float = 0.3,
                     calib_data: str = "sotu", nsamples: int = 8, seqlen: int = 256, seed: int = 0,
                     max_steps: int = MAX_STEPS, rho0_rel: float = 0.1, growth: float = 1.3,
                     on_event=None, cancel=None) -> dict:
    """The support of each ADMM iteration (from the one-shot saliency start, so it has room to
    move), the residual trace, and the refit's effect for each selector, on one module."""
    with cancel_scope(cancel):
        return _stepthrough(loaded, layer, kind, sparsity, calib_data, nsamples, seqlen, seed, max_steps,
                            rho0_rel, growth, on_event, cancel)


def _stepthrough(loaded, layer, kind, sparsity, calib_data, nsamples, seqlen, seed, max_steps, rho0_rel, growth,
                 on_event, cancel) -> dict:
    t0 = time.perf_counter()
    n_layers = loaded.model.config.num_hidden_layers
    if on_event is not None:
        on_event(ProgressEvent("prepare", -1, n_layers, 0.0, 0, 0, "copying the model"))
    cfg = PruneConfig(calib_data=calib_data, nsamples=nsamples, seqlen=seqlen, seed=seed)
    calib_ids = calibration_ids(cfg, loaded.tokenizer, loaded.model.config.vocab_size)
    engine = _engine(loaded, on_event, cancel)
    engine.emit("gram", -1, step=0, steps=layer + 1)
    W, b, G, lay = engine.module_gram(calib_ids, layer, kind)
    specs = module_specs(layouts_of(loaded.model, adapter_for(loaded.model)), cfg.align_channels)
    m = next(j for j, sp in enumerate(specs) if sp.layer == layer and sp.kind == kind)
    k_keep = int(allocate_uniform(specs, sparsity).units_kept[m])
    groups, blocks = unit_groups(lay, kind)
    bias = b if b is not None else W.new_zeros(W.shape[0])
    Wt = torch.cat([W.double(), bias.double()[:, None]], 1)  # (d_out, n+1)
    kw = dict(blocks=blocks, saliency="obs", init="saliency", keep_better=False, rho0_rel=rho0_rel, growth=growth)
    supports = []

    def seen(t: int, kept: torch.Tensor) -> None:  # t = 0: the saliency start
        supports.append(sorted(int(u) for u in kept))
        engine.emit("admm", -1, step=t, steps=max_steps)

    engine.emit("admm", -1, step=0, steps=max_steps)
    kept, trace = admm_select(Wt, G, groups, k_keep, max_iter=max_steps, on_iteration=seen, **kw)
    if not supports:  # nothing to choose (keep all or none): the support is the answer
        supports.append(sorted(int(u) for u in kept))
    errors = []
    energy = float(((Wt @ G.double()) * Wt).sum())  # tr(W~ G W~^T): the module's output energy
    selectors = ("saliency", "greedy", "admm")
    for j, selector in enumerate(selectors):
        engine.emit("solves", -1, selector, step=j, steps=len(selectors))
        sol = solve_module(W, b, G, groups, k_keep, blocks, selector=selector, saliency="obs")
        errors.append({"selector": selector, "err_no_refit": sol.error_dense_to_masked_no_refit,
                       "err_after_refit": sol.error_after_refit, "kept": sorted(int(u) for u in sol.kept)})
    engine.emit("done", -1)
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


__all__ = ["admm_stepthrough", "module_gram", "stepthrough_key", "support_rows", "MAX_STEPS"]
