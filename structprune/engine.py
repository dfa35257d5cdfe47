"""The pruning engine: the one place where a model is streamed through its decoder layers.

Every caller goes through `PruneEngine`: `run.run_prune` (the CLI, the app's jobs, the benchmarks),
the explorer's profile pass (`pass1` alone), the Method page's module Gram (`module_gram`) and
streamed perplexity (`nll`). A layer-wise method runs as

    pass1 (statistics of the dense model)  ->  allocate (units kept per module)  ->  pass2 (prune)

and what pass 2 needs from pass 1 travels in the `Pass1` value, never on a shared object. The
loops themselves are `pipeline.collect_stats` and `pipeline.prune_sequential`; the stream that moves
one layer at a time is `streaming.LayerStream`; device memory is counted by `memory.DeviceLedger`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import adapter_for
from .allocation import Allocation, allocate_uniform
from .cancel import cancel_scope
from .errors import SequenceLengthError
from .gram import GramHook, TokenWeights
from .memory import DeviceLedger
from .methods.base import Method
from .pipeline import Emitter, LayerStats, collect_stats, prune_sequential
from .refine import fit_layer
from .streaming import ActivationSpill, LayerStream
from .weights import DiskResidency, HostResidency
from .units import layouts_of, module_specs


@dataclass
class Pass1:
    """What pass 1 learned about the dense model, and how: pass 2 weighs tokens the same way."""

    stats: list[LayerStats]  # per layer; empty for methods that need no calibration
    calib_loss: dict  # the dense calibration loss of the sensitivity windows, when measured
    weigh: TokenWeights | None  # the Grams' token weights (None: plain Grams)


@dataclass
class Plan:
    """The allocation: units kept per module, and what it was computed from."""

    allocation: Allocation
    energy_info: dict
    keep: list[dict[str, int]]  # per layer: {"attn": heads kept, "mlp": channels kept}


@dataclass
class PruneOutcome:
    """A pruning run's result besides the pruned model itself (pruned in place)."""

    allocation: Allocation
    energy_info: dict
    modules: list[dict]  # per pruned module: kept units, errors, solve time, traces
    calib_loss: dict
    timing: dict[str, float]
    stats: list[LayerStats] = field(default_factory=list)
    peak_bytes: int = 0  # device peak while pruning (measured on CUDA, accounted on the CPU)


def _cancellable(fn):
    """Runs an engine method inside the engine's cancel scope: its `cancel` reaches every loop below
    (per batch, per solver iteration: cancel.py), not only the layer boundaries."""

    @functools.wraps(fn)
    def inner(self, *args, **kwargs):
        with cancel_scope(self.emit.cancel):
            return fn(self, *args, **kwargs)

    return inner


class PruneEngine:
    """Streams `model` (kept in host memory) through `device` one decoder layer at a time.

    `method` is needed for pass1 / allocate / pass2 / run, not for `module_gram` and `nll`.
    `on_event(ProgressEvent)` is called per layer and stage; `cancel` (a threading.Event) is
    checked at every layer boundary and inside every long loop (cancel.py) and raises RunCancelledError. `residency`: where the weights
    are between uses (default: host memory; `weights.DiskResidency` reads them from safetensors);
    `spill`: where activations go past a host-memory budget (`streaming.ActivationSpill`).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, method: Method | None = None, *,
                 batch_size: int = 1, on_event: Callable | None = None, cancel=None,
                 ledger: DeviceLedger | None = None, host_grams: bool | None = None,
                 t0: float | None = None, residency: HostResidency | DiskResidency | None = None,
                 spill: ActivationSpill | None = None) -> None:
        self.model = model
        self.method = method
        self.adapter = adapter_for(model)
        self.device = torch.device(device)
        self.ledger = ledger or DeviceLedger(self.device)
        self.stream = LayerStream(model, self.adapter, self.device, ledger=self.ledger, batch_size=batch_size,
                                  host_grams=host_grams, residency=residency, spill=spill)
        self.emit = Emitter(self.stream, on_event, cancel, time.perf_counter() if t0 is None else t0)
        # of the model as given (dense); the MLPs step by the run's channel alignment
        align = method.cfg.align_channels if method is not None else 1
        self.specs = module_specs(layouts_of(model, self.adapter), align)
        if method is not None:  # a budget the aligned modules cannot hold fails here, before any pass
            allocate_uniform(self.specs, method.cfg.sparsity, s_max=method.cfg.s_max)

    @property
    def n_layers(self) -> int:
        return self.stream.n_layers

    def _need_method(self) -> Method:
        if self.method is None:
            raise ValueError("this PruneEngine was built without a method")
        return self.method

    # --- the passes ------------------------------------------------------------------------
    @_cancellable
    def pass1(self, calib_ids: torch.Tensor, sensitivity: bool | None = None,
              cache: dict | None = None, cache_key: tuple | None = None) -> Pass1:
        """Per-layer statistics of the dense model, with the module sensitivities when
        `sensitivity` (default: when the method wants them; measured at the uniform allocation
        with a one-shot selector). Looked up in / stored into `cache` under `cache_key`."""
        method = self._need_method()
        cfg = method.cfg
        weigh = method.token_weights()
        if cache is not None and cache_key in cache:
            hit = cache[cache_key]
            return Pass1(hit.stats, dict(hit.calib_loss), hit.weigh)
        if not method.needs_calibration:
            return Pass1([], {}, weigh)
        if sensitivity is None:
            check_sensitivity_windows(method, calib_ids.shape[0])
            sensitivity = method.wants_sensitivity()
        self.emit("pass1", -1)  # begins (the label changes before the embeddings)
        sens_rule = None
        if sensitivity:
            u = allocate_uniform(self.specs, cfg.sparsity, s_max=cfg.s_max)
            uniform_keep = {(sp.layer, sp.kind): int(k) for sp, k in zip(self.specs, u.units_kept)}

            def sens_rule(kind, i, W, b, G, lay):
                # one-shot OBS selection + refit: the measured loss only ranks modules, and this is
                # the pass's most frequent solve
                return method.rule(kind, i, W, b, G, lay, uniform_keep[(i, kind)], selector="saliency")

        stats, calib_loss = collect_stats(
            self.stream, calib_ids, method.score, self.emit, sensitivity_rule=sens_rule,
            sensitivity_windows=min(cfg.sensitivity_windows, calib_ids.shape[0]), owl_m=cfg.owl_m,
            solves=method.solves, weigh=weigh)
        result = Pass1(stats, calib_loss, weigh)
        if cache is not None:
            cache[cache_key] = Pass1(stats, dict(calib_loss), weigh)
        return result

    def allocate(self, pass1: Pass1) -> Plan:
        """The method's allocation of the budget over modules, from pass 1's statistics."""
        alloc, energy_info = self._need_method().allocate(self.specs, pass1.stats)
        keep = [{} for _ in range(self.n_layers)]
        for sp, k in zip(self.specs, alloc.units_kept):
            keep[sp.layer][sp.kind] = int(k)
        if pass1.stats:
            energy_info["sensitivity"] = [{"layer": i, "module": k, "delta_loss": v}
                                          for i, st in enumerate(pass1.stats) for k, v in st.sensitivity.items()]
            energy_info["residual_energy"] = [st.residual_energy for st in pass1.stats]
            energy_info["residual_energy_hm"] = [st.residual_energy_hm for st in pass1.stats]
        return Plan(alloc, energy_info, keep)

    @_cancellable
    def pass2(self, calib_ids: torch.Tensor, keep: list[dict[str, int]], pass1: Pass1,
              refine: Callable[..., dict] | None = None,
              commit_layer: Callable[[int, nn.Module, list[dict]], None] | None = None,
              start: int = 0, dense_layer_on_device=None) -> list[dict]:
        """Prunes the model in place to `keep` (per layer, units kept per module; `Plan.keep`);
        one info dict per module. `refine` replaces the block refit the config asks for (a
        `refine.fit_layer`-like callable: the refit probe's extension point); `commit_layer(i,
        layer, infos)` receives each finished layer on the device (disk streaming writes it out).
        `start` > 0 continues an interrupted pass 2 (pipeline.prune_sequential): the infos of the
        layers before it are not returned."""
        method = self._need_method()
        cfg = method.cfg
        if not method.needs_calibration:
            return method.prune_weights_only(self.model, self.adapter, keep)
        self.emit("pass2", -1)  # begins: the allocation is known
        if refine is None and cfg.refine_epochs:
            refine = functools.partial(fit_layer, epochs=cfg.refine_epochs, lr=cfg.refine_lr, seed=cfg.seed,
                                       schedule=cfg.refine_schedule)
        return prune_sequential(self.stream, calib_ids, keep, method.rule, self.emit, target=cfg.target,
                                solves=method.solves, refine=refine, weigh=pass1.weigh, damp=cfg.damp,
                                commit_layer=commit_layer, start=start, dense_layer_on_device=dense_layer_on_device)

    @_cancellable
    def run(self, calib_ids: torch.Tensor, cache: dict | None = None, cache_key: tuple | None = None,
            commit_layer: Callable[[int, nn.Module, list[dict]], None] | None = None,
            journal=None) -> PruneOutcome:
        """The method end to end: pass 1, allocation, pass 2 (or the method's own whole-model
        pruning). The model is pruned in place. `journal` (a `resume.RunJournal`) makes the run
        resumable: it keeps pass 1's statistics (or gives back those of the interrupted run), the
        plan, and every finished layer (it is the commit_layer then); a resumed pass 2 starts at
        its first unfinished layer."""
        method = self._need_method()
        timing = {}
        t = time.perf_counter()
        if method.whole_model:
            alloc, energy_info, infos, calib_loss = method.prune_whole(
                self.model, self.adapter, calib_ids, self.specs, self.stream, self.emit)
            timing["pass1_s"] = time.perf_counter() - t
            return PruneOutcome(alloc, energy_info, infos, calib_loss, timing, peak_bytes=self.ledger.peak)
        p1 = journal.load_pass1(method.token_weights()) if journal is not None else None
        if p1 is None:
            p1 = self.pass1(calib_ids, cache=cache, cache_key=cache_key)
            if journal is not None:
                journal.save_pass1(p1)
        timing["pass1_s"] = time.perf_counter() - t
        plan = self.allocate(p1)
        t = time.perf_counter()
        start, infos, dense_layer = 0, [], None
        if journal is not None:
            start, infos = journal.begin(plan.keep, self.stream)
            commit_layer, dense_layer = journal.commit, journal.dense_layer_on_device
        infos = infos + self.pass2(calib_ids, plan.keep, p1, commit_layer=commit_layer, start=start,
                                   dense_layer_on_device=dense_layer)
        timing["pass2_s"] = time.perf_counter() - t
        return PruneOutcome(plan.allocation, plan.energy_info, infos, dict(p1.calib_loss), timing, p1.stats,
                            peak_bytes=self.ledger.peak)

    # --- single streams ----------------------------------------------------------------------
    @_cancellable
    @torch.no_grad()
    def module_gram(self, calib_ids: torch.Tensor, layer: int, kind: str):
        """(W (d_out, n), b or None, G ((n+1)^2), layout) of one module of the model as it is,
        on the CPU: the layers before it streamed, its Gram taken from its output projection."""
        stream = self.stream
        if not 0 <= layer < stream.n_layers:
            raise ValueError(f"layer must be in [0, {stream.n_layers - 1}] (got {layer})")
        x = stream.embed(calib_ids)
        for i in range(layer):
            with stream.layer_on_device(i) as lyr:
                x = stream.run_layer(i, lyr, x)
            self.emit("gram", i, step=i + 1, steps=layer + 1)
        with stream.layer_on_device(layer) as lyr:
            lin = self.adapter.out_proj(lyr, kind)
            with GramHook(lin, stop=True) as hook:
                stream.run_layer(layer, lyr, x, keep_outputs=False)
            W = lin.weight.detach().cpu().clone()
            b = None if lin.bias is None else lin.bias.detach().cpu().clone()
            lay = self.adapter.layout(lyr)
            G = hook.gram.cpu()
        return W, b, G, lay

    @_cancellable
    @torch.no_grad()
    def nll(self, windows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL per window (fp64) and the tokens predicted, streamed."""
        stream = self.stream
        hidden = stream.embed(windows)
        for i in range(stream.n_layers):
            with stream.layer_on_device(i) as layer:
                hidden = stream.run_layer(i, layer, hidden)
        return stream.logits_nll(hidden, windows)


def check_sensitivity_windows(method: Method, nsamples: int) -> None:
    """A method that measures sensitivities needs that many calibration windows (checked before
    any work by run_prune, and again by the engine for direct callers)."""
    cfg = method.cfg
    if method.wants_sensitivity() and nsamples < cfg.sensitivity_windows:
        raise SequenceLengthError(
            f"sensitivity_windows ({cfg.sensitivity_windows}) exceeds nsamples ({nsamples}); "
            "lower --sensitivity-windows or raise --nsamples")


def pass1_key(method: Method, model_identity, sensitivity: bool) -> tuple:
    """What pass-1 statistics depend on (the model, its calibration data and the scoring rule):
    the key of a stats cache shared by runs and the explorer's profiles."""
    cfg = method.cfg
    sens = (cfg.sparsity, cfg.selector, cfg.refit, cfg.sensitivity_windows, cfg.align_channels) if sensitivity else None
    weigh = method.token_weights()
    return (model_identity, cfg.method, cfg.saliency, cfg.bias, cfg.calib_data, cfg.nsamples, cfg.seqlen,
            cfg.seed, cfg.owl_m, cfg.dtype, cfg.batch_size, weigh is not None, cfg.damp, sens)


__all__ = ["PruneEngine", "Pass1", "Plan", "PruneOutcome", "pass1_key", "check_sensitivity_windows"]
