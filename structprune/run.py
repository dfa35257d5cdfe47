"""One pruning run from a `PruneConfig`: data, dense evaluation, the method's passes, pruned
evaluation, and the JSON record of PROTOCOL.md. The CLI, the app and the benchmarks all call
`run_prune`."""

from __future__ import annotations

import copy
import functools
import logging
import math
import platform
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .adapters import adapter_for
from .config import PruneConfig
from .data.corpora import corpus_id, corpus_label
from .data.windows import (CalibrationSpec, calibration_windows, corpus_token_ids, eval_windows,
                           heldout_calibration_windows, protocol_string)
from .errors import DeviceOutOfMemoryError, SequenceLengthError
from .evaluation import check_seqlen, perplexity, resolve_device
from .memory import DTYPE_BYTES, DeviceLedger
from .methods import get_method
from .models import LoadedModel, load_model
from .pipeline import Emitter, ProgressEvent, collect_stats, prune_sequential
from .refine import fit_layer
from .streaming import LayerStream
from .units import count_params, layouts_of, module_specs

log = logging.getLogger(__name__)

RECORD_SCHEMA = "structprune.run/1"
CALIB_LOSS_WINDOWS = 8  # calibration windows of the pruned model's calibration loss (calib_loss["pruned"])
HELDOUT_LOSS_WINDOWS = 16  # held-out calibration windows of calib_loss["heldout"], which choices are made by


@dataclass
class PruneResult:
    record: dict
    model: torch.nn.Module  # the pruned model (on the CPU)
    tokenizer: object | None


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def environment() -> dict:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpus": torch.get_num_threads(), "gpu": gpu, "git_commit": commit}


def calibration_ids(cfg: PruneConfig, tokenizer, vocab: int) -> torch.Tensor:
    """The run's calibration windows (nsamples, seqlen): from the calibration split, or random
    tokens for tiny demo models without a tokenizer."""
    if tokenizer is None:
        return random_token_data(cfg, vocab)[0]
    return calibration_windows(corpus_token_ids(tokenizer, cfg.calib_data, "calib"), cfg.nsamples, cfg.seqlen,
                               cfg.seed)


def prepare_data(cfg: PruneConfig, tokenizer, model) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Calibration windows (N, S) and evaluation windows per corpus, with their protocol strings."""
    check_seqlen(model, cfg.seqlen)
    calib_ids = calibration_ids(cfg, tokenizer, model.config.vocab_size)
    calib = CalibrationSpec(corpus_id(cfg.calib_data, "calib"), cfg.nsamples, cfg.seqlen, cfg.seed)
    evals, protocols = {}, {}
    for name in cfg.eval_data:
        win = eval_windows(corpus_token_ids(tokenizer, name, "test"), cfg.seqlen, cfg.eval_windows)
        evals[name] = win
        protocols[name] = protocol_string(corpus_id(name, "test"), cfg.seqlen, win.shape[0], calib)
    return calib_ids, evals, protocols


def heldout_ids(cfg: PruneConfig, tokenizer, vocab: int) -> torch.Tensor | None:
    """HELDOUT_LOSS_WINDOWS windows of the calibration split disjoint from the calibration windows
    (random tokens for tiny demo models); None, with a warning, when the calibration windows leave
    too few."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(cfg.seed + 2)
        return torch.randint(0, vocab, (HELDOUT_LOSS_WINDOWS, cfg.seqlen), generator=g)
    try:
        return heldout_calibration_windows(corpus_token_ids(tokenizer, cfg.calib_data, "calib"),
                                           HELDOUT_LOSS_WINDOWS, cfg.seqlen, cfg.nsamples, cfg.seed)
    except SequenceLengthError as exc:
        log.warning("no held-out calibration loss: %s", exc)
        return None


def pass1_key(cfg: PruneConfig, loaded: LoadedModel, sensitivity: bool) -> tuple:
    """What pass-1 statistics depend on (the model object, its data and the scoring rule)."""
    sens = (cfg.sparsity, cfg.selector, cfg.refit, cfg.sensitivity_windows) if sensitivity else None
    relative = get_method(cfg.method)(cfg).relative_grams()
    return (id(loaded.model), cfg.method, cfg.saliency, cfg.bias, cfg.calib_data, cfg.nsamples, cfg.seqlen,
            cfg.seed, cfg.owl_m, cfg.dtype, cfg.batch_size, relative, cfg.damp, sens)


def random_token_data(cfg: PruneConfig, vocab: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Tiny demo models have no tokenizer: random token windows (labelled as such)."""
    g = torch.Generator().manual_seed(cfg.seed)
    calib = torch.randint(0, vocab, (cfg.nsamples, cfg.seqlen), generator=g)
    n_eval = cfg.eval_windows or 4
    win = torch.randint(0, vocab, (n_eval, cfg.seqlen), generator=torch.Generator().manual_seed(cfg.seed + 1))
    proto = protocol_string("random-tokens", cfg.seqlen, n_eval, ("random-tokens", cfg.nsamples, cfg.seqlen, cfg.seed))
    return calib, {"random": win}, {"random": proto}


def pass1_stats(method, stream: LayerStream, calib_ids: torch.Tensor, specs, emit: Emitter,
                stats_cache: dict | None = None, stats_key: tuple | None = None,
                sensitivity: bool | None = None) -> tuple[list, dict]:
    """Pass 1 of a layer-wise method: per-layer statistics, with the module sensitivities when
    `sensitivity` (default: when the method wants them; measured at the uniform allocation with a
    one-shot selector), and the dense calibration loss. Looked up in / stored into `stats_cache`
    under `stats_key`."""
    cfg = method.cfg
    stream.relative_grams = method.relative_grams()  # pass 2 (prune_sequential) reads it too
    if stats_cache is not None and stats_key in stats_cache:
        stats, calib_loss = stats_cache[stats_key]
        return stats, dict(calib_loss)
    if not method.needs_calibration:
        return [], {}
    sens_rule = None
    if method.wants_sensitivity() if sensitivity is None else sensitivity:
        from .allocation import allocate_uniform

        u = allocate_uniform(specs, cfg.sparsity, s_max=cfg.s_max)
        uniform_keep = {(sp.layer, sp.kind): int(k) for sp, k in zip(specs, u.units_kept)}

        def sens_rule(kind, i, W, b, G, lay):
            # one-shot OBS selection + refit: the measured loss only ranks modules, and this is
            # the pass's most frequent solve
            return method.rule(kind, i, W, b, G, lay, uniform_keep[(i, kind)], selector="saliency")

    stats, calib_loss = collect_stats(
        stream, calib_ids, method.score, emit, sensitivity_rule=sens_rule,
        sensitivity_windows=min(cfg.sensitivity_windows, calib_ids.shape[0]), owl_m=cfg.owl_m,
        solves=method.solves)
    if stats_cache is not None:
        stats_cache[stats_key] = (stats, dict(calib_loss))
    return stats, calib_loss


def prune_layerwise(method, stream: LayerStream, calib_ids: torch.Tensor, specs, emit: Emitter,
                    stats_cache: dict | None = None, stats_key: tuple | None = None):
    """A layer-wise method end to end on a stream: pass 1 (statistics; sensitivities when the
    method wants them, measured with a one-shot selector), allocation, pass 2. Returns
    (allocation, energy info, per-module infos, calibration losses, pass timings). The model in
    the stream is pruned in place."""
    cfg = method.cfg
    timing = {}
    t = time.perf_counter()
    stats, calib_loss = pass1_stats(method, stream, calib_ids, specs, emit, stats_cache, stats_key)
    timing["pass1_s"] = time.perf_counter() - t
    alloc, energy_info = method.allocate(specs, stats)
    keep = [{} for _ in range(stream.n_layers)]
    for sp, k in zip(specs, alloc.units_kept):
        keep[sp.layer][sp.kind] = int(k)
    t = time.perf_counter()
    if method.needs_calibration:
        refine = None
        if cfg.refine_epochs:
            refine = functools.partial(fit_layer, epochs=cfg.refine_epochs, lr=cfg.refine_lr, seed=cfg.seed,
                                       schedule=cfg.refine_schedule)
        infos = prune_sequential(stream, calib_ids, keep, method.rule, emit, target=cfg.target,
                                 solves=method.solves, refine=refine)
    else:
        infos = method.prune_weights_only(stream.model, stream.adapter, keep)
    timing["pass2_s"] = time.perf_counter() - t
    if stats:
        energy_info["sensitivity"] = [
            {"layer": i, "module": k, "delta_loss": v} for i, st in enumerate(stats) for k, v in st.sensitivity.items()]
        energy_info["residual_energy"] = [st.residual_energy for st in stats]
        energy_info["residual_energy_hm"] = [st.residual_energy_hm for st in stats]
    return alloc, energy_info, infos, calib_loss, timing


def run_prune(
    cfg: PruneConfig,
    loaded: LoadedModel | None = None,
    on_event=None,
    cancel=None,
    evaluate_dense: bool = True,
    stats_cache: dict | None = None,
) -> PruneResult:
    """Prunes a copy of `loaded` (or of `cfg.model`, loaded here) and evaluates it.

    stats_cache: a dict shared across runs; pass-1 statistics are kept in it under a key of
    everything they depend on, so sweeps over allocations and temperatures stream pass 1 once.

    on_event(ProgressEvent) is called per layer and stage; cancel (a threading.Event) is checked at
    every layer boundary and raises RunCancelledError. The loaded model is never modified.
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = _dtype(cfg.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        log.warning("half precision on the CPU is slow and inexact; using float32")
        dtype = torch.float32
    loaded = loaded or load_model(cfg.model)
    model = copy.deepcopy(loaded.model).to(dtype).eval()
    adapter = adapter_for(model)
    method = get_method(cfg.method)(cfg)

    if loaded.tokenizer is not None:
        calib_ids, evals, protocols = prepare_data(cfg, loaded.tokenizer, model)
    else:
        check_seqlen(model, cfg.seqlen)
        calib_ids, evals, protocols = random_token_data(cfg, model.config.vocab_size)
    if method.wants_sensitivity() and calib_ids.shape[0] < cfg.sensitivity_windows:
        raise SequenceLengthError(
            f"sensitivity_windows ({cfg.sensitivity_windows}) exceeds nsamples ({calib_ids.shape[0]}); "
            "lower --sensitivity-windows or raise --nsamples")

    ledger = DeviceLedger(device)
    stream = LayerStream(model, adapter, device, ledger=ledger, batch_size=cfg.batch_size)
    emit = Emitter(stream, on_event, cancel, t_start)
    params_before = count_params(model, adapter)
    layouts = layouts_of(model, adapter)
    specs = module_specs(layouts)
    timing: dict[str, float] = {}

    def evaluate(tag: str) -> dict:
        out = {}
        t = time.perf_counter()
        for name, win in evals.items():
            res = perplexity(model, win, device=device, batch_size=cfg.batch_size, protocol=protocols[name])
            out[name] = {**res.to_dict(), "label": corpus_label(name, "test") if name != "random" else "random tokens"}
            emit(f"eval-{tag}", -1, f"{name}: ppl {res.value:.4g}")
        timing[f"eval_{tag}_s"] = time.perf_counter() - t
        return out

    heldout = heldout_ids(cfg, loaded.tokenizer, model.config.vocab_size)
    try:
        ppl_dense = evaluate("dense") if evaluate_dense else {}
        if evaluate_dense and heldout is not None:
            calib_loss_dense_heldout = heldout_nll(model, heldout, device, cfg.batch_size)[0]
        if ledger.measured:  # the dense evaluation may hold the whole model: not pruning's peak
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        if method.whole_model:
            alloc, energy_info, infos, calib_loss = method.prune_whole(model, adapter, calib_ids, specs, stream, emit)
            timing["pass1_s"] = time.perf_counter() - t
        else:
            key = pass1_key(cfg, loaded, method.wants_sensitivity())
            alloc, energy_info, infos, calib_loss, passes = prune_layerwise(
                method, stream, calib_ids, specs, emit, stats_cache=stats_cache, stats_key=key)
            timing.update(passes)
        prune_peak = ledger.peak  # before the evaluations, which may hold the whole model
        if evaluate_dense and heldout is not None:
            calib_loss["heldout_dense"] = calib_loss_dense_heldout
        calib_loss["pruned"], calib_loss["pruned_windows"] = calibration_nll(model, calib_ids, device, cfg.batch_size)
        if heldout is not None:
            calib_loss["heldout"], calib_loss["heldout_windows"] = heldout_nll(model, heldout, device, cfg.batch_size)
        ppl_pruned = evaluate("pruned")
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
        raise DeviceOutOfMemoryError(
            "the GPU ran out of memory; lower --nsamples, --seqlen or --batch-size, or use --device cpu") from exc

    params_after = count_params(model, adapter)
    # prunable parameters left, counted with the dense model's unit costs (after pruning, a GQA
    # layer with one head per group would look like multi-head attention to the layout)
    kept_units = {(sp.layer, sp.kind): sp.n_units for sp in specs}
    for info in infos:
        kept_units[(info["layer"], info["module"])] = info["kept"]
    prunable_after = sum(kept_units[(sp.layer, sp.kind)] * sp.unit_params for sp in specs)
    timing["total_s"] = time.perf_counter() - t_start
    emit("done", -1)
    record = {
        "schema": RECORD_SCHEMA,
        "run_id": uuid.uuid4().hex[:12],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "finished",
        "model": {"name": loaded.name, "source": loaded.source, "description": loaded.description,
                  "architecture": model.config.model_type, "n_layers": len(layouts),
                  "weights_note": "4-bit GGUF dequantized to fp32" if loaded.source == "builtin" else None},
        "method": cfg.method,
        "allocation_scheme": alloc.scheme,  # what ran (baselines fix their own; cfg.allocation may not apply)
        "config": cfg.to_dict(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "sparsity": {
            "target": cfg.sparsity,
            "achieved_prunable": 1 - prunable_after / params_before.prunable,
            "achieved_total": 1 - params_after.total / params_before.total,
            "allocation_target_params": alloc.params_target,
            "allocation_pruned_params": alloc.params_pruned,
        },
        "params": {"before": params_before.to_dict(), "after": {"total": params_after.total, "prunable": prunable_after}},
        "allocation": [{**r, "energy": (energy_info.get("values") or [None] * len(specs))[j]}
                       for j, r in enumerate(alloc.to_records())],
        "energies": {k: v for k, v in energy_info.items() if k != "values"},
        "ppl": {"dense": ppl_dense, "pruned": ppl_pruned},
        "calib_loss": calib_loss,
        "modules": infos,
        "memory": {"kind": ledger.kind, "peak_bytes": prune_peak,
                   "model_weight_bytes": params_before.total * DTYPE_BYTES[dtype],
                   "timeline": ledger.timeline_records()},
        "timing": timing,
        "environment": environment(),
    }
    return PruneResult(record, model, loaded.tokenizer)


def calibration_nll(model: torch.nn.Module, calib_ids: torch.Tensor, device: torch.device,
                    batch_size: int = 1) -> tuple[float, int]:
    """Mean next-token NLL (nats/token) of `model` on the first CALIB_LOSS_WINDOWS calibration
    windows, and how many were used. In-sample: the refit was fitted to these tokens, so choices
    are made by heldout_nll instead (and never by test perplexity)."""
    return heldout_nll(model, calib_ids[:CALIB_LOSS_WINDOWS], device, batch_size)


def heldout_nll(model: torch.nn.Module, windows: torch.Tensor, device: torch.device,
                batch_size: int = 1) -> tuple[float, int]:
    """Mean next-token NLL (nats/token) on `windows` (held-out calibration windows, see
    heldout_ids: the loss temperatures and energies are chosen by), and how many."""
    res = perplexity(model, windows, device=device, batch_size=batch_size)
    return res.nll / res.tokens, int(windows.shape[0])


def forward_floor_seconds(model: torch.nn.Module, calib_ids: torch.Tensor, device: torch.device, batch_size: int = 1) -> float:
    """Wall time of one plain forward pass over the calibration set: the floor pruning is
    compared with (PROTOCOL.md)."""
    t = time.perf_counter()
    perplexity(model, calib_ids, device=device, batch_size=batch_size)
    return time.perf_counter() - t


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


__all__ = ["PruneResult", "run_prune", "ProgressEvent", "RECORD_SCHEMA"]
