"""Gram matrices of a linear map's input, accumulated by hooks; activations are never stored.

For the input P (n x T tokens) of an output projection and P~ = [P; 1], `GramHook` accumulates
G = P~ P~^T / T ((n+1) x (n+1), fp32 on the device). The last row/column carries the input means,
so the same matrix serves the refit with bias, the OBS saliencies, Wanda-style norms (diag) and
FLAP's fluctuation (diag minus squared mean).

Relative (token-weighted) Grams, G = P~ diag(w) P~^T / sum_t w_t: a module's output y_t is added to the
residual stream h_t, and the next RMSNorm / LayerNorm divides by that stream's size, so what an
error e_t does downstream scales like ||e_t||^2 / ||h_t + y_t||^2. Plain Grams weigh tokens by
||e_t||^2 alone, and the attention-sink token, whose residual is 1e4 x larger than the others',
then owns the Gram of the modules that write it (SmolLM2: 99.8% of layer 11's MLP input energy
comes from the first token of each window). Dividing by sum_t w_t instead of T keeps G[n, n] = 1,
so every solver reads the matrix unchanged (and batching changes nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .memory import all_finite
from .streaming import StopLayer


def _augmented(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (T, n+1) fp32 with a trailing column of ones."""
    x = x.reshape(-1, x.shape[-1])
    # one (T, n+1) fp32 buffer (not an fp32 copy of x and then its concatenation: two)
    xa = torch.empty(x.shape[0], x.shape[1] + 1, device=x.device, dtype=torch.float32)
    xa[:, :-1] = x
    xa[:, -1] = 1.0
    return xa


def relative_weights(y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(T,) fp32 token weights 1 / ||h_t + y_t||^2: y the module's output, h = `residual`, the
    stream entering the decoder layer (for the MLP, the attention output added in between is left
    out: a small term next to h)."""
    d = y.shape[-1]
    n2 = torch.linalg.vector_norm(y.reshape(-1, d) + residual.reshape(-1, d), dim=-1, dtype=torch.float32).square_()
    return n2.clamp_min_(torch.finfo(torch.float32).tiny).reciprocal_()


TokenWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (y, residual) -> (T,) fp32 weights


class GramHook:
    """Accumulates the augmented Gram of `module`'s input while active (a context manager).

    stop=True raises StopLayer after recording, ending the layer's forward there (the rest of the
    layer is not needed when only this input is wanted). `residual`, when given, returns the
    current batch's layer input and makes the Gram token-weighted by `weigh(y, residual)`
    (`relative_weights` unless a method brings its own; see the module doc).
    """

    def __init__(self, module: nn.Linear, stop: bool = False,
                 residual: Callable[[], torch.Tensor] | None = None, weigh: TokenWeights = relative_weights) -> None:
        self.module = module
        self.stop = stop
        self.residual = residual
        self.weigh = weigh
        n = module.in_features
        self.sum = torch.zeros(n + 1, n + 1, device=module.weight.device, dtype=torch.float32)
        self.tokens = 0
        self.weight = 0.0  # sum of the token weights (relative Grams)
        self._handle = None
        self._final = False

    def _add(self, p: torch.Tensor, w: torch.Tensor | None) -> None:
        if self._final:
            raise RuntimeError("the Gram was already read; start a new GramHook")
        xa = _augmented(p)
        if w is not None:  # scale the rows of our own copy: sum_t w_t p_t p_t^T
            self.weight += float(w.sum(dtype=torch.float64))
            xa.mul_(w.sqrt_()[:, None])
        self.sum.addmm_(xa.T, xa)
        self.tokens += xa.shape[0]
        if self.stop:
            raise StopLayer

    def _pre_hook(self, _module, args):
        self._add(args[0], None)

    def _post_hook(self, _module, args, output):
        # after the projection: its output is the y of the weights, at no extra matmul
        self._add(args[0], self.weigh(output, self.residual()))

    def __enter__(self) -> GramHook:
        if self.residual is None:
            self._handle = self.module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = self.module.register_forward_hook(self._post_hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def gram(self) -> torch.Tensor:
        """G = P~ P~^T / T, or P~ diag(w) P~^T / sum(w) for a relative Gram (the running sum is
        divided in place: one (n+1)^2 buffer, not two)."""
        if not self._final:
            if self.tokens == 0:
                raise RuntimeError("no tokens were accumulated")
            self.sum.div_(self.weight if self.residual is not None else self.tokens)
            if not all_finite(self.sum):  # no mask the size of the matrix (7 bytes an element)
                raise FloatingPointError("non-finite values in a Gram matrix (activations overflowed)")
            self._final = True
        return self.sum


    def to_host(self) -> torch.Tensor:
        """The finished Gram in host memory (pinned when it came from CUDA), dropping the device
        copy first: with the Grams off the device, a solve holds only its own (n+1)^2 buffers.
        Normalized and checked on the host, so the device never holds the check's transients."""
        if self._final:
            raise RuntimeError("the Gram was already read; to_host takes it before `gram`")
        if self.tokens == 0:
            raise RuntimeError("no tokens were accumulated")
        if self.sum.device.type != "cpu":
            host = torch.empty(self.sum.shape, dtype=self.sum.dtype, pin_memory=self.sum.is_cuda)
            host.copy_(self.sum)
            self.sum = host  # the device buffer is freed here: nothing else references it
        return self.gram


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
