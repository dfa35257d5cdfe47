"""global-taylor: LLM-Pruner-style first-order Taylor pruning with one global ranking, the O(N)
global reference of docs/METHOD.md.

The whole model sits on the compute device with its gradients: the gradient of the calibration
loss (mean next-token NLL over every calibration window, batch by batch, gradients accumulated) is
taken through all layers at once. A unit's importance is LLM-Pruner's first-order ("param_first")
term summed over the unit's parameters,

    I_u = sum_{w in unit u} |w * dL/dw|

(head: q rows, o columns, and k/v rows under MHA, with their biases; channel: gate/up (fc1) rows
with their biases and the down (fc2) column). No reconstruction.

How heads and channels compare (our choice; LLM-Pruner ranks within a layer by default): units
are ranked across all layers by importance *per parameter*, I_u / N_u, and pruned, cheapest
first, until the parameter budget is met (`allocate_threshold`: whole steps of one head per KV
group, s_max caps). Per parameter is the defensible scale: a head holds ~5x a channel's
parameters here, so raw sums would make heads look important merely for being large, and the
budget is in parameters.

Device memory: on CUDA the ledger measures it; on the CPU it is accounted as one item,
`footprint.global_taylor_bytes` (weights + gradients + saved activations of one batch + the loss's
fp32 logits, named terms in `footprint.global_taylor_terms`), so
`estimate_memory(config, "global-taylor", ...)` equals the accounted peak exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapter
from ..allocation import Allocation, ModuleSpec, allocate_threshold
from ..footprint import global_taylor_bytes, model_params
from ..pipeline import Emitter
from ..streaming import LayerStream
from .base import Method
from .common import group_aligned_costs, keep_top, unit_parameter_sums, with_scheme

log = logging.getLogger(__name__)


def calibration_loss_gradients(
    model: nn.Module,
    calib_ids: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """Moves `model` to `device` and accumulates into each parameter's ``.grad`` the gradient of
    L = (summed next-token NLL over all windows) / (tokens predicted); returns L (nats/token).

    calib_ids: (N, S). Positions 1..S-1 are predicted (docs/PROTOCOL.md). The model stays on `device`
    with its gradients; the caller frees them. on_batch(done, total) after every batch."""
    model.to(device)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    n, s = calib_ids.shape
    n_tokens = n * (s - 1)
    total = 0.0
    try:
        with torch.enable_grad():
            for start in range(0, n, batch_size):
                ids = calib_ids[start : start + batch_size].to(device)  # (B, S)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, S-1, V)
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                      reduction="sum")
                (nll / n_tokens).backward()
                total += float(nll.detach())
                del logits, nll
                if on_batch is not None:
                    on_batch(min(start + batch_size, n), n)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    loss = total / n_tokens
    if not math.isfinite(loss):
        raise FloatingPointError("the calibration loss is not finite")
    return loss


def _taylor(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        raise RuntimeError("a unit parameter has no gradient")
    return (p.detach() * p.grad).abs()


class GlobalTaylor(Method):
    name = "global-taylor"
    whole_model = True

    def allocate(self, specs: list[ModuleSpec], stats) -> tuple[Allocation, dict]:
        raise NotImplementedError("global-taylor allocates inside prune_whole")

    def prune_whole(
        self,
        model: nn.Module,
        adapter: Adapter,
        calib_ids: torch.Tensor,
        specs: list[ModuleSpec],
        stream: LayerStream,
        emit: Emitter,
    ) -> tuple[Allocation, dict, list[dict], dict]:
        """Gradients on the device, importances, global threshold, surgery on the host.
        Returns (allocation, energy info, one info dict per module, calibration losses)."""
        cfg = self.cfg
        ledger = stream.ledger
        layers = adapter.layers(model)
        layouts = [adapter.layout(layer) for layer in layers]
        nbytes = global_taylor_bytes(model.config, model_params(model.config), cfg.batch_size,
                                     calib_ids.shape[1], stream.dtype_bytes, nsamples=calib_ids.shape[0])
        ledger.hold("global", nbytes)
        t0 = time.perf_counter()
        try:
            loss = calibration_loss_gradients(
                model, calib_ids, stream.device, cfg.batch_size,
                on_batch=lambda done, n: emit("pass1", -1, f"gradients: {done}/{n} windows", step=done, steps=n))
            with torch.no_grad():
                importance = [{kind: unit_parameter_sums(adapter, layer, lay, kind, _taylor).cpu()
                               for kind in ("attn", "mlp")} for layer, lay in zip(layers, layouts)]
        finally:
            for p in model.parameters():
                p.grad = None
            model.to("cpu")
            ledger.release("global")
        grad_s = time.perf_counter() - t0

        per_param = [importance[sp.layer][sp.kind].numpy() / sp.unit_params for sp in specs]
        costs = [group_aligned_costs(c, layouts[sp.layer], sp.kind) for sp, c in zip(specs, per_param)]
        alloc = with_scheme(allocate_threshold(specs, costs, cfg.sparsity, s_max=cfg.s_max), "global-taylor")

        infos = []
        with torch.no_grad():
            for sp, k_prune in zip(specs, alloc.pruned_units):
                layer, lay = layers[sp.layer], layouts[sp.layer]
                imp = importance[sp.layer][sp.kind]
                if k_prune == 0:
                    infos.append({"layer": sp.layer, "module": sp.kind, "kept": sp.n_units, "skipped": True})
                else:
                    kept = keep_top(imp, lay, sp.kind, sp.n_units - int(k_prune))
                    removed = torch.ones(sp.n_units, dtype=torch.bool)
                    removed[kept] = False
                    if sp.kind == "attn":
                        adapter.keep_heads(layer, kept)
                    else:
                        adapter.keep_channels(layer, kept)
                    infos.append({"layer": sp.layer, "module": sp.kind, "kept": int(len(kept)),
                                  "importance_removed": float(imp[removed].sum()),
                                  "importance_total": float(imp.sum())})
                if sp.kind == "mlp":
                    emit("pass2", sp.layer)
        energy = {"kind": "taylor-importance-per-parameter", "gradient_s": round(grad_s, 3),
                  "values": [float(np.mean(c)) for c in per_param]}
        return alloc, energy, infos, {"dense": loss}

