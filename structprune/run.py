"""One pruning run from a `PruneConfig`, as docs/PROTOCOL.md defines it: the data, the dense
evaluation, the pruning (by `engine.PruneEngine`), the pruned evaluation, and the JSON record.
The CLI, the app's jobs and the benchmarks all call `run_prune`; this module holds the protocol,
not the streaming loop."""

from __future__ import annotations

import copy
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
from .cancel import cancel_scope, window_span
from .cancel import check as check_cancel
from .config import PruneConfig
from .data.calibration import HELDOUT_LOSS_WINDOWS, calibration_ids, heldout_ids, random_token_data
from .data.corpora import corpus_id, corpus_label
from .data.windows import CalibrationSpec, corpus_token_ids, eval_windows, protocol_string
from .engine import PruneEngine, check_sensitivity_windows, pass1_key
from .errors import DeviceOutOfMemoryError, NonFiniteResultError, SequenceLengthError
from .evaluation import check_seqlen, perplexity, resolve_device
from .jsonio import strict_record
from .memory import DTYPE_BYTES, return_freed_host_memory
from .methods import Method, get_method
from .models import LoadedModel, load_model, weights_on_disk
from .pipeline import ProgressEvent
from .preflight import check_reachable, preflight
from .resume import RunJournal, start_disk_run
from .speed import speed_section
from .units import count_params, layouts_of, module_specs
from .weights import DiskResidency, SafetensorsSource

log = logging.getLogger(__name__)

RECORD_SCHEMA = "structprune.run/1"
CALIB_LOSS_WINDOWS = 8  # calibration windows of the pruned model's calibration loss (calib_loss["pruned"])


@dataclass
class PruneResult:
    record: dict
    model: torch.nn.Module  # the pruned model (on the CPU; without weights when they stayed on disk)
    tokenizer: object | None
    layer_dir: Path | None = None  # with the weights on disk: the pruned layers' shards
    weights: SafetensorsSource | None = None  # ... and where every tensor of the pruned model is
    journal: RunJournal | None = None  # ... and the run's manifest (resume.py)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def run_dtype(cfg: PruneConfig) -> torch.dtype:
    """The dtype a run computes in: cfg.dtype, but float32 on the CPU."""
    return torch.float32 if resolve_device(cfg.device).type == "cpu" else _dtype(cfg.dtype)


def streams_from_disk(cfg: PruneConfig) -> bool:
    """Whether a run of `cfg` keeps the weights in their files (`cfg.weights`, auto decided by the
    model's size against the free host memory); the app then loads no model for it."""
    return weights_on_disk(cfg.weights, cfg.model, DTYPE_BYTES[run_dtype(cfg)])


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


def prepare_data(cfg: PruneConfig, tokenizer, model) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Calibration windows (N, S) and evaluation windows per corpus, with their protocol strings."""
    check_seqlen(model, cfg.seqlen)
    if tokenizer is None:
        return random_token_data(cfg, model.config.vocab_size)
    calib_ids = calibration_ids(cfg, tokenizer, model.config.vocab_size)
    calib = CalibrationSpec(corpus_id(cfg.calib_data, "calib"), cfg.nsamples, cfg.seqlen, cfg.seed)
    evals, protocols = {}, {}
    for name in cfg.eval_data:
        check_cancel()  # a corpus not tokenized yet takes a while
        try:
            win = eval_windows(corpus_token_ids(tokenizer, name, "test"), cfg.seqlen, cfg.eval_windows)
        except SequenceLengthError as exc:
            raise SequenceLengthError(f"--eval-data {name}: {exc}; lower --seqlen or --eval-windows") from None
        evals[name] = win
        protocols[name] = protocol_string(corpus_id(name, "test"), cfg.seqlen, win.shape[0], calib)
    return calib_ids, evals, protocols


def run_prune(
    cfg: PruneConfig,
    loaded: LoadedModel | None = None,
    on_event=None,
    cancel=None,
    evaluate_dense: bool = True,
    stats_cache: dict | None = None,
    method: Method | None = None,
    layer_dir: str | Path | None = None,
    activation_budget: int | None = None,
    resume: str | Path | None = None,
    run_id: str | None = None,
    finish: bool = True,
    measure_speed: bool = False,
) -> PruneResult:
    """Prunes a copy of `loaded` (or of `cfg.model`, loaded here) and evaluates it.

    stats_cache: a dict shared across runs; pass-1 statistics are kept in it under a key of
    everything they depend on, so sweeps over allocations and temperatures stream pass 1 once.
    method: a `Method` instance to run instead of `cfg.method`'s (a variant, e.g. an ablation).
    layer_dir: with the weights on disk (`cfg.weights`), where the pruned layers are written as
    they finish (default: a new folder under the run store's `streamed/`), and
    activation_budget: the host bytes of calibration activations per pass kept in memory before
    the rest go to memory-mapped files in layer_dir (default: a quarter of the free host memory).
    layer_dir also holds the run's manifest (resume.py), so a killed run can be continued:
    resume: the layer folder of an interrupted disk-streamed run to continue from its last
    finished layer (refused before any work if `cfg` differs from its settings, see
    resume.resume_config); run_id: the record's id (and the manifest's; default: a new one, or
    the resumed run's); finish=False leaves the manifest open (resumable) for a caller that
    still writes outputs and calls `PruneResult.journal.finish()` once they are written.

    measure_speed: time the pruned model against the dense one on the run's device afterwards (a few
    seconds, `speed.speed_section`); the record's "speed" holds the result.

    on_event(ProgressEvent) is called per layer and stage, and when a stage begins (in the order of
    planning.RUN_STAGES); cancel (a threading.Event) is checked at every layer boundary and inside
    every long loop (cancel.py) and raises RunCancelledError. The loaded model is never modified.
    """
    with cancel_scope(cancel):
        return _run_prune(cfg, loaded, on_event, cancel, evaluate_dense, stats_cache, method, layer_dir,
                          activation_budget, resume, run_id, finish, measure_speed)


def _run_prune(cfg: PruneConfig, loaded: LoadedModel | None, on_event, cancel, evaluate_dense: bool,
               stats_cache: dict | None, method: Method | None, layer_dir: str | Path | None,
               activation_budget: int | None, resume: str | Path | None, run_id: str | None, finish: bool,
               measure_speed: bool) -> PruneResult:
    t_start = time.perf_counter()
    preflight(cfg, model=loaded is None)  # every refusal the settings allow, before any weights load
    device = resolve_device(cfg.device)
    dtype = run_dtype(cfg)
    if dtype != _dtype(cfg.dtype):
        log.warning("half precision on the CPU is slow and inexact; using float32")
    method = method or get_method(cfg.method)(cfg)
    check_sensitivity_windows(method, cfg.nsamples)
    journal = None
    try:  # the journal's lock is released however the run ends
        if resume is not None:  # the folder, the settings and the model checked before any weights load
            journal = RunJournal.resume(resume, cfg, method, loaded)
            run_id = run_id or journal.run_id
        if loaded is None:
            loaded = load_model(cfg.model, on_disk=journal is not None or streams_from_disk(cfg))
        note = _preparing(on_event, loaded.model.config.num_hidden_layers, t_start)
        note("copying the model")
        model = copy.deepcopy(loaded.model).to(dtype).eval()
        # the loaded model's own layers (a pruned checkpoint's differ)
        check_reachable(cfg, module_specs(layouts_of(model, adapter_for(model))))
        note("drawing the calibration and evaluation windows")
        calib_ids, evals, protocols = prepare_data(cfg, loaded.tokenizer, model)
        residency = spill = None
        if loaded.weights is not None:  # the weights stay in their files; pruned layers go to layer_dir
            return_freed_host_memory()  # so the host's resident size stays flat in depth
            residency, journal, spill = start_disk_run(cfg, loaded, model, method, dtype, journal, layer_dir,
                                                       activation_budget, run_id)
            run_id = journal.run_id
            where = f"pruned layers and the run's manifest: {journal.folder} (if interrupted: --resume {journal.folder})"

        engine = PruneEngine(model, device, method, batch_size=cfg.batch_size, on_event=on_event, cancel=cancel,
                             t0=t_start, residency=residency, spill=spill)
        if journal is not None:
            engine.emit("journal", -1, where)
        params_before = count_params(model, engine.adapter)
        specs = engine.specs
        timing: dict[str, float] = {}

        def evaluate(tag: str) -> dict:
            out = {}
            t = time.perf_counter()
            total, done = sum(win.shape[0] for win in evals.values()), 0
            engine.emit(f"eval-{tag}", -1, step=0, steps=total)
            for name, win in evals.items():
                with window_span(done, total):  # one window count over all corpora
                    res = perplexity(model, win, device=device, batch_size=cfg.batch_size, protocol=protocols[name],
                                     residency=residency)
                done += win.shape[0]
                out[name] = {**res.to_dict(), "label": corpus_label(name, "test") if name != "random" else "random tokens"}
                engine.emit(f"eval-{tag}", -1, f"{name}: ppl {res.value:.4g}", step=done, steps=total)
            timing[f"eval_{tag}_s"] = time.perf_counter() - t
            return out

        heldout = heldout_ids(cfg, loaded.tokenizer, model.config.vocab_size)
        timing["prepare_s"] = time.perf_counter() - t_start
        try:
            ppl_dense = evaluate("dense") if evaluate_dense else {}
            if (reason := nonfinite_reason(ppl_dense, {}, {})) is not None:  # no pruning can mend the dense model
                raise NonFiniteResultError(reason)
            if evaluate_dense and heldout is not None:
                t = time.perf_counter()
                engine.emit("heldout-dense", -1, step=0, steps=heldout.shape[0])
                calib_loss_dense_heldout = heldout_nll(model, heldout, device, cfg.batch_size, residency)[0]
                timing["heldout_dense_s"] = time.perf_counter() - t
            if engine.ledger.measured:  # the dense evaluation may hold the whole model: not pruning's peak
                torch.cuda.reset_peak_memory_stats(device)
            key = pass1_key(method, id(loaded.model), method.wants_sensitivity())
            outcome = engine.run(calib_ids, cache=stats_cache, cache_key=key, journal=journal)
            timing.update(outcome.timing)
            calib_loss = outcome.calib_loss
            if evaluate_dense and heldout is not None:
                calib_loss["heldout_dense"] = calib_loss_dense_heldout
            t = time.perf_counter()
            n_loss = min(CALIB_LOSS_WINDOWS, calib_ids.shape[0]) + (heldout.shape[0] if heldout is not None else 0)
            engine.emit("losses-pruned", -1, step=0, steps=n_loss)
            with window_span(0, n_loss):
                calib_loss["pruned"], calib_loss["pruned_windows"] = calibration_nll(model, calib_ids, device,
                                                                                     cfg.batch_size, residency)
            if heldout is not None:
                with window_span(calib_loss["pruned_windows"], n_loss):
                    calib_loss["heldout"], calib_loss["heldout_windows"] = heldout_nll(model, heldout, device,
                                                                                       cfg.batch_size, residency)
            timing["losses_pruned_s"] = time.perf_counter() - t
            ppl_pruned = evaluate("pruned")
            speed = None
            if measure_speed:
                t = time.perf_counter()
                engine.emit("speed", -1, "timing the pruned model against dense")
                speed = ({"skipped": "the weights stay on disk: the dense model is not in memory"} if journal else
                         speed_section(model, loaded.model, device, dtype))
                timing["speed_s"] = time.perf_counter() - t
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
            raise DeviceOutOfMemoryError(
                "the GPU ran out of memory; lower --nsamples, --seqlen or --batch-size, or use --device cpu") from exc
        except FloatingPointError as exc:  # weights are finite (checked at load): activations overflowed
            hint = " at half precision: use --dtype float32" if dtype != torch.float32 else ""
            raise NonFiniteResultError(f"the run failed: {exc}{hint}") from exc

        alloc, energy_info, infos = outcome.allocation, outcome.energy_info, outcome.modules
        params_after = count_params(model, engine.adapter)
        # prunable parameters left, counted with the dense model's unit costs (after pruning, a GQA
        # layer with one head per group would look like multi-head attention to the layout)
        kept_units = {(sp.layer, sp.kind): sp.n_units for sp in specs}
        for info in infos:
            kept_units[(info["layer"], info["module"])] = info["kept"]
        prunable_after = sum(kept_units[(sp.layer, sp.kind)] * sp.unit_params for sp in specs)
        timing["total_s"] = time.perf_counter() - t_start
        engine.emit("done", -1)
        ledger = engine.ledger
        record = {
            "schema": RECORD_SCHEMA,
            "run_id": run_id or uuid.uuid4().hex[:12],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "finished",
            "model": {"name": loaded.name, "source": loaded.source, "description": loaded.description,
                      "architecture": model.config.model_type, "n_layers": engine.n_layers,
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
            "memory": {"kind": ledger.kind, "peak_bytes": outcome.peak_bytes,
                       "model_weight_bytes": params_before.total * DTYPE_BYTES[dtype],
                       "timeline": ledger.timeline_records()},
            "timing": timing,
            "weights": ({"mode": "memory"} if journal is None else
                        {"mode": "disk", "pruned_layers": str(journal.folder), **residency.counts(),
                         "activation_budget_bytes": spill.budget_bytes, "activations_spilled_bytes": spill.spilled_bytes,
                         "resumed_at_layer": journal.resumed_at}),
            "environment": environment(),
        }
        if speed is not None:
            record["speed"] = speed
        reason = nonfinite_reason(ppl_dense, ppl_pruned, calib_loss)
        if reason is not None:
            record.update(status="failed", error=reason)
            raise NonFiniteResultError(reason, strict_record(record))
        if journal is not None and finish:
            journal.finish(record["run_id"])
        return PruneResult(strict_record(record), model, loaded.tokenizer, journal.folder if journal else None,
                           residency.source if residency else None, journal)
    finally:
        if journal is not None:
            journal.close()


def _preparing(on_event, n_layers: int, t_start: float):
    """note(message): checks for cancellation and reports the "prepare" stage (copying the model,
    drawing the data) before the engine, which reports everything after it, exists."""

    def note(message: str) -> None:
        check_cancel()
        if on_event is not None:
            on_event(ProgressEvent("prepare", -1, n_layers, time.perf_counter() - t_start, 0, 0, message))

    return note


def nonfinite_reason(ppl_dense: dict, ppl_pruned: dict, calib_loss: dict) -> str | None:
    """Why a run's results are unusable (a perplexity or a loss that is NaN or inf), or None."""
    bad = [f"{tag} perplexity on {name}" for tag, ppl in (("dense", ppl_dense), ("pruned", ppl_pruned))
           for name, r in ppl.items() if not r.get("finite", is_finite(r.get("value")))]
    bad += [f"calibration loss '{k}'" for k, v in calib_loss.items()
            if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return None
    return (f"the run failed: {', '.join(bad)} is not finite (NaN or inf); the weights were finite when loaded, "
            "so the model overflowed: try --dtype float32 or a lower --sparsity")


def calibration_nll(model: torch.nn.Module, calib_ids: torch.Tensor, device: torch.device,
                    batch_size: int = 1, residency: DiskResidency | None = None) -> tuple[float, int]:
    """Mean next-token NLL (nats/token) of `model` on the first CALIB_LOSS_WINDOWS calibration
    windows, and how many were used. In-sample: the refit was fitted to these tokens, so choices
    are made by heldout_nll instead (and never by test perplexity)."""
    return heldout_nll(model, calib_ids[:CALIB_LOSS_WINDOWS], device, batch_size, residency)


def heldout_nll(model: torch.nn.Module, windows: torch.Tensor, device: torch.device,
                batch_size: int = 1, residency: DiskResidency | None = None) -> tuple[float, int]:
    """Mean next-token NLL (nats/token) on `windows` (held-out calibration windows, see
    heldout_ids: the loss temperatures and energies are chosen by), and how many."""
    res = perplexity(model, windows, device=device, batch_size=batch_size, residency=residency)
    return res.nll / res.tokens, int(windows.shape[0])


def forward_floor_seconds(model: torch.nn.Module, calib_ids: torch.Tensor, device: torch.device, batch_size: int = 1) -> float:
    """Wall time of one plain forward pass over the calibration set: the floor pruning is
    compared with (docs/PROTOCOL.md)."""
    t = time.perf_counter()
    perplexity(model, calib_ids, device=device, batch_size=batch_size)
    return time.perf_counter() - t


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


__all__ = ["PruneResult", "run_prune", "run_dtype", "streams_from_disk", "NonFiniteResultError", "nonfinite_reason", "ProgressEvent", "RECORD_SCHEMA", "calibration_ids", "heldout_ids",
           "random_token_data", "HELDOUT_LOSS_WINDOWS", "prepare_data"]
