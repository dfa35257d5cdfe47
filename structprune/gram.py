"""Gram matrices of a linear map's input, accumulated by hooks; activations are never stored.

For the input P (n x T tokens) of an output projection and P~ = [P; 1], `GramHook` accumulates
G = P~ P~^T / T ((n+1) x (n+1), fp32 on the device). The last row/column carries the input means,
so the same matrix serves the refit with bias, the OBS saliencies, Wanda-style norms (diag) and
FLAP's fluctuation (diag minus squared mean).
"""

from __future__ import annotations

import torch
from torch import nn

from .streaming import StopLayer


def _augmented(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (T, n+1) fp32 with a trailing column of ones."""
    x = x.reshape(-1, x.shape[-1])
    # one (T, n+1) fp32 buffer (not an fp32 copy of x and then its concatenation: two)
    xa = torch.empty(x.shape[0], x.shape[1] + 1, device=x.device, dtype=torch.float32)
    xa[:, :-1] = x
    xa[:, -1] = 1.0
    return xa


class GramHook:
    """Accumulates the augmented Gram of `module`'s input while active (a context manager).

    stop=True raises StopLayer after recording, ending the layer's forward there (the rest of the
    layer is not needed when only this input is wanted).
    """

    def __init__(self, module: nn.Linear, stop: bool = False) -> None:
        self.module = module
        self.stop = stop
        n = module.in_features
        self.sum = torch.zeros(n + 1, n + 1, device=module.weight.device, dtype=torch.float32)
        self.tokens = 0
        self._handle = None
        self._final = False

    def _hook(self, _module, args):
        if self._final:
            raise RuntimeError("the Gram was already read; start a new GramHook")
        xa = _augmented(args[0])
        self.sum.addmm_(xa.T, xa)
        self.tokens += xa.shape[0]
        if self.stop:
            raise StopLayer

    def __enter__(self) -> GramHook:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def gram(self) -> torch.Tensor:
        """G = P~ P~^T / T (the running sum is divided in place: one (n+1)^2 buffer, not two)."""
        if not self._final:
            if self.tokens == 0:
                raise RuntimeError("no tokens were accumulated")
            self.sum.div_(self.tokens)
            if not torch.isfinite(self.sum).all():
                raise FloatingPointError("non-finite values in a Gram matrix (activations overflowed)")
            self._final = True
        return self.sum


class InputCapture:
    """Keeps the (augmented) input of `module` for the current batch only; used to pair the dense
    path's input with the pruned path's input token by token (cross-Gram for dense targets)."""

    def __init__(self, module: nn.Linear, stop: bool = False) -> None:
        self.module, self.stop, self.value, self._handle = module, stop, None, None

    def _hook(self, _module, args):
        self.value = _augmented(args[0])
        if self.stop:
            raise StopLayer

    def __enter__(self) -> InputCapture:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
