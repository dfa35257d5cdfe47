"""GPU memory and time of structprune vs whole-model methods as models grow, and the speed of
aligned pruned models (issues 6 and 19).

    bash benchmarks/run_gpu.sh                                         # on the GPU machine (see there)
    python3 benchmarks/gpu_scaling.py --cpu-smoke --out /tmp/smoke     # the same flow, tiny, on CPU
    python3 benchmarks/gpu_scaling.py --plan                           # the plan and predicted times

Random-weight models from real configs (OPT 125m-13b, Llama-2 7b/13b, SmolLM2-135M) run in bf16 on
CUDA. Steps, most important first, each checking one wall-clock budget:

  pair         structprune + global-taylor at 32 x 2048 on the Llama-2-7b and OPT-6.7b shapes
  speed        tokens/s of the Llama-2-7b shape, dense vs pruned at 20/30/50% with MLP widths aligned
               to 64 and unaligned (1): prefill 16 x 2048 and 1 x 2048, decode at batch 1 and 16
               (structprune/speed.py's interleaved protocol; one record per sparsity)
  big          the same pair of methods on the 13b shapes
  correctness  structprune on CUDA (fp32 and bf16) against the CPU fp32 run on tiny configs
  small        the pair of methods on the small shapes (the slopes need them)
  long         128 x 2048: structprune on the 7b shape at full depth (its first 8 layers,
               extrapolated, when the budget left cannot afford it), then more
  wanda        wanda-sp at 32 x 2048 (when the method exists in this checkout)

(`scaling` = pair + big + small.) One JSON record per run (`gpu-<config>-<method>-<n>x<seqlen>.json`,
`gpu-speed-<config>-s<sparsity>.json`), written as soon as the run ends, `gpu-summary.json`
rewritten after every run, and with `--archive` all of them and the logs packed into one tar.gz
after every record (benchmarks/gpu_archive.py), so a kill loses at most the run under way and the
GPU machine's few returned files hold everything. A run that runs out of memory or fails is a
record (status "oom" / "error"), never a crash; a run the budget cannot afford is recorded as
"skipped". Layer-wise methods run on their first few decoder layers only (`layers_run`) when the
profile truncates: every layer has the same shape and only one is ever on the device, so the device
peak is that of the whole model (run 1: OPT-1.3b whole vs 4 layers within 0.6%), and the full
model's pass times are extrapolated from the per-layer times (`*_full` fields, marked as such).
Whole-model methods always run on the whole model.

Only torch, transformers (and its numpy), the stdlib and structprune are imported: the GPU
machine's image has nothing else that this project pins.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import math
import os
import platform
import signal
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
from gpu_archive import commit_info, pack  # noqa: E402
from structprune.adapters import adapter_for  # noqa: E402
from structprune.allocation import allocate_uniform  # noqa: E402
from structprune.config import PruneConfig  # noqa: E402
from structprune.errors import DeviceOutOfMemoryError, InvalidConfigError, RunCancelledError  # noqa: E402
from structprune.estimate import estimate_memory  # noqa: E402
from structprune.memory import DTYPE_BYTES, DeviceLedger  # noqa: E402
from structprune.methods import get_method  # noqa: E402
from structprune.engine import PruneEngine  # noqa: E402
from structprune.speed import Shape, compare_speed, load_note, shrink_to_counts, speedups  # noqa: E402
from structprune.units import count_params, layouts_of  # noqa: E402

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
    pair: tuple[str, ...]  # the sizes measured first (the must-have pair)
    big: tuple[str, ...]
    small: tuple[str, ...]
    short: tuple[int, int]  # nsamples x seqlen of the scaling steps
    long: tuple[int, int]
    truncate_above: float  # parameters from which layer-wise runs use only `truncate_layers` layers
    truncate_layers: int
    validate_config: str | None  # run both whole and truncated: the two peaks must agree
    long_configs: tuple[str, ...]
    correctness_configs: tuple[str, ...]
    correctness_allocations: tuple[str, ...]
    correctness_shape: tuple[int, int]
    speed_config: str
    speed_sparsities: tuple[float, ...]
    speed_aligns: tuple[int, ...]  # one pruned model per alignment, timed against dense
    speed_shapes: tuple[Shape, ...]
    speed_repeats: int

    @property
    def configs(self) -> tuple[str, ...]:
        return self.pair + self.big + self.small


# Every layer-wise run on the H200 uses 4 layers (its peak is the whole model's; run 1 checked it on
# OPT-1.3b); decode is Python-bound there (70 ms a token at batch 1 in run 1), so 16 new tokens.
GPU = Profile("cuda", torch.bfloat16, ("llama-2-7b", "opt-6.7b"), ("llama-2-13b", "opt-13b"),
              ("smollm2-135m", "opt-125m", "opt-1.3b", "opt-2.7b"), (32, 2048), (128, 2048), 0, 4, None,
              ("llama-2-7b", "llama-2-13b", "opt-13b"), ("tiny-llama", "tiny-opt"), ("uniform", "softmax"), (8, 128),
              "llama-2-7b", (0.2, 0.3, 0.5), (64, 1),
              (Shape("prefill", 16, 2048), Shape("prefill", 1, 2048), Shape("decode", 1, 128, 16),
               Shape("decode", 16, 128, 16)), 3)
SMOKE = Profile("cpu", torch.float32, ("smoke-opt-m",), ("smoke-llama-gqa",), ("smoke-opt-s",), (4, 32), (8, 32),
                1.5e5, 2, "smoke-opt-m", ("smoke-llama-gqa",), ("tiny-llama",), ("uniform",), (4, 32),
                "smoke-llama-mha", (0.2, 0.3, 0.5), (32, 1),
                (Shape("prefill", 2, 32), Shape("prefill", 1, 32), Shape("decode", 1, 8, 4), Shape("decode", 2, 8, 4)), 2)

STEPS = ("pair", "speed", "big", "correctness", "small", "long", "wanda")
SCALING = ("pair", "big", "small")


def plan_runs(prof: Profile, steps: list[str], methods: list[str] | None = None,
              configs: list[str] | None = None) -> list[RunSpec | str]:
    """Runs in order; plain strings are the non-scaling steps ("correctness", "speed")."""
    def keep(names):
        return [c for c in names if not configs or c in configs]

    def depth(name: str) -> int | None:
        cfg = gcfg.get_config(name)
        big = gcfg.n_params(cfg) >= prof.truncate_above and cfg.num_hidden_layers > prof.truncate_layers
        return prof.truncate_layers if big else None

    expanded = [x for step in steps for x in (SCALING if step == "scaling" else (step,))]
    out: list[RunSpec | str] = []
    for step in expanded:
        if step in SCALING:
            n, s = prof.short
            for name in keep(getattr(prof, step)):
                out.append(RunSpec(name, "structprune", n, s, step, layers_run=depth(name)))
                out.append(RunSpec(name, "global-taylor", n, s, step))
                if name == prof.validate_config and depth(name) is None:
                    # the same size both ways: shows that the truncated run's peak is the whole run's
                    out.append(RunSpec(name, "structprune", n, s, step, layers_run=prof.truncate_layers))
        elif step == "wanda":
            n, s = prof.short
            out += [RunSpec(name, "wanda-sp", n, s, step, layers_run=depth(name)) for name in keep(prof.configs)]
        elif step == "long":
            n, s = prof.long
            first = keep(prof.long_configs)
            if first:  # the bar: the 7b shape, whole depth, default method (else 2x truncated)
                out.append(RunSpec(first[0], "structprune", n, s, step, fallback_layers=2 * prof.truncate_layers))
            for name in first[:2]:  # peak does not grow with nsamples (one window per step)
                out.append(RunSpec(name, "global-taylor", n, s, step))
            for name in first[1:]:
                out.append(RunSpec(name, "structprune", n, s, step, layers_run=depth(name)))
        elif step in ("correctness", "speed"):
            out.append(step)
        else:
            raise SystemExit(f"unknown step {step!r}; known: {', '.join(STEPS)}, scaling")
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
    def __init__(self, out: Path, budget_s: float, prof: Profile, tf32: bool = True,
                 archive: Path | None = None) -> None:
        self.out, self.prof, self.archive = out, prof, archive
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.records: list[dict] = []
        self.speed: list[dict] = []
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
        bad = invalid_fields(rec)
        if bad:  # kept and said, never silently written as if it were a measurement
            rec["invalid_fields"] = bad
            print(f"WARNING {name}: null or negative where a number belongs: {', '.join(bad)}", flush=True)
        _write_json(self.out / name, rec)
        if rec.get("kind") == "gpu-scaling":
            self.records.append(rec)
        elif rec.get("step") == "speed":
            self.speed.append(rec)
        self.write_summary(quiet=True)

    def write_summary(self, quiet: bool = False) -> dict:
        summary = summarize(self.records, self.speed)
        summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        summary["environment"] = self.env
        _write_json(self.out / "gpu-summary.json", summary)
        if not quiet:
            text = format_summary(summary)
            print(text, flush=True)
            (self.out / "gpu-summary.txt").write_text(text + "\n")
        self.pack()
        return summary

    def pack(self) -> None:
        """Everything under `out` (records, summary, the console log run_gpu.sh tees there) into the
        one archive; a failure to pack is said and never stops the run."""
        if self.archive is None:
            return
        try:
            pack(self.out, self.archive, prefix=self.archive.name.split(".")[0])
        except OSError as exc:
            print(f"WARNING: could not pack {self.archive}: {exc}", flush=True)


# Fields that hold a number in an "ok" record of each kind; timing and byte fields are never negative.
NUMBER_FIELDS = {
    "gpu-scaling": ("n_params", "peak_bytes", "estimate_bytes", "estimate_error", "pass1_s", "pass2_s", "total_s"),
    "gpu-correctness": (),
}
COMMIT_FIELDS = ("git_commit",)


def invalid_fields(rec: dict) -> list[str]:
    """Names of the fields of an "ok" record that are null (or NaN) where a number or the commit
    belongs, or negative where only a size or a time can be (`*_s`, `*_bytes`)."""
    if rec.get("status") != "ok":
        return []
    bad = [k for k in COMMIT_FIELDS if not rec.get(k)]
    for k in NUMBER_FIELDS.get(rec.get("kind"), ()):
        v = rec.get(k)
        if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            bad.append(k)
    for k, v in rec.items():
        if (k.endswith("_s") or k.endswith("_bytes") or "_s_full" in k) and isinstance(v, (int, float)) and v < 0:
            bad.append(k)
    return sorted(set(bad))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: never packed half-written
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def environment(device: torch.device) -> dict:
    """The machine and the code: the commit from the environment, git or the stamp file the
    launcher carried (benchmarks/gpu_archive.py), with where it came from."""
    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), **commit_info(HERE.parent),
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

def speed_filename(config_name: str, sparsity: float) -> str:
    return f"gpu-speed-{config_name}-s{sparsity:.2f}.json"


def run_speed(runner: Runner) -> None:
    """Dense vs pruned tokens/s on the speed config, one record per sparsity, each written (and
    archived) as soon as it is measured. The pruned models have the unit counts of the library's
    default allocation (softmax, T = 1, over SmolLM2's recorded module energies mapped by depth:
    benchmarks/speed.py, the speed issue's protocol) at each alignment, cut physically from the
    dense model (`shrink_to_counts`: speed depends on the shapes, not on which units are kept).
    Dense and pruned models are timed interleaved in one process (structprune/speed.py): median
    of `speed_repeats` after one warm-up; the dense model is re-timed in every record."""
    from benchmarks.speed import allocation_counts  # benchmarks/speed.py: the speed issue's allocation

    prof, dev = runner.prof, runner.device
    dtype = str(prof.dtype).replace("torch.", "")
    cfg = gcfg.get_config(prof.speed_config)
    base = {"schema": "structprune.speed/1", "kind": prof.speed_config, "step": "speed",
            "config_name": prof.speed_config, "device": str(dev), "dtype": dtype, "repeats": prof.speed_repeats,
            "warmup": 1, "interleaved": True, "weights": "random (gpu_configs.build_random), built on the device",
            "attention": "sdpa, eager PyTorch (no CUDA graphs / compile); decode with transformers' KV cache",
            "allocation": "softmax T=1 over SmolLM2 energies mapped by depth (benchmarks/speed.py allocation_counts)",
            **{k: v for k, v in runner.env.items() if k != "device"}, "device_name": runner.env["device"]}
    dense = None
    pending = list(prof.speed_sparsities)  # not yet recorded
    try:
        dense = gcfg.build_random(cfg, prof.dtype, device=dev, seed=0)
        free_device()
        for s in prof.speed_sparsities:
            name = speed_filename(prof.speed_config, s)
            pending.remove(s)
            need = 15.0 if not runner.speed else max(15.0, 1.2 * runner.speed[-1].get("seconds", 0))
            if runner.remaining() < need:
                runner.write(name, {**base, "sparsity": s, "status": "skipped",
                                    "message": f"budget: {max(runner.remaining(), 0):.0f} s left, one sparsity took "
                                               f"{need / 1.2:.0f} s"})
                continue
            rec = {**base, "sparsity": s, "status": "ok", "message": "", "allocations": {}}
            t0 = time.perf_counter()
            models = {"dense": dense}
            try:
                for align in prof.speed_aligns:
                    keep, info = allocation_counts(dense, s, align)
                    models[f"align{align}"] = shrink_to_counts(copy.deepcopy(dense), keep)
                    rec["allocations"][f"align{align}"] = info
                rec["params"] = {m: sum(p.numel() for p in model.parameters()) for m, model in models.items()}
                rec["load_before"] = load_note()
                timings = compare_speed(models, list(prof.speed_shapes), dev, repeats=prof.speed_repeats, warmup=1)
                rec["load_after"] = load_note()
                rec["timings"] = [t.to_dict() for t in timings]
                rec["speedup"] = {f"{m} | {label}": round(r, 4) for (m, label), r in speedups(timings, "dense").items()
                                  if m != "dense"}
                if dev.type == "cuda":
                    rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            except BaseException as exc:  # noqa: BLE001 - a failure is a record
                if isinstance(exc, KeyboardInterrupt):
                    runner.deadline = time.monotonic()
                rec.update(status="oom" if is_oom(exc) else "error", message=f"{type(exc).__name__}: {str(exc)[:500]}",
                           traceback=traceback.format_exc(limit=6)[-2000:])
            finally:
                del models
                free_device()
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            runner.write(name, rec)
            line = ", ".join(f"{k.split(' | ')[0]} {k.split(' | ')[1]} {v:.2f}x" for k, v in rec.get("speedup", {}).items())
            print(f"[speed] s={s:.2f} {rec['status']} {rec['seconds']} s: {line or rec['message']}", flush=True)
    except BaseException as exc:  # noqa: BLE001 - the dense model itself failed (build, OOM)
        if isinstance(exc, KeyboardInterrupt):
            runner.deadline = time.monotonic()
        for s in pending:
            runner.write(speed_filename(prof.speed_config, s),
                         {**base, "sparsity": s, "status": "oom" if is_oom(exc) else "error",
                          "message": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc(limit=6)[-2000:]})
    finally:
        del dense
        free_device()


# --- summary -------------------------------------------------------------------------------------

def summarize(records: list[dict], speed: list[dict] | None = None) -> dict:
    """Slopes of log peak vs log N per method and shape, global / structprune ratios per size,
    estimator errors, the speed-ups of the pruned models, and the issue's bars."""
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
    speed_rows = speed_table(speed or [])
    goals = {0.2: 1.0, 0.3: 1.3, 0.5: 1.8}  # issue 19: pruned prefill 16 x 2048 vs dense, bf16
    pre = {(r["sparsity"], r["model"]): r["speedup"] for r in speed_rows if r["shape"] == "prefill 16x2048"}
    bars["prefill_16x2048_align64_meets_1.0_1.3_1.8"] = (
        all(pre.get((s, "align64"), 0) >= g for s, g in goals.items()) if any(k[1] == "align64" for k in pre) else None)
    bars["prefill_16x2048_align64"] = {f"{s:.2f}": pre.get((s, "align64")) for s in goals}
    return {"kind": "gpu-summary", "schema": SCHEMA, "runs": len(records),
            "status_counts": {s: sum(r.get("status") == s for r in records) for s in ("ok", "oom", "error", "skipped")},
            "slopes": slopes, "ratios": ratios, "estimator": errors, "speed": speed_rows, "bars": bars}


def speed_table(speed: list[dict]) -> list[dict]:
    """One row per (sparsity, pruned model, shape) of the ok speed records: tokens/s and the speed-up
    over the dense model timed in the same record."""
    rows = []
    for rec in sorted((r for r in speed if r.get("status") == "ok"), key=lambda r: r["sparsity"]):
        tps = {(t["model"], t["label"]): t["tokens_per_s"] for t in rec["timings"]}
        for key, ratio in rec["speedup"].items():
            model, label = key.split(" | ")
            rows.append({"sparsity": rec["sparsity"], "model": model, "shape": label.split(" (")[0],
                         "label": label, "params_ratio": rec["params"][model] / rec["params"]["dense"],
                         "tokens_per_s": tps[(model, label)], "dense_tokens_per_s": tps[("dense", label)],
                         "speedup": ratio})
    return rows


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
    if s.get("speed"):
        lines.append("")
        lines.append(f"  {'sparsity':>8s} {'model':8s} {'size':>5s} {'shape':28s} {'tok/s':>10s} {'dense':>10s} {'speed-up':>8s}")
        for r in s["speed"]:
            lines.append(f"  {r['sparsity']:8.2f} {r['model']:8s} {r['params_ratio']:5.2f} {r['label']:28s} "
                         f"{r['tokens_per_s']:10.1f} {r['dense_tokens_per_s']:10.1f} {r['speedup']:8.2f}")
    lines.append("")
    lines.append("bars: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in s["bars"].items()))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall clock for everything; runs it cannot afford are skipped")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated, run in this order: {', '.join(STEPS)} (scaling = pair,big,small)")
    ap.add_argument("--archive", default="", help="tar.gz of everything under --out, rewritten after every record")
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
    runner = Runner(Path(args.out), args.budget_s, prof, tf32=not args.no_tf32,
                    archive=Path(args.archive) if args.archive else None)
    print(f"structprune gpu_scaling: {prof.device}, out {runner.out}, budget {args.budget_s:.0f} s, "
          f"{runner.env}", flush=True)
    told = False

    def on_term(*_):  # a TERM (a runner's kill) ends like the hard limit's INT: records, summary, archive
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for item in plan:
            _run_item(runner, item)
            if runner.remaining() <= 0 and not told:
                told = True
                print("budget spent: the remaining runs are recorded as skipped", flush=True)
    except KeyboardInterrupt:
        print("interrupted: writing the summary of what finished", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    runner.write_summary()
    return 0


def _run_item(runner: Runner, item: RunSpec | str) -> None:
    """One plan item, whatever happens: a record is written."""
    left = runner.remaining()
    if item == "speed":
        if left > 30:
            run_speed(runner)  # writes one record per sparsity itself, failures included
        else:
            for sp in runner.prof.speed_sparsities:
                runner.write(speed_filename(runner.prof.speed_config, sp),
                             {"kind": runner.prof.speed_config, "step": "speed", "sparsity": sp, "status": "skipped",
                              "message": "budget", **runner.env})
            print("[speed] skipped: budget", flush=True)
        return
    if item == "correctness":
        try:
            rec = run_correctness(runner) if left > 20 else {"kind": "gpu-correctness", "status": "skipped",
                                                             "message": "budget", **runner.env}
        except Exception as exc:  # noqa: BLE001
            rec = {"kind": "gpu-correctness", "status": "error", "message": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=6)[-2000:], **runner.env}
        runner.write("gpu-correctness.json", rec)
        print(f"[correctness] {rec['status']} fp32_pass={rec.get('fp32_pass')} bf16_pass={rec.get('bf16_pass')} "
              f"{rec.get('message', '')}", flush=True)
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
