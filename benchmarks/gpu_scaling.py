"""GPU memory and time of structprune vs whole-model methods as models grow (issue 6).

    python3 benchmarks/gpu_scaling.py --out "$OUT" --budget-s 500     # on the GPU machine
    python3 benchmarks/gpu_scaling.py --cpu-smoke --out /tmp/smoke    # the same flow, tiny, on CPU
    python3 benchmarks/gpu_scaling.py --plan                           # the plan and predicted times

Random-weight models from real configs (OPT 125m-13b, Llama-2 7b/13b, SmolLM2-135M) run in bf16 on
CUDA. Steps, most important first, each checking one wall-clock budget:

  scaling      structprune + global-taylor at 32 x 2048, sizes ascending: peak memory, pass times
  correctness  structprune on CUDA (fp32 and bf16) against the CPU fp32 run on tiny configs
  speed        tokens/s of the 7b shape, dense vs 20/30/50% structurally pruned, prefill and decode
  long         128 x 2048: structprune on the 7b shape at full depth (the "< 10 minutes" bar; when
               the budget left cannot afford it, its first 8 layers, extrapolated), then more
  wanda        wanda-sp at 32 x 2048 (when the method exists in this checkout)

One JSON record per run (`gpu-<config>-<method>-<n>x<seqlen>.json`), written as soon as the run
ends, and `gpu-summary.json` rewritten after every run, so a kill loses at most the run under way.
A run that runs out of memory or fails is a record (status "oom" / "error"), never a crash; a run
the budget cannot afford is recorded as "skipped". Layer-wise methods on models of 2B parameters
and more run on their first 4 decoder layers only (`layers_run`): every layer has the same shape
and only one is ever on the device, so the device peak is that of the whole model, and the full
model's pass times are extrapolated from the per-layer times (`*_full` fields, marked as such).
Whole-model methods always run on the whole model.

Only torch, transformers and structprune are imported (the GPU machine's image has nothing else).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
import transformers  # noqa: E402

import gpu_configs as gcfg  # noqa: E402
from structprune.adapters import adapter_for  # noqa: E402
from structprune.allocation import allocate_uniform  # noqa: E402
from structprune.config import PruneConfig  # noqa: E402
from structprune.errors import DeviceOutOfMemoryError, InvalidConfigError, RunCancelledError  # noqa: E402
from structprune.estimate import estimate_memory  # noqa: E402
from structprune.memory import DTYPE_BYTES, DeviceLedger  # noqa: E402
from structprune.methods import get_method  # noqa: E402
from structprune.engine import PruneEngine  # noqa: E402
from structprune.units import count_params, layouts_of, module_specs  # noqa: E402

SCHEMA = "structprune.gpu-scaling/1"
SPARSITY = 0.3


# --- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    config_name: str
    method: str
    nsamples: int
    seqlen: int
    step: str
    sensitivity: bool = True  # softmax with measured sensitivities (the heavier pass 1) or uniform
    layers_run: int | None = None  # None: the whole depth
    fallback_layers: int | None = None  # when the whole depth does not fit the budget, run this many

    @property
    def filename(self) -> str:
        tail = f"-L{self.layers_run}" if self.layers_run else ""
        return f"gpu-{self.config_name}-{self.method}-{self.nsamples}x{self.seqlen}{tail}.json"


@dataclass(frozen=True)
class Profile:
    """What a run of the script covers: the real sizes on CUDA, or tiny ones on the CPU."""

    device: str
    dtype: torch.dtype
    configs: tuple[str, ...]
    short: tuple[int, int]  # nsamples x seqlen of the scaling step
    long: tuple[int, int]
    truncate_above: float  # parameters from which layer-wise runs use only `truncate_layers` layers
    truncate_layers: int
    validate_config: str  # run both whole and truncated: the two peaks must agree
    long_configs: tuple[str, ...]
    correctness_configs: tuple[str, ...]
    correctness_allocations: tuple[str, ...]
    correctness_shape: tuple[int, int]
    speed_config: str
    prefill: tuple[int, int]  # batch x seqlen
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_tokens: int


GPU = Profile("cuda", torch.bfloat16, tuple(gcfg.REAL_CONFIGS), (32, 2048), (128, 2048), 2e9, 4, "opt-1.3b",
              ("llama-2-7b", "llama-2-13b", "opt-13b"), ("tiny-llama", "tiny-opt"), ("uniform", "softmax"), (8, 128),
              "llama-2-7b", (16, 2048), (1, 16), 128, 64)
SMOKE = Profile("cpu", torch.float32, ("smoke-opt-s", "smoke-opt-m", "smoke-llama-gqa"), (4, 32), (8, 32),
                1.5e5, 2, "smoke-opt-m", ("smoke-llama-gqa",), ("tiny-llama",), ("uniform",), (4, 32),
                "smoke-llama-mha", (2, 32), (1, 2), 8, 4)


def plan_runs(prof: Profile, steps: list[str], methods: list[str] | None = None,
              configs: list[str] | None = None) -> list[RunSpec | str]:
    """Runs in order; plain strings are the non-scaling steps ("correctness", "speed")."""
    names = [c for c in prof.configs if not configs or c in configs]

    def depth(name: str) -> int | None:
        cfg = gcfg.get_config(name)
        big = gcfg.n_params(cfg) >= prof.truncate_above and cfg.num_hidden_layers > prof.truncate_layers
        return prof.truncate_layers if big else None

    out: list[RunSpec | str] = []
    for step in steps:
        if step == "scaling":
            n, s = prof.short
            for name in names:
                out.append(RunSpec(name, "global-taylor", n, s, step))
                out.append(RunSpec(name, "structprune", n, s, step, layers_run=depth(name)))
                if name == prof.validate_config and depth(name) is None:
                    # the same size both ways: shows that the truncated run's peak is the whole run's
                    out.append(RunSpec(name, "structprune", n, s, step, layers_run=prof.truncate_layers))
        elif step == "wanda":
            n, s = prof.short
            out += [RunSpec(name, "wanda-sp", n, s, step, layers_run=depth(name)) for name in names]
        elif step == "long":
            n, s = prof.long
            first = [c for c in prof.long_configs if c in names]
            if first:  # the bar: the 7b shape, whole depth, default method (else 2x truncated)
                out.append(RunSpec(first[0], "structprune", n, s, step, fallback_layers=2 * prof.truncate_layers))
            for name in first[:2]:  # peak does not grow with nsamples (one window per step)
                out.append(RunSpec(name, "global-taylor", n, s, step))
            for name in first[1:]:
                out.append(RunSpec(name, "structprune", n, s, step, layers_run=depth(name)))
        elif step in ("correctness", "speed"):
            out.append(step)
        else:
            raise SystemExit(f"unknown step {step!r}")
    if methods:
        out = [r for r in out if isinstance(r, str) or r.method in methods]
    return out


# --- budget ------------------------------------------------------------------------------------

class Deadline:
    """Quacks like threading.Event for `Emitter`: set once the wall clock passes `at`."""

    def __init__(self, at: float, why: str = "budget") -> None:
        self.at, self.why = at, why

    def is_set(self) -> bool:
        return time.monotonic() > self.at


class Runner:
    def __init__(self, out: Path, budget_s: float, prof: Profile, tf32: bool = True) -> None:
        self.out, self.prof = out, prof
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.records: list[dict] = []
        self.ratios: dict[str, list[float]] = {}  # method -> measured / predicted
        self.device = torch.device(prof.device)
        self.tf32 = tf32
        out.mkdir(parents=True, exist_ok=True)
        self.env = environment(self.device)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def correction(self, method: str) -> float:
        r = sorted(self.ratios.get(method, []))
        return r[len(r) // 2] if r else 1.0

    def write(self, name: str, rec: dict) -> None:
        rec.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        path = self.out / name
        path.write_text(json.dumps(rec, indent=1, default=_json_default))
        if rec.get("kind") == "gpu-scaling":
            self.records.append(rec)
        self.write_summary(quiet=True)

    def write_summary(self, quiet: bool = False) -> dict:
        summary = summarize(self.records)
        summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        summary["environment"] = self.env
        (self.out / "gpu-summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
        if not quiet:
            print(format_summary(summary), flush=True)
        return summary


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def environment(device: torch.device) -> dict:
    commit = os.environ.get("STRUCTPRUNE_GIT_COMMIT")
    if not commit:
        try:
            from structprune.run import environment as env

            commit = env().get("git_commit")
        except Exception:  # noqa: BLE001 - no git on the machine is fine
            commit = None
    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": commit or None,
            "cpus": os.cpu_count()}


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, DeviceOutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


# --- one pruning run ----------------------------------------------------------------------------

class Meter:
    """Peak device bytes per segment (reset after each): measured on CUDA (max_memory_allocated),
    the ledger's accounted peak on the CPU; the accounted peak is kept on CUDA too, to show what
    the byte formulas miss."""

    def __init__(self, ledger: DeviceLedger) -> None:
        self.ledger = ledger
        self.cuda = ledger.device.type == "cuda"
        self.accounted: list[int] = []

    def segment(self) -> int:
        self.accounted.append(int(self.ledger.peak_accounted))
        self.ledger.peak_accounted = 0
        if not self.cuda:
            return self.accounted[-1]
        torch.cuda.synchronize(self.ledger.device)
        peak = torch.cuda.max_memory_allocated(self.ledger.device)
        torch.cuda.reset_peak_memory_stats(self.ledger.device)
        return int(peak)


def prune_core(pc: PruneConfig, model: torch.nn.Module, calib: torch.Tensor, device: torch.device,
               cancel: Deadline | None, capture: dict | None = None,
               events: list[tuple[str, int, float]] | None = None) -> dict:
    """The engine's passes as `run_prune` runs them (no data loading, no evaluation, no copy of
    the model), with device peaks per pass. `capture[(layer, kind)]` receives kept unit ids and
    the refit error of every solved module."""
    method = get_method(pc.method)(pc)
    impl = f"structprune.methods:{type(method).__name__}"
    if capture is not None:
        method = _Capturing(method, capture)
    events = [] if events is None else events  # (stage, layer, seconds since start), per layer
    t0 = time.perf_counter()
    engine = PruneEngine(model, device, method, batch_size=pc.batch_size, cancel=cancel, t0=t0,
                         on_event=lambda ev: events.append((ev.stage, ev.layer, round(ev.elapsed_s, 4))))
    meter = Meter(engine.ledger)
    out = {"events": events, "impl": impl}
    if method.whole_model:
        engine.run(calib)
        _sync(device)
        out.update(pass1_s=time.perf_counter() - t0, pass2_s=0.0, pass1_peak=meter.segment(), pass2_peak=0,
                   accounted_peak=max(meter.accounted))
        return out
    p1 = engine.pass1(calib)
    _sync(device)
    t1 = time.perf_counter()
    out.update(pass1_s=t1 - t0, pass1_peak=meter.segment())
    infos = engine.pass2(calib, engine.allocate(p1).keep, p1)
    _sync(device)
    out.update(pass2_s=time.perf_counter() - t1, pass2_peak=meter.segment(), accounted_peak=max(meter.accounted),
               solve_s=sum(float(i.get("solve_s", 0.0)) for i in infos))
    return out


class _Capturing:
    """A method whose rule also records each solved module's kept units and refit error (the
    bf16-vs-fp32 correctness check compares them); everything else is the wrapped method's."""

    def __init__(self, method, capture: dict) -> None:
        self._method, self._capture = method, capture

    def __getattr__(self, name):
        return getattr(self._method, name)

    def rule(self, kind, i, W, b, G, lay, k, **kw):
        res = self._method.rule(kind, i, W, b, G, lay, k, **kw)
        if not kw:  # pass 1's sensitivity solves name their one-shot selector; pass 2's are recorded
            self._capture[(i, kind)] = {"kept": res.kept.cpu().tolist(), "err": res.info.get("err_after_refit")}
        return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def global_taylor_fallback(model: torch.nn.Module, calib: torch.Tensor, device: torch.device,
                           cancel: Deadline | None) -> dict:
    """Stand-in while `global-taylor` is not registered: what a global first-order method holds,
    the whole model, its gradients and one batch's saved activations, measured over a real
    forward + backward per calibration window; unit scores |sum w * dL/dw| of every head and
    channel are computed, no surgery. On the CPU the same items are accounted."""
    ledger = DeviceLedger(device)
    meter = Meter(ledger)
    t0 = time.perf_counter()
    model.to(device)
    n = sum(p.numel() for p in model.parameters())
    db = DTYPE_BYTES[next(model.parameters()).dtype]
    ledger.hold("model", n * db)
    for p in model.parameters():
        p.requires_grad_(True)
    ledger.hold("grads", n * db)
    est = estimate_memory(model.config, "global-taylor", calib.shape[0], calib.shape[1],
                          {2: "bfloat16", 4: "float32"}[db])
    try:
        for i in range(calib.shape[0]):
            if cancel is not None and cancel.is_set():
                raise RunCancelledError(f"budget: stopped at window {i}")
            ids = calib[i : i + 1].to(device)
            ledger.hold("activations", est["peak_bytes"] - 2 * n * db)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            ledger.release("activations")
        ad = adapter_for(model)
        with torch.no_grad():
            for layer in ad.layers(model):
                lay = ad.layout(layer)
                o, d = ad.out_proj(layer, "attn"), ad.out_proj(layer, "mlp")
                (o.weight * o.weight.grad).float().view(lay.hidden, lay.n_heads, -1).sum((0, 2)).abs()
                (d.weight * d.weight.grad).float().sum(0).abs()
        _sync(device)
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
    return {"events": [], "impl": "benchmark fallback: whole-model forward+backward, scores only",
            "pass1_s": time.perf_counter() - t0, "pass2_s": 0.0, "pass1_peak": meter.segment(), "pass2_peak": 0,
            "accounted_peak": meter.accounted[-1]}


def _extrapolate(res: dict, layers_run: int, n_layers: int, sensitivity: bool) -> dict:
    """Pass times of the whole depth from a run on its first `layers_run` layers: pass 2 and the
    plain part of pass 1 grow linearly; with sensitivities, pass 1's per-layer time grows linearly
    with the layer index (one more perturbed stream per module) and the head's evaluation of the
    perturbed streams with their number."""
    K, L = layers_run, n_layers
    p1 = [(i, t) for st, i, t in res["events"] if st == "pass1" and i >= 0]  # layers done (not the begin event)
    t_embed = next((t for st, _, t in res["events"] if st == "embed"), 0.0)
    pass1_full = res["pass1_s"] * L / K
    if sensitivity and len(p1) >= 2:
        times = [t_embed] + [t for _, t in p1]
        dts = [b - a for a, b in zip(times, times[1:])]
        xs = list(range(len(dts)))
        mx, my = sum(xs) / len(xs), sum(dts) / len(dts)
        sxx = sum((x - mx) ** 2 for x in xs)
        # a falling fit is warm-up noise (the first layer pays for kernel set-up), not a trend
        b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, dts)) / sxx if sxx else 0.0)
        a = my - b * mx
        head = res["pass1_s"] - times[-1]
        fitted = t_embed + sum(a + b * i for i in range(L)) + head * (2 * L + 1) / (2 * K + 1)
        pass1_full = max(fitted, pass1_full)  # later layers never cost less than the first ones
    pass2_full = res["pass2_s"] * L / K
    return {"pass1_s_full": pass1_full, "pass2_s_full": pass2_full, "total_s_full": pass1_full + pass2_full}


def _predict(runner: Runner, spec: RunSpec, corrected: bool = True) -> float:
    cfg = gcfg.get_config(spec.config_name, spec.layers_run)
    t = gcfg.predict_seconds(cfg, spec.method, spec.nsamples, spec.seqlen,
                             spec.sensitivity and spec.method == "structprune", device=runner.device.type)
    return t * (runner.correction(spec.method) if corrected else 1.0)


def run_spec(runner: Runner, spec: RunSpec) -> dict:
    if spec.fallback_layers and spec.layers_run is None:
        whole = _predict(runner, spec)
        if whole > runner.remaining():
            rec = run_spec(runner, replace(spec, layers_run=spec.fallback_layers, fallback_layers=None))
            rec["fallback"] = (f"whole depth predicted {whole:.0f} s with {max(runner.remaining(), 0):.0f} s "
                               f"left: ran the first {spec.fallback_layers} layers, times extrapolated")
            return rec
    prof = runner.prof
    dev = runner.device
    dtype_name = str(prof.dtype).replace("torch.", "")
    full = gcfg.get_config(spec.config_name)
    run_cfg = gcfg.get_config(spec.config_name, spec.layers_run)
    truncated = spec.layers_run is not None and spec.layers_run < full.num_hidden_layers
    lay_method = spec.method != "global-taylor"
    rec = {
        "kind": "gpu-scaling", "schema": SCHEMA, "step": spec.step, "config_name": spec.config_name,
        "family": gcfg.family_of(full), "n_params": gcfg.n_params(full), "n_layers": full.num_hidden_layers,
        "layers_run": run_cfg.num_hidden_layers, "hidden": full.hidden_size, "method": spec.method,
        "nsamples": spec.nsamples, "seqlen": spec.seqlen, "batch_size": 1, "dtype": dtype_name,
        "sparsity": SPARSITY, "sensitivity": bool(spec.sensitivity and spec.method == "structprune"),
        "allocation": ("the method's own" if spec.method != "structprune" else
                       "softmax (sensitivity)" if spec.sensitivity else "uniform"),
        "tf32_fp32_matmuls": bool(dev.type == "cuda" and runner.tf32 and prof.dtype != torch.float32),
        "memory_kind": "measured-cuda" if dev.type == "cuda" else "accounted-cpu",
        "peak_bytes": None, "estimate_bytes": None, "estimate_error": None,
        "pass1_s": None, "pass2_s": None, "total_s": None, "status": "ok", "message": "",
        **runner.env,
    }
    try:
        est = estimate_memory(full, spec.method, spec.nsamples, spec.seqlen, dtype_name, batch_size=1,
                              sensitivity=rec["sensitivity"], host_grams=dev.type == "cuda")
        rec["estimate_bytes"], rec["estimate_phases"] = est["peak_bytes"], est["phases"]
    except Exception as exc:  # noqa: BLE001 - an estimator gap is a finding, not a crash
        rec["estimate_message"] = f"{type(exc).__name__}: {exc}"
    raw = _predict(runner, spec, corrected=False)
    pred = raw * runner.correction(spec.method)
    rec["predicted_s"] = round(pred, 1)
    if pred > runner.remaining():
        rec.update(status="skipped", message=f"budget: predicted {pred:.0f} s, {max(runner.remaining(), 0):.0f} s left")
        return rec
    impl_ok = True
    if lay_method or spec.method == "global-taylor":
        try:
            get_method(spec.method)
        except InvalidConfigError as exc:
            if lay_method:
                rec.update(status="skipped", message=f"method not available in this checkout: {exc}")
                return rec
            impl_ok = False
    cancel = Deadline(min(runner.deadline, time.monotonic() + max(4 * pred, 30.0)))
    model = None
    events: list[tuple[str, int, float]] = []
    t_start = time.perf_counter()
    try:
        torch.backends.cuda.matmul.allow_tf32 = rec["tf32_fp32_matmuls"]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        rec["base_bytes"] = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        # whole-model methods: build where they run (the whole model is resident there anyway)
        where = dev if not lay_method else torch.device("cpu")
        model = gcfg.build_random(run_cfg, prof.dtype, device=where, seed=0,
                                  fill_device=dev if dev.type == "cuda" else None)
        free_device()
        rec["build_s"] = round(time.perf_counter() - t_start, 2)
        calib = torch.randint(0, run_cfg.vocab_size, (spec.nsamples, spec.seqlen),
                              generator=torch.Generator().manual_seed(0))
        pc = PruneConfig(model=spec.config_name, method=spec.method, sparsity=SPARSITY,
                         allocation="softmax" if rec["sensitivity"] else "uniform", energy="sensitivity",
                         nsamples=spec.nsamples, seqlen=spec.seqlen, device=str(dev), dtype=dtype_name,
                         batch_size=1, sensitivity_windows=min(4, spec.nsamples))
        res = (prune_core(pc, model, calib, dev, cancel, events=events) if impl_ok
               else global_taylor_fallback(model, calib, dev, cancel))
        rec["impl"] = res["impl"]
        rec["pass1_s"], rec["pass2_s"] = round(res["pass1_s"], 3), round(res["pass2_s"], 3)
        rec["total_s"] = round(res["pass1_s"] + res["pass2_s"], 3)
        rec["solve_s"] = round(res.get("solve_s", 0.0), 3)
        # what this run added on top of what was allocated before it (0 unless an earlier run leaked)
        p1, p2 = (max(0, res[k] - rec["base_bytes"]) if res[k] else 0 for k in ("pass1_peak", "pass2_peak"))
        rec["pass1_peak_bytes"], rec["pass2_peak_bytes"] = p1, p2
        rec["peak_bytes"] = max(p1, p2)
        rec["accounted_peak_bytes"] = res.get("accounted_peak")  # the ledger's formulas (= peak on the CPU)
        if dev.type == "cuda":
            rec["reserved_peak_bytes"] = torch.cuda.max_memory_reserved(dev)
        rec["layer_events"] = res["events"]
        if truncated:
            rec["timing_extrapolated"] = True
            rec.update({k: round(v, 2) for k, v in
                        _extrapolate(res, run_cfg.num_hidden_layers, full.num_hidden_layers, rec["sensitivity"]).items()})
        if rec["estimate_bytes"]:
            rec["estimate_error"] = (rec["estimate_bytes"] - rec["peak_bytes"]) / rec["peak_bytes"]
        if rec["total_s"] > 1.0 and raw > 0:
            runner.ratios.setdefault(spec.method, []).append(rec["total_s"] / raw)
    except RunCancelledError as exc:
        last = f"after {events[-1][0]} layer {events[-1][1]} at {events[-1][2]:.1f} s" if events else "before layer 0"
        rec.update(status="skipped", message=f"budget: aborted mid-run {last} ({exc})", layer_events=events)
    except BaseException as exc:  # noqa: BLE001 - every failure is a result
        if isinstance(exc, KeyboardInterrupt):  # the hard time limit (timeout -s INT): stop here
            runner.deadline = time.monotonic()
            rec.update(status="skipped", message="interrupted (SIGINT): hard time limit")
        elif is_oom(exc):
            rec.update(status="oom", message=f"{type(exc).__name__}: {str(exc)[:300]}")
        else:
            rec.update(status="error", message=f"{type(exc).__name__}: {str(exc)[:500]}",
                       traceback=traceback.format_exc(limit=6)[-2000:])
        if dev.type == "cuda" and torch.cuda.is_available():
            rec["peak_bytes_at_failure"] = torch.cuda.max_memory_allocated(dev)
    finally:
        rec["wall_s"] = round(time.perf_counter() - t_start, 2)
        del model
        torch.backends.cuda.matmul.allow_tf32 = False
        free_device()
    return rec


# --- correctness: CUDA vs CPU --------------------------------------------------------------------

def run_correctness(runner: Runner) -> dict:
    """structprune on `runner.device` (fp32 and bf16 weights) against the CPU fp32 run of the same
    weights (rounded to bf16 once, so the bf16 run starts from the same model): kept units per
    module and refit errors."""
    from structprune.models import build_tiny

    prof = runner.prof
    n, s = prof.correctness_shape
    rec = {"kind": "gpu-correctness", "schema": SCHEMA, "device_type": runner.device.type,
           "nsamples": n, "seqlen": s, "sparsity": SPARSITY, "tolerance_rel": 1e-2, "cases": [],
           "weights": "random tiny configs, rounded to bf16-representable values for every run",
           "status": "ok", "message": "", **runner.env}
    variants = [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
    for name in prof.correctness_configs:
        for allocation in prof.correctness_allocations:
            if runner.remaining() < 20:
                rec.update(status="skipped", message="budget")
                return rec
            base = build_tiny(name, seed=0)
            with torch.no_grad():
                for p in base.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
            calib = torch.randint(0, base.config.vocab_size, (n, s), generator=torch.Generator().manual_seed(1))

            def run(device: str, dtype: torch.dtype, model=base) -> dict:
                import copy

                m = copy.deepcopy(model).to(dtype)
                cap: dict = {}
                pc = PruneConfig(model=name, sparsity=SPARSITY, allocation=allocation, energy="sensitivity",
                                 nsamples=n, seqlen=s, device=device, dtype=str(dtype).replace("torch.", ""),
                                 sensitivity_windows=min(4, n))
                torch.backends.cuda.matmul.allow_tf32 = False
                prune_core(pc, m, calib, torch.device(device), None, capture=cap)
                return cap

            try:
                ref = run("cpu", torch.float32)
                for vname, vdtype in variants:
                    got = run(str(runner.device), vdtype)
                    rec["cases"].append({"config": name, "allocation": allocation, "dtype": vname,
                                         **compare_captures(ref, got, rec["tolerance_rel"])})
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    runner.deadline = time.monotonic()
                rec["cases"].append({"config": name, "allocation": allocation, "status": "oom" if is_oom(exc) else "error",
                                     "message": f"{type(exc).__name__}: {str(exc)[:300]}"})
            finally:
                free_device()
    oks = [c for c in rec["cases"] if "agreement" in c]
    rec["fp32_pass"] = all(c["pass"] for c in oks if c["dtype"] == "float32") if oks else None
    rec["bf16_pass"] = all(c["pass"] for c in oks if c["dtype"] == "bfloat16") if oks else None
    return rec


def compare_captures(ref: dict, got: dict, tol: float) -> dict:
    """Agreement of kept units (|A & B| / max(|A|, |B|), averaged over modules) and the largest
    relative difference of refit errors."""
    agree, rel, n_same = [], [], 0
    for key, r in ref.items():
        g = got.get(key)
        if g is None:
            agree.append(0.0)
            continue
        a, b = set(r["kept"]), set(g["kept"])
        agree.append(len(a & b) / max(len(a), len(b), 1))
        n_same += a == b
        if r["err"] is not None and g["err"] is not None:
            rel.append(abs(g["err"] - r["err"]) / max(abs(r["err"]), 1e-12))
    agreement = sum(agree) / max(len(agree), 1)
    max_rel = max(rel) if rel else 0.0
    return {"modules": len(ref), "modules_identical": n_same, "agreement": agreement,
            "max_rel_err_diff": max_rel, "pass": agreement == 1.0 and max_rel <= tol}


# --- speed of the pruned model -------------------------------------------------------------------

def prune_random_uniform(model: torch.nn.Module, dense_specs, sparsity: float, seed: int) -> None:
    """Physically removes random units with the uniform allocation's per-module counts (speed does
    not depend on which units go). Works on a model already pruned to a lower sparsity: it keeps a
    random subset of what is left."""
    ad = adapter_for(model)
    alloc = allocate_uniform(dense_specs, sparsity)
    target = {(sp.layer, sp.kind): int(k) for sp, k in zip(dense_specs, alloc.units_kept)}
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(ad.layers(model)):
        lay = ad.layout(layer)
        k_heads, k_ch = target[(i, "attn")], target[(i, "mlp")]
        if k_heads < lay.n_heads:
            if lay.mha:
                heads = torch.randperm(lay.n_heads, generator=g)[:k_heads]
            else:
                per, keep_per = lay.n_heads // lay.n_kv_heads, k_heads // lay.n_kv_heads
                heads = torch.cat([b * per + torch.randperm(per, generator=g)[:keep_per] for b in range(lay.n_kv_heads)])
            ad.keep_heads(layer, heads.sort().values)
        if k_ch < lay.intermediate:
            ad.keep_channels(layer, torch.randperm(lay.intermediate, generator=g)[:k_ch].sort().values)


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def measure_speed(model, prof: Profile, dev: torch.device, reps: int) -> dict:
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    b, s = prof.prefill
    ids = torch.randint(0, vocab, (b, s), generator=g).to(dev)

    def timed(fn) -> float:
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        return time.perf_counter() - t

    prefill = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    timed(prefill)  # warm-up
    t_pre = min(timed(prefill) for _ in range(reps))
    out = {"prefill_tok_s": b * s / t_pre, "prefill_s": t_pre, "decode_tok_s": {}, "decode_s": {}}
    kw = _cache_kwarg(model)
    for batch in prof.decode_batches:
        prompt = torch.randint(0, vocab, (batch, prof.decode_prompt), generator=g).to(dev)

        def decode(warm: bool = False) -> None:
            cache = DynamicCache()
            logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
            nxt = logits[:, -1:].argmax(-1)
            _sync(dev)
            decode.t = time.perf_counter()
            for _ in range(min(4, prof.decode_tokens) if warm else prof.decode_tokens):
                logits = model(input_ids=nxt, use_cache=True, **{kw: cache}).logits
                nxt = logits[:, -1:].argmax(-1)
            _sync(dev)
            decode.t = time.perf_counter() - decode.t

        decode(warm=True)
        best = math.inf
        for _ in range(max(1, reps - 1)):  # 64 steps already average; one timed pass (two on request)
            decode()
            best = min(best, decode.t)
        out["decode_tok_s"][str(batch)] = batch * prof.decode_tokens / best
        out["decode_s"][str(batch)] = best
    return out


def run_speed(runner: Runner, sparsities=(0.2, 0.3, 0.5), reps: int = 2) -> dict:
    prof, dev = runner.prof, runner.device
    cfg = gcfg.get_config(prof.speed_config)
    rec = {"kind": "gpu-speed", "schema": SCHEMA, "config_name": prof.speed_config,
           "dtype": str(prof.dtype).replace("torch.", ""), "prefill": {"batch": prof.prefill[0], "seqlen": prof.prefill[1]},
           "decode": {"batches": list(prof.decode_batches), "prompt": prof.decode_prompt,
                      "new_tokens": prof.decode_tokens, "cache": "DynamicCache"},
           "note": ("pruned shapes made by physically removing random units with the uniform allocation's "
                    "per-module counts (what structprune's uniform run leaves); speed does not depend on which "
                    "units go, so no calibration is run; sdpa attention, eager PyTorch (no CUDA graphs / compile)"),
           "results": [], "status": "ok", "message": "", **runner.env}
    model = None
    try:
        model = gcfg.build_random(cfg, prof.dtype, device=dev, seed=0)
        ad = adapter_for(model)
        specs = module_specs(layouts_of(model, ad))
        before = count_params(model, ad)
        for s in (0.0, *sparsities):
            if runner.remaining() < 15:
                rec.update(status="partial", message="budget: stopped before sparsity %.2f" % s)
                break
            if s > 0:
                prune_random_uniform(model, specs, s, seed=int(s * 100))
            after = count_params(model, ad)
            r = {"sparsity": s, "params_total": after.total,
                 "achieved_prunable": 1 - after.prunable / before.prunable,
                 **measure_speed(model, prof, dev, reps)}
            rec["results"].append(r)
            print(f"  speed s={s:.1f}: prefill {r['prefill_tok_s']:.0f} tok/s, decode "
                  + ", ".join(f"b{k} {v:.0f} tok/s" for k, v in r["decode_tok_s"].items()), flush=True)
        dense = rec["results"][0] if rec["results"] else None
        for r in rec["results"]:
            r["prefill_speedup"] = r["prefill_tok_s"] / dense["prefill_tok_s"]
            r["decode_speedup"] = {k: v / dense["decode_tok_s"][k] for k, v in r["decode_tok_s"].items()}
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            runner.deadline = time.monotonic()
        rec.update(status="oom" if is_oom(exc) else "error", message=f"{type(exc).__name__}: {str(exc)[:500]}",
                   traceback=traceback.format_exc(limit=6)[-2000:])
    finally:
        del model
        free_device()
    return rec


# --- summary -------------------------------------------------------------------------------------

def summarize(records: list[dict]) -> dict:
    """Slopes of log peak vs log N per method and shape, global / structprune ratios per size,
    estimator errors, and the issue's bars."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("peak_bytes")]
    best: dict[tuple, dict] = {}  # (config, method, shape) -> the whole-depth run if there is one
    for r in ok:
        key = (r["config_name"], r["method"], f"{r['nsamples']}x{r['seqlen']}")
        if key not in best or r["layers_run"] > best[key]["layers_run"]:
            best[key] = r
    slopes = {}
    for (cfg, method, shape), r in sorted(best.items()):
        slopes.setdefault(f"{method} {shape}", {"points": []})["points"].append((r["n_params"], r["peak_bytes"], r["family"]))
    for key, v in slopes.items():
        v["slope_all"] = gcfg.log_slope([(x, y) for x, y, _ in v["points"]])
        for fam in ("opt", "llama"):
            v[f"slope_{fam}"] = gcfg.log_slope([(x, y) for x, y, f in v["points"] if f == fam])
        v["points"] = [{"n_params": x, "peak_bytes": y, "family": f} for x, y, f in v["points"]]
    ratios = []
    for (cfg, method, shape), r in sorted(best.items(), key=lambda kv: kv[1]["n_params"]):
        if method != "structprune":
            continue
        g = best.get((cfg, "global-taylor", shape))
        if g:
            ratios.append({"config_name": cfg, "shape": shape, "n_params": r["n_params"],
                           "global_peak_bytes": g["peak_bytes"], "structprune_peak_bytes": r["peak_bytes"],
                           "ratio": g["peak_bytes"] / r["peak_bytes"]})
    errors = [{"config_name": r["config_name"], "method": r["method"], "shape": f"{r['nsamples']}x{r['seqlen']}",
               "layers_run": r["layers_run"], "peak_bytes": r["peak_bytes"], "estimate_bytes": r["estimate_bytes"],
               "estimate_error": r["estimate_error"]} for r in ok if r.get("estimate_error") is not None]
    big = [x for x in ratios if x["config_name"] in ("opt-6.7b", "opt-13b", "llama-2-13b", "llama-2-7b")]
    sp = next((v for k, v in slopes.items() if k.startswith("structprune 32x")), None)
    gt = next((v for k, v in slopes.items() if k.startswith("global-taylor 32x")), None)
    long7 = sorted((r for r in ok if r["config_name"] == "llama-2-7b" and r["method"] == "structprune"
                    and r["nsamples"] == 128), key=lambda r: -r["layers_run"])
    t7 = (long7[0].get("total_s_full") or long7[0]["total_s"]) if long7 else None
    bars = {
        "ratio_ge_10_on_6.7b_13b": (all(x["ratio"] >= 10 for x in big) if big else None),
        "structprune_slope_le_0.8": (sp["slope_all"] <= 0.8 if sp and sp["slope_all"] is not None else None),
        "global_slope": gt["slope_all"] if gt else None,
        "estimator_within_15pct": (all(abs(e["estimate_error"]) <= 0.15 for e in errors) if errors else None),
        "llama_2_7b_128x2048_under_600s": (t7 < 600 if long7 else None),
        "llama_2_7b_128x2048_s": t7,
        "llama_2_7b_128x2048_basis": (("measured" if long7[0]["layers_run"] == long7[0]["n_layers"] else
                                       f"extrapolated from {long7[0]['layers_run']} layers") if long7 else None),
    }
    return {"kind": "gpu-summary", "schema": SCHEMA, "runs": len(records),
            "status_counts": {s: sum(r.get("status") == s for r in records) for s in ("ok", "oom", "error", "skipped")},
            "slopes": slopes, "ratios": ratios, "estimator": errors, "bars": bars}


def format_summary(s: dict) -> str:
    gb = 1 << 30
    lines = [f"runs {s['runs']}: {s['status_counts']}", "", "peak memory slope vs N (log-log):"]
    for k, v in s["slopes"].items():
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"  {k:28s} all {f(v['slope_all'])}  opt {f(v['slope_opt'])}  llama {f(v['slope_llama'])}"
                     f"  ({len(v['points'])} sizes)")
    lines.append("")
    lines.append(f"  {'config':16s} {'shape':9s} {'global GB':>10s} {'structprune GB':>15s} {'ratio':>7s}")
    for r in s["ratios"]:
        lines.append(f"  {r['config_name']:16s} {r['shape']:9s} {r['global_peak_bytes'] / gb:10.2f} "
                     f"{r['structprune_peak_bytes'] / gb:15.2f} {r['ratio']:7.1f}")
    lines.append("")
    lines.append(f"  {'config':16s} {'method':14s} {'shape':9s} {'L':>3s} {'peak GB':>8s} {'est GB':>8s} {'err':>7s}")
    for e in s["estimator"]:
        lines.append(f"  {e['config_name']:16s} {e['method']:14s} {e['shape']:9s} {e['layers_run']:3d} "
                     f"{e['peak_bytes'] / gb:8.3f} {e['estimate_bytes'] / gb:8.3f} {100 * e['estimate_error']:+6.1f}%")
    lines.append("")
    lines.append("bars: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in s["bars"].items()))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall clock for everything; runs it cannot afford are skipped")
    ap.add_argument("--steps", default="scaling,correctness,speed,long,wanda",
                    help="comma-separated, run in this order: scaling, correctness, speed, long, wanda")
    ap.add_argument("--methods", default="", help="comma-separated filter (default: all)")
    ap.add_argument("--configs", default="", help="comma-separated filter (default: all of the profile)")
    ap.add_argument("--correctness", action="store_true", help="run only the correctness step")
    ap.add_argument("--speed", action="store_true", help="run only the speed step")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU (seconds), same records")
    ap.add_argument("--no-tf32", action="store_true", help="keep fp32 Gram matmuls off TF32 in bf16 runs")
    ap.add_argument("--plan", action="store_true", help="print the plan with predicted seconds and exit")
    args = ap.parse_args(argv)

    prof = SMOKE if args.cpu_smoke else GPU
    if prof.device == "cuda" and not torch.cuda.is_available() and not args.plan:
        print("no CUDA device: use --cpu-smoke (or run on the GPU machine)", file=sys.stderr)
        return 2
    steps = ["correctness"] if args.correctness else ["speed"] if args.speed else \
        [s.strip() for s in args.steps.split(",") if s.strip()]
    methods = [m for m in args.methods.split(",") if m] or None
    configs = [c for c in args.configs.split(",") if c] or None
    plan = plan_runs(prof, steps, methods, configs)
    if args.plan:
        total = 0.0
        for item in plan:
            if isinstance(item, str):
                print(f"  [{item}]")
                continue
            cfg = gcfg.get_config(item.config_name, item.layers_run)
            t = gcfg.predict_seconds(cfg, item.method, item.nsamples, item.seqlen,
                                     item.sensitivity and item.method == "structprune", device=prof.device)
            total += t
            print(f"  {item.step:8s} {item.filename:52s} predicted {t:7.1f} s (cumulative {total:7.1f})")
        return 0

    threads = torch.get_num_threads()
    if args.cpu_smoke:  # tiny matmuls: one thread is several times faster on a shared CPU
        torch.set_num_threads(1)
    try:
        return _run(args, prof, plan)
    finally:
        torch.set_num_threads(threads)


def _run(args, prof: Profile, plan: list) -> int:
    runner = Runner(Path(args.out), args.budget_s, prof, tf32=not args.no_tf32)
    print(f"structprune gpu_scaling: {prof.device}, out {runner.out}, budget {args.budget_s:.0f} s, "
          f"{runner.env}", flush=True)
    told = False
    try:
        for item in plan:
            _run_item(runner, item)
            if runner.remaining() <= 0 and not told:
                told = True
                print("budget spent: the remaining runs are recorded as skipped", flush=True)
    except KeyboardInterrupt:
        print("interrupted: writing the summary of what finished", flush=True)
    print()
    runner.write_summary()
    return 0


def _run_item(runner: Runner, item: RunSpec | str) -> None:
    """One plan item, whatever happens: a record is written."""
    left = runner.remaining()
    if item in ("correctness", "speed"):
        fn, need = (run_correctness, 20) if item == "correctness" else (run_speed, 30)
        try:
            rec = fn(runner) if left > need else {"kind": f"gpu-{item}", "status": "skipped",
                                                  "message": "budget", **runner.env}
        except Exception as exc:  # noqa: BLE001
            rec = {"kind": f"gpu-{item}", "status": "error", "message": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=6)[-2000:], **runner.env}
        runner.write(f"gpu-{item}.json", rec)
        extra = (f"fp32_pass={rec.get('fp32_pass')} bf16_pass={rec.get('bf16_pass')}" if item == "correctness"
                 else rec.get("message", ""))
        print(f"[{item}] {rec['status']} {extra}", flush=True)
        return
    try:
        rec = run_spec(runner, item)
    except Exception as exc:  # noqa: BLE001 - e.g. a config the estimator or the adapters reject
        rec = {"kind": "gpu-scaling", "schema": SCHEMA, "config_name": item.config_name, "method": item.method,
               "nsamples": item.nsamples, "seqlen": item.seqlen, "status": "error",
               "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)[-2000:],
               **runner.env}
    runner.write(item.filename, rec)
    gbp = f"{rec['peak_bytes'] / 2**30:.2f} GB" if rec.get("peak_bytes") else "-"
    err = f"{100 * rec['estimate_error']:+.1f}%" if rec.get("estimate_error") is not None else "-"
    print(f"[{item.step}] {item.filename}: {rec['status']} peak {gbp} est err {err} "
          f"pass1 {rec.get('pass1_s')} s pass2 {rec.get('pass2_s')} s (pred {rec.get('predicted_s')} s) "
          f"{rec['message'][:160]} [{runner.remaining():.0f} s left]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
