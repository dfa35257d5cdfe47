"""What can run here and roughly how long it takes: devices, installed models, a time estimate,
the app's settings as a PruneConfig, and the headline numbers of a finished run.

The time estimate is a model, labelled as such wherever it is shown: per stage of a run
(RUN_STAGES: the model copy and data, the evaluations and losses before and after pruning, both
passes), its floating-point work (layer forwards and the LM head over the calibration and
evaluation tokens, the Gram accumulations, and the per-module solves, which scale with (n+1)^3 for
a module with n input features) divided by this device's measured matrix-multiply speed (fp32 for
forwards, fp64 for solves; measured once per process in a fraction of a second). The coefficients
were fitted to measured SmolLM2-135M phase times on a 2-core CPU
(benchmarks/results/app/estimate_calibration.json, checked on a fresh run in estimate_check.json);
the app's progress bars correct the rest of the estimate by the pace measured while a job runs
(jobs.py).
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import time
from functools import lru_cache

import torch

from .config import PruneConfig
from .speed import QUICK_SHAPES

# (n+1)^3 multiples per module solve, fitted on SmolLM2-135M (CPU, fp64 solves)
SOLVE_CUBES = {"score-obs": 5.5, "score-diag": 0.1, "sensitivity": 4.0,
               "saliency": 4.0, "greedy": 8.5, "admm": 20.0, "eigh": 9.0}
# FLOP/s of each kind of forward as a multiple of the 1024^2 fp32 matmul benchmark's (SmolLM2, CPU):
# the passes' streamed layer forwards (with Gram hooks), whole-model forwards with the LM head and
# its log-softmax (evaluation, losses), the streamed head alone (sensitivities) and the perturbed
# streams of the sensitivity pass. Fitted to benchmarks/results/app/estimate_calibration.json
FORWARD_EFFICIENCY = 2.0
EVAL_EFFICIENCY = 1.05
HEAD_EFFICIENCY = 0.8
PERTURBED_EFFICIENCY = 1.4
# a pruned layer's forward time per unit of sparsity: unaligned pruned widths run slower per flop on the
# CPU (docs/RESULTS.md "Speed"); fitted between the two calibration runs (0.66 and 0.95 of dense at 30%)
PRUNED_TIME_PER_SPARSITY = 0.6
ADMM_SHARE = 0.6  # of the step-through's max_steps ADMM runs before its support is stable (typically)
# the model copy and the data (token ids cached on disk), in fp32 matmul flops' worth of time
PREPARE_FLOP_PER_BYTE = 210.0
PREPARE_FLOP_PER_CORPUS = 4.2e10
# one decoded token's time per layer beyond its own work (the generate loop, the KV cache, small kernels),
# in fp32 matmul flops' worth: SmolLM2 decodes 18.5 tokens/s on this CPU, 1.8 ms per layer and token
DECODE_STEP_FLOP_PER_LAYER = 2.4e8
# reading a model into host memory, fp32 bytes per second: SmolLM2's 0.54 GB loads in 0.56-0.6 s in a
# process that has imported transformers (the app's first Run), 1.9 s in one that has not; a cold
# disk is slower
LOAD_BYTES_PER_S = 7e8
# tokens of each built-in corpus's test split with the SmolLM2 tokenizer (README), for "all windows"
CORPUS_TEST_TOKENS = {"sotu": 174_563, "brown": 677_527}


MIN_MEANINGFUL_WINDOWS = 8
MIN_MEANINGFUL_TOKENS = 2048


def calibration_warning(cfg: PruneConfig) -> str | None:
    """A warning for calibration too small to mean anything (None when it is fine): the Grams of a
    few windows are rank-deficient, so the solver fits noise and the pruned perplexity says little."""
    tokens = cfg.nsamples * cfg.seqlen
    if cfg.method == "magnitude" or (cfg.nsamples >= MIN_MEANINGFUL_WINDOWS and tokens >= MIN_MEANINGFUL_TOKENS):
        return None
    return (f"{cfg.nsamples} calibration window{'s' if cfg.nsamples != 1 else ''} of {cfg.seqlen} tokens "
            f"({tokens} tokens) is too little to mean anything: the statistics of so few tokens fit noise, and "
            f"the pruned perplexity (even one below dense) says little. Use at least {MIN_MEANINGFUL_WINDOWS} "
            f"windows and {MIN_MEANINGFUL_TOKENS} tokens, e.g. Quick preview settings (8 x 256).")


def detect_devices() -> list[dict]:
    """[{name, label}] for the CPU and every CUDA device torch sees."""
    threads = torch.get_num_threads()
    out = [{"name": "cpu", "label": f"CPU: {os.cpu_count()} cores, torch uses {threads} threads ({platform.machine()})"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"name": f"cuda:{i}", "label": f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB"})
    return out


def device_choices() -> list[str]:
    """The device selector's options: auto first, then cpu, then each CUDA device."""
    names = [d["name"] for d in detect_devices()]
    return ["auto", "cpu"] + (["cuda"] + [n for n in names if n.startswith("cuda:")] if len(names) > 1 else [])


def available_models() -> list[str]:
    """Built-in models whose package is installed, then the tiny demo configs."""
    from .models import BUILTIN_MODELS, TINY_MODELS

    installed = [name for name, b in BUILTIN_MODELS.items() if importlib.util.find_spec(b.package) is not None]
    return installed + list(TINY_MODELS)


# A run's speed follows the matmul probe's only in part. On this 2-core machine the probe measured
# 42-45 GFLOP/s under load (the calibration runs, nice 19 at load 6-9) and 193 GFLOP/s quiet, 4.3x,
# while the same Quick-settings run was 2.9x faster (estimate_calibration.json): the run's time scales
# as the probe's speed to the power 0.74 around the calibration runs' 44 GFLOP/s. CPU only (a GPU's
# probe is not disturbed this way, and no GPU run is in the calibration).
PROBE_REF_FLOPS = 44e9
PROBE_EXPONENT = 0.74


def effective_flops(flops: float, device: str) -> float:
    """The measured probe speed as the estimate's coefficients use it (PROBE_EXPONENT)."""
    if not str(device).startswith("cpu"):
        return flops
    return PROBE_REF_FLOPS * (flops / PROBE_REF_FLOPS) ** PROBE_EXPONENT


@lru_cache(maxsize=8)
def matmul_flops(device: str, dtype: str = "float32", n: int = 1024, seconds: float = 0.15) -> float:
    """Measured FLOP/s of an n x n matrix multiply on `device` (cached per process)."""
    dt = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}[dtype]
    dev = torch.device(device)
    a, b = torch.randn(n, n, dtype=dt, device=dev), torch.randn(n, n, dtype=dt, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        a @ b
        k += 1
    sync()
    return 2 * n**3 * k / (time.perf_counter() - t)


# the stages of a run, in order: the keys of estimate_seconds' phases, of the progress events
# (pipeline.ProgressEvent.stage) and, with "_s" and "-" as "_", of the record's timing
RUN_STAGES = ("prepare", "eval-dense", "heldout-dense", "pass1", "sensitivity", "pass2", "losses-pruned",
              "eval-pruned", "speed")
PHASE_STAGE = {"refine": "pass2", "gradients": "pass1"}  # estimated phases that run inside a stage


def estimate_seconds(config, cfg: PruneConfig, device: str = "cpu", eval_tokens: dict[str, int] | None = None,
                     fp32_flops: float | None = None, fp64_flops: float | None = None,
                     evaluate_dense: bool = True, measure_speed: bool = False) -> dict:
    """Wall time of `run_prune(cfg)` for a model `config` (transformers config) on `device`, per phase.

    Every stage of RUN_STAGES that the run goes through has a phase (the block refit and
    global-taylor's gradients have their own, inside pass 2 and pass 1): the model copy and the data,
    the dense and pruned evaluations with the held-out and calibration losses around the pruning,
    and both passes. Each is its floating-point work over this device's measured matmul speed
    (fp32 for forwards, fp64 for solves), with the coefficients above fitted to measured SmolLM2-135M
    phase times (benchmarks/results/app/estimate_calibration.json; checked on a fresh run in
    estimate_check.json).

    eval_tokens: test tokens per corpus when cfg.eval_windows is None (all windows); defaults to
    the built-in corpora's SmolLM2 token counts. Returns {total_s, phases: {...}, fp32_flops,
    fp64_flops, note}.
    """
    from .data.calibration import HELDOUT_LOSS_WINDOWS
    from .estimate import config_layout, model_params
    from .memory import DTYPE_BYTES, layer_weight_bytes
    from .methods import get_method
    from .run import CALIB_LOSS_WINDOWS

    measured32 = fp32_flops or matmul_flops(device, "float32")
    measured64 = fp64_flops or matmul_flops(device, "float64")
    fp32, fp64 = effective_flops(measured32, device), effective_flops(measured64, device)
    lay = config_layout(config)
    L, d, V, S = config.num_hidden_layers, config.hidden_size, config.vocab_size, cfg.seqlen
    per_token = 2 * layer_weight_bytes(lay, 1) + 4 * S * lay.n_heads * lay.head_dim  # one layer forward
    head = 2 * d * V  # the LM head per token (the loss and the perplexities)
    fwd, whole = FORWARD_EFFICIENCY * fp32, EVAL_EFFICIENCY * fp32
    n_attn, n_mlp = lay.n_heads * lay.head_dim + 1, lay.intermediate + 1
    cubes = L * (n_attn**3 + n_mlp**3)  # sum over modules of (n+1)^3
    gram = 2 * (n_attn**2 + n_mlp**2)  # flops per token per layer of both Grams
    calib = cfg.nsamples * S
    kept = 1 - PRUNED_TIME_PER_SPARSITY * cfg.sparsity  # a pruned layer's time, as a share of the dense one's
    phases: dict[str, float] = {}
    tokens = {}
    for name in cfg.eval_data:
        tokens[name] = (cfg.eval_windows * S if cfg.eval_windows is not None
                        else (eval_tokens or CORPUS_TEST_TOKENS).get(name, 100_000) // S * S)
    model_bytes = model_params(config) * DTYPE_BYTES.get(cfg.dtype, 4)
    phases["prepare"] = (PREPARE_FLOP_PER_BYTE * model_bytes + PREPARE_FLOP_PER_CORPUS * (len(tokens) + 1)) / fp32
    eval_tokens_all = sum(tokens.values())
    heldout = HELDOUT_LOSS_WINDOWS * S
    if evaluate_dense:
        phases["eval-dense"] = eval_tokens_all * (L * per_token + head) / whole
        phases["heldout-dense"] = heldout * (L * per_token + head) / whole
    if cfg.method == "global-taylor":
        phases["gradients"] = 3 * calib * (L * per_token + head) / whole
    elif cfg.method == "magnitude":
        phases["pass2"] = 0.5
    else:
        structprune = cfg.method == "structprune"
        sens = get_method(cfg.method)(cfg).wants_sensitivity()
        p1 = calib * L * (per_token + gram) / fwd
        if structprune:
            p1 += SOLVE_CUBES[f"score-{cfg.saliency}"] * cubes / fp64
        if sens:
            sw = min(cfg.sensitivity_windows, cfg.nsamples) * S
            # 2L perturbed streams, each through L/2 layers on average
            p1 += SOLVE_CUBES["sensitivity"] * cubes / fp64 + sw * L * L * per_token / (PERTURBED_EFFICIENCY * fp32)
        phases["pass1"] = p1
        if sens:
            phases["sensitivity"] = (2 * L + 1) * sw * head / (HEAD_EFFICIENCY * fp32)  # the head on every stream
        p2 = calib * L * (2.5 * per_token + gram) / fwd
        if structprune:
            p2 += SOLVE_CUBES[cfg.selector] * cubes / fp64
        phases["pass2"] = p2
        if structprune and cfg.refine_epochs:
            # block refit: the dense layer's targets, then per epoch forward + backward (3 forwards' worth) on
            # 7/8 of the windows and a forward of the held-out 1/8; one held-out forward before the first epoch
            passes = 1 + 1 / 8 + cfg.refine_epochs * (3 * 7 / 8 + 1 / 8)
            phases["refine"] = calib * L * per_token * passes / fwd
    loss_tokens = min(CALIB_LOSS_WINDOWS, cfg.nsamples) * S + heldout
    phases["losses-pruned"] = loss_tokens * (kept * L * per_token + head) / whole
    phases["eval-pruned"] = eval_tokens_all * (kept * L * per_token + head) / whole
    if measure_speed:  # speed.speed_section: dense and pruned, 1 warm-up + 3 timed runs of each quick shape
        quick = sum(sh.batch * (sh.length + sh.new_tokens) for sh in QUICK_SHAPES)
        steps = sum(sh.new_tokens for sh in QUICK_SHAPES)  # decoded one at a time: framework-bound
        phases["speed"] = (4 * quick * ((1 + kept) * L * per_token + 2 * head) / whole
                           + 4 * 2 * steps * L * DECODE_STEP_FLOP_PER_LAYER / fp32)
    return {"total_s": sum(phases.values()), "phases": phases, "fp32_flops": measured32, "fp64_flops": measured64,
            "note": "estimate: each phase's work over this device's measured matmul speed, fitted to measured "
                    "SmolLM2-135M runs on a busy and a quiet machine (within 1.3x of each)"}


def run_stages(config, cfg: PruneConfig, device: str | None = None, measure_speed: bool = False) -> dict[str, float]:
    """Estimated seconds per progress stage of `run_prune(cfg)`, in the order they run: the job's
    progress bar and time left (jobs.py). Phases that run inside a stage are added to it."""
    from .evaluation import resolve_device

    secs = estimate_seconds(config, cfg, device or str(resolve_device(cfg.device)), measure_speed=measure_speed)["phases"]
    out: dict[str, float] = {}
    for stage in RUN_STAGES:
        total = sum(v for k, v in secs.items() if PHASE_STAGE.get(k, k) == stage)
        if any(PHASE_STAGE.get(k, k) == stage for k in secs):
            out[stage] = total
    return out


def load_seconds(config) -> float:
    """Estimated seconds to load a model of `config` into host memory (the app's first run of it)."""
    from .estimate import model_params

    return model_params(config) * 4 / LOAD_BYTES_PER_S


def profile_stages(config, cfg: PruneConfig, device: str | None = None) -> dict[str, float]:
    """Estimated seconds per stage of the explorer's energy pass (explorer.compute_energy_profile:
    the copy and calibration windows, pass 1 with the module sensitivities)."""
    sens = PruneConfig.from_dict({**cfg.to_dict(), "method": "structprune", "allocation": "softmax",
                                  "energy": "sensitivity", "temperature": 1.0})
    stages = run_stages(config, sens, device)
    return {k: stages[k] for k in ("prepare", "pass1", "sensitivity") if k in stages}


def stepthrough_stages(config, layer: int, kind: str, nsamples: int, seqlen: int, max_steps: int,
                       device: str = "cpu", fp32_flops: float | None = None,
                       fp64_flops: float | None = None) -> dict[str, float]:
    """Estimated seconds per stage of the Method page's step-through (stepthrough.admm_stepthrough):
    the copy, the calibration windows streamed to `layer`, ADMM's iterations on its module, and the
    solve with each of the three selectors."""
    from .estimate import config_layout, model_params
    from .memory import layer_weight_bytes

    fp32 = effective_flops(fp32_flops or matmul_flops(device, "float32"), device)
    fp64 = effective_flops(fp64_flops or matmul_flops(device, "float64"), device)
    lay = config_layout(config)
    per_token = 2 * layer_weight_bytes(lay, 1) + 4 * seqlen * lay.n_heads * lay.head_dim
    m = (lay.n_heads * lay.head_dim if kind == "attn" else lay.intermediate) + 1
    d_out = lay.hidden
    return {
        "prepare": (PREPARE_FLOP_PER_BYTE * model_params(config) * 4 + PREPARE_FLOP_PER_CORPUS) / fp32,
        "gram": nsamples * seqlen * (layer + 1) * per_token / (FORWARD_EFFICIENCY * fp32),
        # one eigendecomposition, then per iteration two (d_out x m) @ (m x m) products; ADMM stops once
        # its support is stable, after ADMM_SHARE of max_steps on SmolLM2 (estimate_check.json)
        "admm": (SOLVE_CUBES["eigh"] * m**3 + ADMM_SHARE * max_steps * 4 * d_out * m**2) / fp64,
        "solves": (SOLVE_CUBES["saliency"] + SOLVE_CUBES["greedy"] + SOLVE_CUBES["admm"]) * m**3 / fp64,
    }


def form_config(values: dict, temperature_inf: bool = False) -> PruneConfig:
    """A PruneConfig from a settings form's values (one per PruneConfig field, by name), where
    eval_windows 0 means all windows, an empty eval_data the default corpora, temperature_inf the
    uniform limit, and sensitivity_windows is capped at the calibration windows (a subset of them).
    Raises InvalidConfigError with the library's message."""
    v = dict(values)
    v["model"] = (v.get("model") or "").strip()
    if temperature_inf:
        v["temperature"] = math.inf
    v["eval_data"] = tuple(v.get("eval_data") or PruneConfig().eval_data)
    v["eval_windows"] = v.get("eval_windows") or None
    if "sensitivity_windows" in v and "nsamples" in v:
        v["sensitivity_windows"] = min(v["sensitivity_windows"], v["nsamples"])
    return PruneConfig(**v)


def estimate_run(config, cfg: PruneConfig, loads_model: bool = False) -> dict:
    """What the Prune page shows before a run: predicted peak device and host memory
    (estimate_memory, with the run's own options: its device, its compute dtype (float32 on the
    CPU, as run.run_dtype), where its weights stay) and time (estimate_seconds) for model `config`
    on cfg's device. `loads_model`: the run's job loads the model first (the app's first Run of it;
    jobs.JobRunner.load_stage), a "load" phase unless the weights stay on disk.

    Returns {device, memory (estimate_memory's dict), peak_phase, seconds (estimate_seconds's dict),
    fp32_gflops}."""
    from .estimate import estimate_memory
    from .evaluation import resolve_device
    from .methods import get_method
    from .run import streams_from_disk

    dev = str(resolve_device(cfg.device))
    on_cpu = dev == "cpu"
    mem = estimate_memory(config, cfg.method, cfg.nsamples, cfg.seqlen, "float32" if on_cpu else cfg.dtype,
                          cfg.batch_size, sensitivity=get_method(cfg.method)(cfg).wants_sensitivity(), target=cfg.target,
                          relative=cfg.relative_error, host_grams=not on_cpu, refine=cfg.refine_epochs > 0,
                          weights="disk" if streams_from_disk(cfg) else "memory", on_cpu=on_cpu)
    secs = estimate_seconds(config, cfg, dev, measure_speed=True)  # the app's runs always time the result
    if loads_model and mem["weights"] != "disk":
        secs["phases"] = {"load": load_seconds(config), **secs["phases"]}
        secs["total_s"] += secs["phases"]["load"]
    return {"device": dev, "memory": mem, "peak_phase": max(mem["phases"], key=mem["phases"].get),
            "seconds": secs, "fp32_gflops": secs["fp32_flops"] / 1e9}


def run_headline(rec: dict) -> dict:
    """The headline numbers of a run record: the first pruned perplexity with its corpus label and its
    change against the dense model (None where the record has none), and the parameter counts in
    millions, after and the change."""
    from .reports import ppl_frame

    ppl = ppl_frame(rec)
    out = {"ppl_label": None, "ppl": None, "ppl_delta": None}
    pruned = ppl[ppl["model"] == "pruned"] if not ppl.empty else ppl
    if len(pruned):
        first = pruned.iloc[0]
        dense = ppl[(ppl["model"] == "dense") & (ppl["corpus"] == first["corpus"])]["value"]
        out.update(ppl_label=first["label"], ppl=float(first["value"]),
                   ppl_delta=float(first["value"] - dense.iloc[0]) if len(dense) else None)
    before, after = rec["params"]["before"]["total"], rec["params"]["after"]["total"]
    out.update(params_after_m=after / 1e6, params_delta_m=(after - before) / 1e6)
    return out


__all__ = ["detect_devices", "device_choices", "available_models", "matmul_flops", "estimate_seconds", "run_stages",
           "profile_stages", "stepthrough_stages", "RUN_STAGES", "PHASE_STAGE",
           "form_config", "estimate_run", "run_headline"]
