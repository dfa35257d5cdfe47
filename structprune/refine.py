"""Block refit: after pass 2 has pruned a decoder layer (each output projection least-squares refit on
its own), fit all of the layer's remaining parameters together, through its nonlinearities, to what
the dense layer gives on the same inputs.

The per-module refit is exact but local: it cannot move q/k/v, the gate and up projections or the
norms, and it sees each module's error in isolation. Here the target is the dense layer's output on
the pruned stream's input (the block-level version of the "local" target; the dense model's own
activations over-fit, see the ablations), the loss each token's squared error relative to that
output's squared norm (the relative error of `gram.py`: the output *is* the residual stream the next
norm divides by), and the optimizer Adam, one calibration batch per step, its learning rate decayed
to 0 by a half cosine over all steps. The last eighth of the batches (at least one) is held out and
picks the best epoch; epoch 0 is the layer as pass 2 left it, so the fit never makes the held-out
error worse. One layer, its dense copy and the optimizer state are on the device: the memory bound
of the pipeline holds (`memory.refine_bytes`).
"""

from __future__ import annotations

import copy
import math
import random
import time

import torch
from torch import nn

from .cancel import check as check_cancel
from .memory import refine_bytes
from .streaming import Batches, LayerStream, to_device


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||out_t - target_t||^2 / ||target_t||^2. (B, S, d) x2 -> scalar"""
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)).mean()


def fit_layer(stream: LayerStream, index: int, layer: nn.Module, dense_layer: nn.Module, inputs: Batches,
              epochs: int, lr: float, seed: int = 0, schedule: str = "cosine") -> dict:
    """Fits `layer` (pruned, on the device) to `dense_layer`'s outputs on `inputs` in place.
    Returns the held-out relative error per epoch (index 0: before the fit), the epoch kept, the time."""
    t0 = time.perf_counter()
    n = len(inputs)
    if epochs < 1 or n < 2:
        return {"skipped": "needs at least 1 epoch and 2 calibration batches", "seconds": 0.0}
    targets = stream.run_layer(index, dense_layer, inputs)  # host memory, like the inputs
    n_val = max(1, n // 8)
    train, val = list(range(n - n_val)), list(range(n - n_val, n))
    # the fit runs in fp32 (Adam on bf16 weights would round most steps away)
    work = layer if next(layer.parameters()).dtype == torch.float32 else copy.deepcopy(layer).float()
    # counted at the dense layer's size, as the ledger counts the layer itself: the bound the estimator
    # can know before the allocation is made
    lay = stream.adapter.layout(dense_layer)
    bsz, seqlen = inputs.tensors[0].shape[:2]
    with stream.ledger.held("refine", refine_bytes(lay, stream.adapter.spec.norm, bsz, seqlen, stream.dtype_bytes)):

        def loss(b: int) -> torch.Tensor:
            x = inputs.tensors[b].to(stream.device, torch.float32)
            out = work(x, **to_device(stream.layer_kwargs(index, inputs.tensors[b]), stream.device))
            out = out[0] if isinstance(out, tuple) else out
            return relative_error(out, targets.tensors[b].to(stream.device, torch.float32))

        def held_out() -> float:
            with torch.no_grad():
                return sum(float(loss(b)) for b in val) / len(val)

        params = list(work.parameters())
        history = [held_out()]
        best_epoch, best = 0, [p.detach().clone() for p in params]
        rng = random.Random(seed * 1_000_003 + index)
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            steps = epochs * len(train)
            # cosine: large steps early, small ones to settle (a constant 1e-3 oscillates; see config.refine_lr)
            decay = torch.optim.lr_scheduler.LambdaLR(
                opt, (lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))) if schedule == "cosine" else (lambda t: 1.0))
            for epoch in range(1, epochs + 1):
                rng.shuffle(train)
                for b in train:
                    check_cancel()
                    opt.zero_grad(set_to_none=True)
                    loss(b).backward()
                    opt.step()
                    decay.step()
                history.append(held_out())
                if history[-1] < history[best_epoch]:
                    best_epoch = epoch
                    for keep, p in zip(best, params):
                        keep.copy_(p.detach())
            for p in params:
                p.requires_grad_(False)
            del opt, decay
        with torch.no_grad():
            for p, keep, orig in zip(params, best, layer.parameters()):
                orig.copy_(keep.to(orig.dtype))  # (work is layer itself in fp32: a copy onto itself)
    return {"heldout_error": history, "epoch_kept": best_epoch, "seconds": round(time.perf_counter() - t0, 3)}
