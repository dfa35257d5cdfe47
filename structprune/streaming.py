"""The memory-bounded loop: one decoder layer on the compute device at a time.

`LayerStream` captures what the model feeds its first decoder layer (the embeddings) and, per
layer, the keyword arguments the model passes it (position embeddings, masks: built by the model's
own code, so rotary variants, sliding windows and OPT's learned positions need no special case).
It does so by running the model's base with every decoder layer replaced by a recorder that
returns its input. After that, `run_layer` pushes host-resident activations through one layer,
batch by batch, and the caller decides what to collect with hooks.

Activations live in host memory (pinned on CUDA); only one batch at a time is on the device.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .cancel import check as check_cancel
from .errors import OutputWriteError
from .weights import DiskResidency, HostResidency
from .memory import (DTYPE_BYTES, DeviceLedger, activation_bytes, embed_workspace_bytes, forward_workspace_bytes,
                     layer_weight_bytes, logits_bytes)


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records its kwargs (and layer 0's input), returns the
    input unchanged."""

    def __init__(self, index: int, sink: dict) -> None:
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.index == 0:
            self.sink["input"] = hidden_states
        return hidden_states


def to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Batches:
    """Host-resident activations of the calibration (or eval) set, in batches of (B, S, d)."""

    tensors: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def tokens(self) -> int:
        return sum(t.shape[0] * t.shape[1] for t in self.tensors)


class LayerStream:
    """Streams a causal LM through its decoder layers, one layer on `device` at a time.

    The model itself stays where it is (host memory); `layer_on_device` moves one layer in and
    out. `ledger` receives what is held on the device.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        device: torch.device | str,
        ledger: DeviceLedger | None = None,
        batch_size: int = 1,
        host_grams: bool | None = None,
        residency: HostResidency | DiskResidency | None = None,
        spill: ActivationSpill | None = None,
    ) -> None:
        self.model = model
        self.spill = spill  # activations past a host-memory budget go to memory-mapped files
        # where the weights are between uses: host memory (default) or safetensors files (weights.py)
        self.residency = residency or HostResidency()
        self.adapter = adapter
        self.device = torch.device(device)
        self.ledger = ledger or DeviceLedger(self.device)
        self.batch_size = batch_size
        self._batch_input: torch.Tensor | None = None
        # solving methods keep Grams in host memory between accumulation and solve (pipeline.py):
        # by default on CUDA, where it takes (n+1)^2 fp32 off the device; on the CPU it would move nothing
        self.host_grams = self.device.type == "cuda" if host_grams is None else bool(host_grams)
        self.dtype = next(model.parameters()).dtype
        self.dtype_bytes = DTYPE_BYTES[self.dtype]
        self._kwargs: dict[tuple[int, int], dict[int, dict]] = {}
        first = adapter.layout(adapter.layers(model)[0])
        self.hidden, self.head_dim = first.hidden, first.head_dim
        self.vocab = adapter.lm_head(model).out_features

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    # --- capture -------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> Batches:
        """Layer-0 inputs for `input_ids` (N, S), kept on the host in batches of `batch_size`.
        Also records each layer's kwargs for this batch shape."""
        layers = self.adapter.layers(self.model)
        originals = list(layers)
        sink: dict = {}
        for i in range(len(layers)):
            layers[i] = _Recorder(i, sink)
        base = self.adapter.base(self.model)
        outs = []
        try:
            self.residency.bring(base, self.device)  # embeddings, rotary tables, final norm: not the layers
            self.ledger.hold("embedding", sum(p.numel() for p in base.parameters()) * self.dtype_bytes)
            for start in range(0, input_ids.shape[0], self.batch_size):
                check_cancel()
                ids = input_ids[start : start + self.batch_size].to(self.device)
                # the embeddings and the final norm's transients (it runs on the recorded input)
                self.ledger.hold("batch-out", embed_workspace_bytes(self.adapter.spec, *ids.shape, self.hidden,
                                                                    self.head_dim, self.dtype_bytes))
                base(input_ids=ids, use_cache=False)
                self.ledger.release("batch-out")
                key = tuple(ids.shape)
                if key not in self._kwargs:
                    self._kwargs[key] = sink["kwargs"]
                outs.append(self._to_host(sink["input"], outs))
                sink.clear()
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            self.residency.release(base)
            self.ledger.release("embedding")
        return Batches(outs)

    def _to_host(self, t: torch.Tensor, held: list[torch.Tensor]) -> torch.Tensor:
        """`t` in host memory (pinned on CUDA), or in a memory-mapped file once the batches
        `held` so far for this stream of activations fill the spill budget."""
        t = t.detach().to("cpu")
        if self.spill is not None and self.spill.over_budget(held, t):
            return self.spill.place(t)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t

    def layer_kwargs(self, index: int, batch: torch.Tensor) -> dict:
        return self._kwargs[tuple(batch.shape[:2])][index]

    # --- one layer -------------------------------------------------------------------------
    @contextlib.contextmanager
    def layer_on_device(self, index: int) -> Iterator[nn.Module]:
        """Moves decoder layer `index` to the device for the duration of the block."""
        layer = self.adapter.layers(self.model)[index]
        lay = self.adapter.layout(layer)
        self.residency.bring(layer, self.device)
        self.ledger.hold("layer", layer_weight_bytes(lay, self.dtype_bytes))
        try:
            yield layer
        finally:
            self.residency.release(layer)
            self.ledger.release("layer")

    def batch_input(self) -> torch.Tensor:
        """The layer input of the batch `run_layer` is pushing through right now (hooks read it)."""
        if self._batch_input is None:
            raise RuntimeError("batch_input is only defined inside run_layer")
        return self._batch_input

    @torch.no_grad()
    def run_layer(
        self,
        index: int,
        layer: nn.Module,
        inputs: Batches,
        keep_outputs: bool = True,
        on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        weighted: bool = False,
    ) -> Batches | None:
        """Pushes every batch of `inputs` through `layer` (already on the device).

        Stops a batch early, without error, if a hook raises `StopLayer` (used to collect the
        attention output projection's inputs without running the MLP). `weighted`: the hooks on
        the output projections weigh tokens (gram.py), which adds to the forward's workspace.
        """
        lay = self.adapter.layout(layer)
        # a Gram hook / input capture on an output projection adds its fp32 input copy
        hooked = any(len(m._forward_pre_hooks) + len(m._forward_hooks)
                     for m in (self.adapter.out_proj(layer, k) for k in ("attn", "mlp")))
        outs = []
        ledger = self.ledger
        for b, x_host in enumerate(inputs.tensors):
            check_cancel()  # per batch: Cancel ends a Gram accumulation or a forward within one batch
            bsz, seqlen = x_host.shape[:2]
            act = activation_bytes(bsz, seqlen, self.hidden, self.dtype_bytes)
            with ledger.held("batch-in", act):
                with ledger.held("workspace", forward_workspace_bytes(lay, bsz, seqlen, self.dtype_bytes, hooked,
                                                                      relative=hooked and weighted)):
                    x = x_host.to(self.device, non_blocking=True)
                    kwargs = to_device(self.layer_kwargs(index, x), self.device)
                    self._batch_input = x  # for relative Gram hooks (batch_input)
                    try:
                        y = layer(x, **kwargs)
                    except StopLayer:
                        y = None
                    finally:
                        self._batch_input = None
                if y is None:
                    continue
                y = y[0] if isinstance(y, tuple) else y
                with ledger.held("batch-out", act):
                    if on_batch is not None:
                        on_batch(b, x, y)
                    if keep_outputs:
                        outs.append(self._to_host(y, outs))
        return Batches(outs) if keep_outputs else None

    # --- the head ---------------------------------------------------------------------------
    @torch.no_grad()
    def logits_nll(self, hidden: Batches, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Final norm + LM head on the streamed last-layer outputs; returns per-window summed
        NLL (N,) in fp64 and the number of predicted tokens."""
        mods = self.adapter.final_modules(self.model) + [self.adapter.lm_head(self.model)]
        for m in mods:
            self.residency.bring(m, self.device)
        head_bytes = sum(p.numel() for m in mods for p in m.parameters()) * self.dtype_bytes
        self.ledger.hold("head", head_bytes)
        nll = []
        try:
            start = 0
            for h in hidden.tensors:
                check_cancel()
                ids = input_ids[start : start + h.shape[0]].to(self.device)
                start += h.shape[0]
                with (self.ledger.held("batch-in", activation_bytes(h.shape[0], h.shape[1], self.hidden, self.dtype_bytes)),
                      self.ledger.held("logits", logits_bytes(h.shape[0], h.shape[1], self.vocab))):
                    z = h.to(self.device)
                    for m in mods:
                        z = m(z)
                    nll.append(window_nll(z, ids))
        finally:
            for m in mods:
                self.residency.release(m)
            self.ledger.release("head")
        tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
        return torch.cat(nll), tokens


class ActivationSpill:
    """Host activations beyond `budget_bytes` per stream of batches (the calibration set's layer
    inputs or outputs) go to memory-mapped files in `folder`, unlinked as soon as they are mapped:
    the page cache holds them (the OS writes them out under memory pressure) and the file is gone
    with the tensor. At 70B, 128 x 2048 tokens of activations are 4 GiB in bf16, twice over."""

    def __init__(self, folder: str | Path, budget_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = int(budget_bytes)
        self.spilled_bytes = 0  # in total, over the run

    def over_budget(self, held: list[torch.Tensor], t: torch.Tensor) -> bool:
        in_memory = sum(h.numel() * h.element_size() for h in held if not _is_mapped(h))
        return in_memory + t.numel() * t.element_size() > self.budget_bytes

    def place(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        try:
            fd, path = tempfile.mkstemp(suffix=".act", dir=self.folder)
        except OSError as exc:
            raise self._error(exc) from exc
        try:
            try:  # the blocks reserved now: a full disk is an error here, not a SIGBUS when the map is written
                if nbytes:
                    os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                raise self._error(exc) from exc
            finally:
                os.close(fd)
            mapped = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        finally:
            os.unlink(path)
        mapped.copy_(t)
        mapped.spilled = True  # an attribute of this tensor object, which the Batches keep
        self.spilled_bytes += nbytes
        return mapped

    def _error(self, exc: OSError) -> OutputWriteError:
        return OutputWriteError(f"cannot spill calibration activations to {self.folder} ({exc.strerror or exc}); free "
                                "space or raise the activation budget, then resume the run with --resume "
                                f"{self.folder.parent}")


def _is_mapped(t: torch.Tensor) -> bool:
    return getattr(t, "spilled", False)


class StopLayer(Exception):
    """Raised by a hook to end a layer's forward early (its remaining output is not needed)."""


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window: logits (B, S, V), ids (B, S) -> (B,) fp64.
    Positions 1..S-1 are predicted from the ones before (docs/PROTOCOL.md)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (-tok.double()).sum(dim=1).cpu()
