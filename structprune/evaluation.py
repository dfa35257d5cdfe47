"""Perplexity per docs/PROTOCOL.md: whole model on the device, or streamed one layer at a time.

Both paths compute the same summed NLL per window (`streaming.window_nll`), so they agree to
floating-point noise; `tests/test_evaluation.py` checks it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .cancel import current_flag, window_done
from .engine import PruneEngine
from .errors import InvalidConfigError, SequenceLengthError
from .memory import DeviceLedger
from .streaming import window_nll
from .weights import DiskResidency


@dataclass(frozen=True)
class PerplexityResult:
    value: float  # exp(total NLL / tokens predicted); inf when it overflows
    nll: float  # total NLL in nats
    tokens: int  # tokens predicted
    windows: int
    seqlen: int
    protocol: str  # e.g. "sotu-test · seqlen 512 · 4 windows"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value"] = self.value if math.isfinite(self.value) else None  # JSON has no inf
        d["finite"] = math.isfinite(self.value)
        return d


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. Asking for cuda without one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    return dev


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if seqlen < 2:
        raise SequenceLengthError(f"seqlen must be at least 2 (got {seqlen})")
    if limit is not None and seqlen > limit:
        raise SequenceLengthError(
            f"seqlen {seqlen} exceeds the model's context of {limit} tokens; use --seqlen {limit} or less"
        )


def fits_on_device(model: nn.Module, device: torch.device, headroom: float = 0.6) -> bool:
    """Whether the whole model fits in `headroom` of the device's free memory (CPU: always)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    return need < headroom * free


def _nll_to_result(nll: torch.Tensor, tokens: int, windows: torch.Tensor, protocol: str) -> PerplexityResult:
    total = float(nll.sum())
    mean = total / tokens
    value = math.exp(mean) if mean < 700 else math.inf
    if not math.isfinite(total):
        value = math.inf
    return PerplexityResult(value, total, tokens, windows.shape[0], windows.shape[1], protocol)


@torch.no_grad()
def perplexity_whole(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, protocol: str = ""
) -> PerplexityResult:
    """Whole model on `device`. windows: (W, S) token ids. The model is moved back afterwards."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        nll = []
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll.append(window_nll(logits, ids))
            window_done(start + ids.shape[0], windows.shape[0])  # checks Cancel, moves the bar
    finally:
        model.to(home)
    return _nll_to_result(torch.cat(nll), windows.shape[0] * (windows.shape[1] - 1), windows, protocol)


@torch.no_grad()
def perplexity_streamed(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    protocol: str = "",
    ledger: DeviceLedger | None = None,
    residency: DiskResidency | None = None,
) -> PerplexityResult:
    """One decoder layer on `device` at a time (the engine's stream); activations of all windows
    stay on the host. `residency`: the weights' source when they are on disk (weights.py)."""
    engine = PruneEngine(model, device, batch_size=batch_size, ledger=ledger, residency=residency,
                         cancel=current_flag())  # checked per layer and per batch
    nll, tokens = engine.nll(windows)
    return _nll_to_result(nll, tokens, windows, protocol)


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: str | torch.device = "auto",
    mode: str = "auto",
    batch_size: int = 1,
    protocol: str = "",
    residency: DiskResidency | None = None,
) -> PerplexityResult:
    """mode: 'whole', 'streamed', or 'auto' (whole when it fits on the device, else streamed).
    With `residency` (the weights on disk) the model is always streamed."""
    dev = resolve_device(device)
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise SequenceLengthError("need at least one evaluation window")
    check_seqlen(model, windows.shape[1])
    if residency is not None:
        return perplexity_streamed(model, windows, dev, batch_size, protocol, residency=residency)
    if mode == "auto":
        mode = "whole" if fits_on_device(model, dev) else "streamed"
    if mode == "whole":
        return perplexity_whole(model, windows, dev, batch_size, protocol)
    if mode == "streamed":
        return perplexity_streamed(model, windows, dev, batch_size, protocol)
    raise InvalidConfigError(f"mode must be whole, streamed or auto (got {mode!r})")
