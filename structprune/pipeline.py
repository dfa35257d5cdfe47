"""The two streaming passes every layer-wise method shares.

pass 1 (`collect_stats`): the dense model, one layer at a time; per module it keeps only scalars:
    a score per unit, the module's output energy, the residual stream's energy, and optionally the
    measured calibration-loss increase when that module alone is pruned (`sensitivity`).
pass 2 (`prune_sequential`): prunes layer by layer with the allocated unit counts, attention first,
    then the MLP on what the pruned attention produces ("true sequential"), then recomputes the
    layer's outputs for the next layer.

A method plugs in two functions: `score_fn` (unit scores for pass 1) and `rule` (which units to
keep in a module and its new weights). Both receive the module's output projection W (d_out x n),
bias, and input Gram G ((n+1)^2, see gram.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import LayerLayout, set_output_bias
from .cancel import check as check_cancel
from .errors import RunCancelledError
from .gram import GramHook, InputCapture, TokenWeights
from .memory import (column_rule_bytes, gram_bytes, gram_check_bytes, layer_weight_bytes, output_energy_bytes,
                     saliency_bytes, solver_bytes)
from .solver import DAMP_REL, quadratic_form
from .streaming import Batches, LayerStream

log = logging.getLogger(__name__)


@dataclass
class ProgressEvent:
    """One per layer and stage, and one when a stage begins (layer -1, step 0); the CLI's progress
    bar and the app's live charts read these. Stages in a run's order: planning.RUN_STAGES."""

    stage: str  # "prepare" | "eval-dense" | "heldout-dense" | "pass1" | "sensitivity" | "pass2" | ... | "done"
    layer: int  # 0-based layer just finished (-1 when not per layer)
    n_layers: int
    elapsed_s: float
    device_bytes: int
    peak_bytes: int
    message: str = ""
    step: int = 0  # steps of the stage done (windows, iterations), when it counts them (steps > 0)
    steps: int = 0


@dataclass
class ModuleResult:
    """What a rule decided for one module."""

    kept: torch.Tensor  # sorted unit ids kept
    W: torch.Tensor  # (d_out, n) new output-projection weights (removed columns zero)
    b: torch.Tensor | None  # (d_out,) new bias, or None to leave it as it is
    info: dict = field(default_factory=dict)  # JSON-ready traces and errors


ScoreFn = Callable[[str, torch.Tensor, torch.Tensor | None, torch.Tensor, LayerLayout], torch.Tensor]
RuleFn = Callable[[str, int, torch.Tensor, torch.Tensor | None, torch.Tensor, LayerLayout, int], ModuleResult]


@dataclass
class LayerStats:
    layout: LayerLayout
    scores: dict[str, torch.Tensor]  # kind -> (U,) unit scores, lower = pruned first (CPU fp64)
    out_energy: dict[str, float]  # kind -> tr(W~ G W~^T), the module's mean squared output
    residual_energy: float  # mean ||h||^2 per token of the layer's input
    sensitivity: dict[str, float] = field(default_factory=dict)  # kind -> calib loss increase (nats/token)
    outlier_ratio: float = 0.0  # OWL: share of Wanda element scores above M x their mean
    # harmonic mean of ||h_t||^2 over tokens, 1 / E[1 / ||h_t||^2]: the typical token's energy. The
    # mean above is dominated by the attention-sink token (SmolLM2 from layer 12: 1 token in 512 with
    # ~3e4x the median energy makes the mean 60x the median); 0 = not measured
    residual_energy_hm: float = 0.0


class Emitter:
    def __init__(self, stream: LayerStream, on_event, cancel, t0: float) -> None:
        self.stream, self.on_event, self.cancel, self.t0 = stream, on_event, cancel, t0

    """Reports progress (`on_event`) and checks for cancellation (`cancel`, and the thread's
    cancel.cancel_scope) at every event."""

    def __call__(self, stage: str, layer: int, message: str = "", step: int = 0, steps: int = 0) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelledError("run cancelled")
        check_cancel()
        if self.on_event is not None:
            led = self.stream.ledger
            self.on_event(ProgressEvent(stage, layer, self.stream.n_layers, time.perf_counter() - self.t0,
                                        led.current, led.peak, message, step, steps))


def _gram_hook(stream: LayerStream, module: nn.Linear, weigh: TokenWeights | None, stop: bool = False) -> GramHook:
    """A Gram hook on `module`, token-weighted by `weigh` against the stream's batch input when given."""
    if weigh is None:
        return GramHook(module, stop=stop)
    return GramHook(module, stop=stop, residual=stream.batch_input, weigh=weigh)


def _group(lay: LayerLayout, kind: str) -> int:
    """Columns per unit of a module (the solver's memory depends on it): head_dim or 1."""
    return lay.head_dim if kind == "attn" else 1


def weight_with_bias(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return lin.weight.detach(), (lin.bias.detach() if lin.bias is not None else None)


def module_output_energy(W: torch.Tensor, b: torch.Tensor | None, G: torch.Tensor) -> float:
    """tr(W~ G W~^T): the module's mean squared output, in G's dtype (no fp64 copy of G)."""
    bias = b if b is not None else W.new_zeros(W.shape[0])
    Wt = torch.cat([W, bias[:, None]], 1).to(G.dtype)  # (d_out, n+1)
    return quadratic_form(Wt, G)  # G may be in host memory


def apply_result(stream: LayerStream, layer: nn.Module, kind: str, res: ModuleResult) -> None:
    """Writes a rule's weights into the layer and removes the pruned units physically."""
    ad = stream.adapter
    lin = ad.out_proj(layer, kind)
    lin.weight.data.copy_(res.W.to(lin.weight.dtype))
    set_output_bias(lin, res.b)
    if kind == "attn":
        ad.keep_heads(layer, res.kept.cpu())
    else:
        ad.keep_channels(layer, res.kept.cpu())


def _masked_forward_outputs(stream, index, layer, kind, res, inputs: Batches) -> Batches:
    """Outputs of `layer` with module `kind` replaced by the rule's weights (units zeroed, not
    removed), restoring the dense weights afterwards. Used for sensitivity streams."""
    lin = stream.adapter.out_proj(layer, kind)
    w0 = lin.weight.data.clone()
    b0 = lin.bias.data.clone() if lin.bias is not None else None
    had_bias = lin.bias is not None
    try:
        lin.weight.data.copy_(res.W.to(lin.weight.dtype))
        set_output_bias(lin, res.b)
        return stream.run_layer(index, layer, inputs)
    finally:
        lin.weight.data.copy_(w0)
        if had_bias:
            lin.bias.data.copy_(b0)
        else:
            lin.bias = None


def _solver_scope(stream: LayerStream, nbytes: int, solves: bool):
    """The solver's buffers, counted only for the methods whose rules solve (`Method.solves`)."""
    return stream.ledger.held("solver", nbytes) if solves else contextlib.nullcontext()


@torch.no_grad()
def collect_stats(
    stream: LayerStream,
    calib_ids: torch.Tensor,
    score_fn: ScoreFn,
    emit: Emitter,
    sensitivity_rule: Callable[..., ModuleResult] | None = None,
    owl_m: float = 5.0,
    sensitivity_windows: int = 4,
    solves: bool = True,
    weigh: TokenWeights | None = None,
) -> tuple[list[LayerStats], dict]:
    """Pass 1 over the dense model. With `sensitivity_rule`, each module is also pruned alone (by
    that rule, on this layer's dense Gram) and the first `sensitivity_windows` calibration windows
    are streamed through the rest of the dense model from there: one extra activation stream per
    module in host memory, one layer on the device. Returns the stats and the dense calib loss.
    With `solves` and `stream.host_grams`, a layer's Grams move to host memory as soon as they are
    accumulated, so the solves that score the units never sit next to them. `weigh`: the token
    weights of the Grams (None: plain Grams); pass 2 must be given the same."""
    ledger = stream.ledger
    host = solves and stream.host_grams
    weighted = weigh is not None
    x = stream.embed(calib_ids)
    emit("embed", -1)
    sens_ids = calib_ids[:sensitivity_windows]
    dense_sub = stream.embed(sens_ids) if sensitivity_rule else None
    perturbed: dict[tuple[int, str], Batches] = {}
    stats: list[LayerStats] = []
    for i in range(stream.n_layers):
        with stream.layer_on_device(i) as layer:
            lay = stream.adapter.layout(layer)
            hooks = {k: _gram_hook(stream, stream.adapter.out_proj(layer, k), weigh) for k in ("attn", "mlp")}
            energy = [0.0, 0, 0.0]  # sum ||h||^2, tokens, sum 1 / ||h||^2

            def residual(_b, xin, _y, acc=energy):
                n2 = xin.float().pow(2).sum(-1)
                acc[0] += float(n2.sum())
                acc[1] += xin.shape[0] * xin.shape[1]
                acc[2] += float((1.0 / n2.clamp_min(1e-30)).sum())

            # the Grams' scope is not a block: on the host path they leave the device once read,
            # otherwise they stay until the layer's scores (and sensitivities) are taken
            grams_held = sum(gram_bytes(h.module.in_features) for h in hooks.values())
            with hooks["attn"], hooks["mlp"]:
                ledger.hold("grams", grams_held)
                x = stream.run_layer(i, layer, x, on_batch=residual, weighted=weighted)
            grams = {}
            for k, h in hooks.items():
                if host:
                    grams[k] = h.to_host()
                    continue
                with ledger.held("gram-check", gram_check_bytes(h.module.in_features)):
                    grams[k] = h.gram
            if host:
                ledger.release("grams")
            st = LayerStats(lay, {}, {}, energy[0] / max(energy[1], 1), residual_energy_hm=energy[1] / max(energy[2], 1e-30))
            wanda = []  # (W, G) per module, for OWL's outlier ratio
            for kind in ("attn", "mlp"):
                W, b = weight_with_bias(stream.adapter.out_proj(layer, kind))
                with _solver_scope(stream, saliency_bytes(W.shape[0], W.shape[1], _group(lay, kind)), solves):
                    st.scores[kind] = score_fn(kind, W, b, grams[kind], lay).double().cpu()
                # with the Grams on the host, quadratic_form copies G over in column blocks instead
                with contextlib.nullcontext() if host else ledger.held("energy", output_energy_bytes(*W.shape)):
                    st.out_energy[kind] = module_output_energy(W, b, grams[kind])
                wanda.append((W, grams[kind]))
            st.outlier_ratio = outlier_ratio(wanda, owl_m)
            del wanda  # it references the Grams
            if sensitivity_rule is not None:
                for key in list(perturbed):
                    perturbed[key] = stream.run_layer(i, layer, perturbed[key])
                for kind in ("attn", "mlp"):
                    W, b = weight_with_bias(stream.adapter.out_proj(layer, kind))
                    with ledger.held("solver", solver_bytes(W.shape[0], W.shape[1], _group(lay, kind))):
                        res = sensitivity_rule(kind, i, W, b, grams[kind], lay)
                    perturbed[(i, kind)] = _masked_forward_outputs(stream, i, layer, kind, res, dense_sub)
                dense_sub = stream.run_layer(i, layer, dense_sub)
            ledger.release("grams")
            # nothing references this layer's Grams past here (the hooks hold their sums): the
            # next layer accumulates its own without them (they stayed to here until 2026-12)
            del grams, hooks, h  # `h`: the loop's last hook
        stats.append(st)
        emit("pass1", i)
    calib_loss = {}
    if sensitivity_rule is not None:  # the head on every perturbed stream: one step per module
        emit("sensitivity", -1, step=0, steps=len(perturbed))
        nll, tokens = stream.logits_nll(dense_sub, sens_ids)
        base = float(nll.sum()) / tokens
        calib_loss["dense"] = base
        for j, ((i, kind), h) in enumerate(perturbed.items()):
            nll, _ = stream.logits_nll(h, sens_ids)
            stats[i].sensitivity[kind] = float(nll.sum()) / tokens - base
            emit("sensitivity", -1, step=j + 1, steps=len(perturbed))
    return stats, calib_loss


@torch.no_grad()
def prune_sequential(
    stream: LayerStream,
    calib_ids: torch.Tensor,
    keep_counts: list[dict[str, int]],
    rule: RuleFn,
    emit: Emitter,
    target: str = "local",
    solves: bool = True,
    refine: Callable[..., dict] | None = None,
    weigh: TokenWeights | None = None,
    damp: float = DAMP_REL,
    commit_layer: Callable[[int, nn.Module, list[dict]], None] | None = None,
    start: int = 0,
    dense_layer_on_device: Callable[[int], contextlib.AbstractContextManager[nn.Module]] | None = None,
) -> list[dict]:
    """Pass 2: prunes every layer with `keep_counts[i][kind]` units kept. target="dense" also
    streams the dense model's activations and fits each module to the dense model's output of that
    module (cross-Gram at damping `damp`; docs/METHOD.md "Targets"). Returns one info dict per
    module. With `solves` and `stream.host_grams` (local targets), each Gram moves to host memory
    before its solve. `refine` (refine.fit_layer's signature, settings bound) is called on each
    pruned layer before the calibration batches move on through it; its report lands in the
    layer's MLP info. `weigh`: the token weights pass 1 used (None: plain Grams). `commit_layer(i,
    layer, infos)` is called on each finished layer while it is still on the device, with its
    modules' infos (disk streaming writes it out there: resume.RunJournal). `start`: the layers
    before it were pruned by an interrupted run: their pruned weights (the stream's residency
    reads them) only run forward, rebuilding the calibration activations, and target="dense"
    also runs each one's dense layer, `dense_layer_on_device(i)`; their infos are the caller's."""
    ad = stream.adapter
    ledger = stream.ledger
    host = solves and stream.host_grams and target == "local"
    weighted = weigh is not None
    x = stream.embed(calib_ids)
    xd = x if target == "dense" else None
    infos = []
    for i in range(start):  # pruned before an interruption: forward only, as the pruned layer ran then
        with stream.layer_on_device(i) as layer:
            x = stream.run_layer(i, layer, x)
        if xd is not None:
            with dense_layer_on_device(i) as dense_layer:
                xd = stream.run_layer(i, dense_layer, xd)
        emit("pass2", i, "pruned before the interruption: forward only")
    for i in range(start, stream.n_layers):
        first = len(infos)
        with stream.layer_on_device(i) as layer, contextlib.ExitStack() as scope:
            dense_layer = None
            if target == "dense" or refine is not None:  # the layer as it was, next to the one pruned
                scope.enter_context(ledger.held("dense-layer", layer_weight_bytes(ad.layout(layer), stream.dtype_bytes)))
                dense_layer = copy.deepcopy(layer)
            lay = ad.layout(layer)
            for kind in ("attn", "mlp"):
                k_keep = keep_counts[i][kind]
                n_units = lay.n_heads if kind == "attn" else lay.intermediate
                lin = ad.out_proj(layer, kind)
                W, b = weight_with_bias(lin)
                if k_keep >= n_units:
                    infos.append({"layer": i, "module": kind, "kept": n_units, "skipped": True})
                    continue
                # the Gram's scope ends early on the host path: released once it is on the host
                ledger.hold("grams", gram_bytes(lin.in_features))
                if target == "dense":
                    G, W_target = _dense_target_gram(stream, i, layer, dense_layer, kind, x, xd, weigh, damp)
                    W, b = W_target[:, :-1], W_target[:, -1]
                else:
                    hook = _gram_hook(stream, lin, weigh, stop=True)
                    with hook:
                        stream.run_layer(i, layer, x, keep_outputs=False, weighted=weighted)
                    if host:  # the solve copies the damped G it needs; the undamped one waits on the host
                        G = hook.to_host()
                        ledger.release("grams")
                    else:
                        with ledger.held("gram-check", gram_check_bytes(lin.in_features)):
                            G = hook.gram
                    hook = None
                rule_bytes = (solver_bytes(W.shape[0], W.shape[1], _group(lay, kind)) if solves
                              else column_rule_bytes(W.shape[0], W.shape[1], stream.dtype_bytes))
                with ledger.held("solver", rule_bytes):
                    res = rule(kind, i, W, b, G, lay, k_keep)
                    G = None  # not kept next to the next module's Gram
                    ledger.release("grams")
                apply_result(stream, layer, kind, res)
                lay = ad.layout(layer)
                infos.append({"layer": i, "module": kind, "kept": int(len(res.kept)), **res.info})
            if refine is not None and not all(info.get("skipped") for info in infos[-2:]):
                infos[-1]["refine"] = refine(stream, i, layer, dense_layer, x)
            x = stream.run_layer(i, layer, x)
            if dense_layer is not None:
                if target == "dense":
                    xd = stream.run_layer(i, dense_layer, xd)
                del dense_layer
            if commit_layer is not None:
                commit_layer(i, layer, infos[first:])
        emit("pass2", i)
    return infos


def _dense_target_gram(stream, i, layer, dense_layer, kind, x: Batches, xd: Batches,
                       weigh: TokenWeights | None, damp: float):
    """G of the pruned path's input and W_target = C G^-1 with C the cross-Gram of the dense
    module's output and the pruned path's input: fitting W' to W_target under G is the same as
    fitting W' P~ to the dense model's module output Y (up to a constant). G is damped by `damp`
    (relative to its mean diagonal, as every solve) for the solve that gives W_target."""
    ad = stream.adapter
    lin, lin_d = ad.out_proj(layer, kind), ad.out_proj(dense_layer, kind)
    n = lin.in_features
    G = torch.zeros(n + 1, n + 1, dtype=torch.float32, device=lin.weight.device)
    C = torch.zeros(lin_d.out_features, n + 1, dtype=torch.float32, device=lin.weight.device)
    tokens = 0
    Wd = torch.cat([lin_d.weight.float(), (lin_d.bias.float() if lin_d.bias is not None else
                                           torch.zeros(lin_d.out_features, device=lin_d.weight.device))[:, None]], 1)
    for b in range(len(x)):
        cap_p, cap_d = InputCapture(lin, stop=True), InputCapture(lin_d, stop=True)
        with cap_p:
            stream.run_layer(i, layer, Batches([x.tensors[b]]), keep_outputs=False, weighted=weigh is not None)
        with cap_d:
            stream.run_layer(i, dense_layer, Batches([xd.tensors[b]]), keep_outputs=False, weighted=weigh is not None)
        p, pd = cap_p.value, cap_d.value  # (T_b, n+1)
        if weigh is not None:  # both Grams weighted by the pruned path's tokens (gram.py)
            y = torch.nn.functional.linear(p[:, :-1].to(lin.weight.dtype), lin.weight, lin.bias)
            w = weigh(y, x.tensors[b].to(p.device))
            del y
            tokens += float(w.sum(dtype=torch.float64))
            w.sqrt_()
            p.mul_(w[:, None])
            pd.mul_(w[:, None])
        else:
            tokens += p.shape[0]
        G.addmm_(p.T, p)
        C.addmm_(Wd @ pd.T, p)
    G, C = G / tokens, C / tokens
    Gd = G.double() + damp * G.diagonal().mean().double() * torch.eye(n + 1, dtype=torch.float64, device=G.device)
    W_target = torch.linalg.solve(Gd, C.double().T).T
    return G, W_target


def outlier_ratio(modules: list[tuple[torch.Tensor, torch.Tensor]], m: float) -> float:
    """OWL's layer outlier distribution: share of element scores |W_ij| ||X_j|| above m x their
    mean, over the layer's two output projections (whose input norms the Grams carry). Two passes
    over each module instead of one concatenated score matrix."""

    def scores(W, G):
        return W.abs().float() * G.diagonal()[:-1].clamp_min(0).sqrt().float().to(W.device)[None, :]

    total = sum(float(scores(W, G).sum(dtype=torch.float64)) for W, G in modules)
    count = sum(W.numel() for W, _ in modules)
    thresh = m * total / count
    return sum(int((scores(W, G) > thresh).sum()) for W, G in modules) / count
