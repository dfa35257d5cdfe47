"""Measured inference speed: prefill and KV-cached decode tokens per second of models on a device.

Speed is measured, never predicted (docs/PROTOCOL.md): `compare_speed` times several models (dense
and pruned) on the same random token ids, interleaved (model after model within each repeat), so
that a machine whose load changes during the run slows every model alike; the ratio of two models
comes from one run. Each timing is the median of `repeats` runs after `warmup` untimed ones.

- prefill (batch x length): one forward pass over the prompt, logits of the last position only
  (what `generate` computes before its first token).
- decode (batch, from a prompt of `length` tokens): `new_tokens` forward passes of one token each
  with the KV cache, timed after the (untimed) prefill of the prompt.

Only torch and transformers are used here (the benchmark runs this on GPU machines as well).
`quick_speed` is the few-seconds check the app runs after a prune.
"""

from __future__ import annotations

import copy
import inspect
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from .adapters import adapter_for


@dataclass(frozen=True)
class Shape:
    kind: Literal["prefill", "decode"]
    batch: int
    length: int  # prompt tokens
    new_tokens: int = 0  # decode: tokens generated one at a time with the KV cache

    def __post_init__(self) -> None:
        if self.kind not in ("prefill", "decode"):
            raise ValueError(f"shape kind must be prefill or decode (got {self.kind!r})")
        if self.batch < 1 or self.length < 1 or (self.kind == "decode" and self.new_tokens < 1):
            raise ValueError(f"shape needs batch, length (and new_tokens for decode) >= 1: {self}")

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}x{self.length}"
        return f"decode b{self.batch} ({self.new_tokens} tokens after {self.length})"

    @property
    def tokens(self) -> int:
        """Tokens processed by one timed run."""
        return self.batch * (self.length if self.kind == "prefill" else self.new_tokens)


QUICK_SHAPES = (Shape("prefill", 1, 128), Shape("decode", 1, 32, 16))


@dataclass
class Timing:
    model: str
    shape: Shape
    seconds: list[float] = field(default_factory=list)  # one per timed repeat, in run order

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.shape.tokens / self.median_s

    def to_dict(self) -> dict:
        # six significant digits, not decimals: a tiny model's 0.2 ms step rounded to the microsecond
        # would move the speed-ups computed from the record by up to 0.5%
        return {"model": self.model, "shape": asdict(self.shape), "label": self.shape.label,
                "seconds": [_sig6(s) for s in self.seconds], "median_s": _sig6(self.median_s),
                "tokens_per_s": round(self.tokens_per_s, 2)}


def _sig6(x: float) -> float:
    return float(f"{x:.6g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_logits_kw(model: nn.Module) -> dict:
    """logits_to_keep=1 where the model accepts it: the prompt's other logits are never needed."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.inference_mode()
def run_once(model: nn.Module, shape: Shape, ids: torch.Tensor, device: torch.device) -> float:
    """Seconds of one prefill or one decode of `shape` (ids: (batch, length + new_tokens) on device)."""
    kw = _last_logits_kw(model)
    prompt = ids[:, : shape.length]
    if shape.kind == "prefill":
        _sync(device)
        t = time.perf_counter()
        model(input_ids=prompt, use_cache=False, **kw)
        _sync(device)
        return time.perf_counter() - t
    # the KV cache argument is `cache` in newer transformers, `past_key_values` before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True, **kw)
    past = out[name]
    _sync(device)
    t = time.perf_counter()
    for j in range(shape.new_tokens):
        step = ids[:, shape.length + j: shape.length + j + 1]
        past = model(input_ids=step, use_cache=True, **{name: past})[name]
    _sync(device)
    return time.perf_counter() - t


def compare_speed(models: dict[str, nn.Module], shapes: list[Shape] | tuple[Shape, ...],
                  device: torch.device | str = "cpu", repeats: int = 5, warmup: int = 1, seed: int = 0,
                  on_step: Callable[[str], None] | None = None) -> list[Timing]:
    """Times every model at every shape, interleaved; the models must already be on `device` in the
    dtype to be timed. Returns one Timing per (shape, model), shapes outer."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    device = torch.device(device)
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    timings = []
    for shape in shapes:
        ids = torch.randint(0, vocab, (shape.batch, shape.length + shape.new_tokens), generator=gen).to(device)
        row = {name: Timing(name, shape) for name in models}
        for r in range(warmup + repeats):
            for name, model in models.items():
                s = run_once(model, shape, ids, device)
                if r >= warmup:
                    row[name].seconds.append(s)
            if on_step is not None:
                on_step(f"{shape.label}: repeat {r + 1 - warmup} of {repeats}" if r >= warmup else
                        f"{shape.label}: warm-up")
        timings.extend(row.values())
    return timings


def speedups(timings: list[Timing], reference: str) -> dict[tuple[str, str], float]:
    """{(model, shape label): reference median time / model median time} (> 1: faster than it)."""
    ref = {t.shape.label: t.median_s for t in timings if t.model == reference}
    return {(t.model, t.shape.label): ref[t.shape.label] / t.median_s for t in timings
            if t.shape.label in ref}


@torch.no_grad()
def shrink_to_counts(model: nn.Module, keep: list[dict[str, int]]) -> nn.Module:
    """Physically cuts `model` (in place) to `keep[layer] = {"attn": heads, "mlp": channels}`, keeping
    the first heads of every KV group and the first channels: the shapes of a pruned model without
    its solve, for timing (speed depends on the shapes, not on which units were kept)."""
    adapter = adapter_for(model)
    for layer, k in zip(adapter.layers(model), keep):
        lay = adapter.layout(layer)
        if k["attn"] != lay.n_heads:
            if lay.mha:
                heads = torch.arange(k["attn"])
            else:
                per_group, keep_per = lay.n_heads // lay.n_kv_heads, k["attn"] // lay.n_kv_heads
                heads = (torch.arange(lay.n_kv_heads)[:, None] * per_group + torch.arange(keep_per)).reshape(-1)
            adapter.keep_heads(layer, heads)
        if k["mlp"] != lay.intermediate:
            adapter.keep_channels(layer, torch.arange(k["mlp"]))
    return model


def load_note() -> dict:
    """What else the machine was doing: the 1/5/15-minute load averages and torch's threads."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"loadavg": [round(x, 2) for x in load], "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def quick_speed(pruned: nn.Module, dense: nn.Module, device: torch.device | str = "cpu",
                repeats: int = 3) -> dict:
    """The few-seconds comparison the app shows after a run: prefill 1 x 128 and decode at batch 1,
    pruned against dense on `device` in their current dtype. Returns JSON-ready rows."""
    timings = compare_speed({"dense": dense, "pruned": pruned}, QUICK_SHAPES, device, repeats=repeats, warmup=1)
    ratio = speedups(timings, "dense")
    rows = [{"shape": t.shape.label, "model": t.model, "tokens_per_s": round(t.tokens_per_s, 1),
             "speedup": round(ratio[(t.model, t.shape.label)], 3)} for t in timings]
    return {"device": str(device), "repeats": repeats, "rows": rows, **load_note()}


QUICK_PROTOCOL = ("prefill 1 x 128 (last position's logits) and decode at batch 1 (16 tokens after a 32-token "
                  "prompt, KV cache); dense and pruned interleaved, median of 3 after 1 warm-up; random token ids")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def speed_section(pruned: nn.Module, dense: nn.Module, device: torch.device | str, dtype: torch.dtype,
                  repeats: int = 3) -> dict:
    """A run record's "speed": the pruned model's size and its `quick_speed` against `dense`, both in
    `dtype` on `device`, or {"skipped": why} when both models would not fit there at once. `dense` is
    never modified (a copy is converted when the dtype or the device differ); `pruned` ends where it began."""
    device = torch.device(device)
    per = torch.empty(0, dtype=dtype).element_size()
    size = {"bytes": n_params(pruned) * per, "dense_bytes": n_params(dense) * per}
    size["ratio"] = round(size["bytes"] / size["dense_bytes"], 4)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if 1.2 * (size["bytes"] + size["dense_bytes"]) > free:
            return {"skipped": "the dense and the pruned model do not fit on the device together", "size": size}
    home = next(pruned.parameters()).device
    same = next(dense.parameters()).dtype == dtype and next(dense.parameters()).device == device
    ref = dense if same else copy.deepcopy(dense).to(device, dtype)
    try:
        out = quick_speed(pruned.to(device), ref, device, repeats)
    finally:
        pruned.to(home)
    return {**out, "protocol": QUICK_PROTOCOL, "dtype": str(dtype).replace("torch.", ""), "size": size,
            "speedup": {r["shape"]: r["speedup"] for r in out["rows"] if r["model"] == "pruned"}}


__all__ = ["Shape", "Timing", "QUICK_SHAPES", "compare_speed", "speedups", "run_once", "shrink_to_counts",
           "load_note", "quick_speed", "speed_section", "n_params", "QUICK_PROTOCOL"]
