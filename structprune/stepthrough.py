"""One module's structured solve, step by step, for the Method page (METHOD.md "ADMM").

`admm_stepthrough` streams a few calibration windows through the dense model up to one decoder
layer, takes the Gram matrix of that layer's attention (o_proj) or MLP (down_proj) input, and runs
the engine's own solver on it: `solver_admm.admm_select` for the support at every iteration (the
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
from .gram import GramHook
from .solver import solve_module
from .solver_admm import admm_select
from .streaming import LayerStream
from .units import layouts_of, module_specs, unit_groups

SCHEMA = "structprune.admm-stepthrough/1"


def calibration_ids(loaded, calib_data: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) calibration windows; random tokens for tiny models without a tokenizer."""
    if loaded.tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, loaded.model.config.vocab_size, (nsamples, seqlen), generator=g)
    from .data.windows import calibration_windows, corpus_token_ids

    return calibration_windows(corpus_token_ids(loaded.tokenizer, calib_data, "calib"), nsamples, seqlen, seed)


@torch.no_grad()
def module_gram(loaded, layer: int, kind: str, calib_ids: torch.Tensor):
    """(W (d_out, n), b or None, G ((n+1)^2), layout) of one dense module, on the CPU. Streams a
    copy of the model (LayerStream swaps layers in and out of the model it is given)."""
    model = copy.deepcopy(loaded.model).float().eval()
    adapter = adapter_for(model)
    stream = LayerStream(model, adapter, "cpu")
    if not 0 <= layer < stream.n_layers:
        raise ValueError(f"layer must be in [0, {stream.n_layers - 1}] (got {layer})")
    x = stream.embed(calib_ids)
    for i in range(layer):
        with stream.layer_on_device(i) as lyr:
            x = stream.run_layer(i, lyr, x)
    with stream.layer_on_device(layer) as lyr:
        lin = adapter.out_proj(lyr, kind)
        with GramHook(lin, stop=True) as hook:
            stream.run_layer(layer, lyr, x, keep_outputs=False)
        W = lin.weight.detach().clone()
        b = None if lin.bias is None else lin.bias.detach().clone()
        lay = adapter.layout(lyr)
    return W, b, hook.gram, lay


def admm_stepthrough(loaded, layer: int = 3, kind: str = "attn", sparsity: float = 0.3,
                     calib_data: str = "sotu", nsamples: int = 8, seqlen: int = 256, seed: int = 0,
                     max_steps: int = 40, rho0_rel: float = 0.1, growth: float = 1.3) -> dict:
    """The support of each ADMM iteration (from the one-shot saliency start, so it has room to
    move), the residual trace, and the refit's effect for each selector, on one module."""
    t0 = time.perf_counter()
    W, b, G, lay = module_gram(loaded, layer, kind, calibration_ids(loaded, calib_data, nsamples, seqlen, seed))
    specs = module_specs(layouts_of(loaded.model, adapter_for(loaded.model)))
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


__all__ = ["admm_stepthrough", "module_gram", "calibration_ids", "support_rows"]
