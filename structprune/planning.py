"""What can run here and roughly how long it takes: devices, installed models, a time estimate,
the app's settings as a PruneConfig, and the headline numbers of a finished run.

The time estimate is a rough model, labelled as such wherever it is shown: the floating-point work
of a run (layer forwards over the calibration and evaluation tokens, the Gram accumulations, and
the per-module solves, which scale with (n+1)^3 for a module with n input features) divided by this
device's measured matrix-multiply speed (fp32 for forwards, fp64 for solves; measured once per
process in a fraction of a second). The solver coefficients were fitted to SmolLM2-135M runs on
a 2-core CPU; expect the estimate to be within a factor of two, not better.
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

# (n+1)^3 multiples per module solve, fitted on SmolLM2-135M (CPU, fp64 solves)
SOLVE_CUBES = {"score-obs": 2.0, "score-diag": 0.1, "sensitivity": 4.0,
               "saliency": 4.0, "greedy": 8.5, "admm": 20.0}
FORWARD_EFFICIENCY = 2.0  # layer forwards ran ~2x the 1024^2 benchmark's FLOP/s (SmolLM2, CPU)
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


def estimate_seconds(config, cfg: PruneConfig, device: str = "cpu", eval_tokens: dict[str, int] | None = None,
                     fp32_flops: float | None = None, fp64_flops: float | None = None) -> dict:
    """Rough wall time of `run_prune(cfg)` for a model `config` (transformers config) on `device`.

    eval_tokens: test tokens per corpus when cfg.eval_windows is None (all windows); defaults to
    the built-in corpora's SmolLM2 token counts. Returns {total_s, phases: {...}, fp32_flops,
    fp64_flops, note}.
    """
    from .estimate import config_layout
    from .memory import layer_weight_bytes

    fp32 = fp32_flops or matmul_flops(device, "float32")
    fp64 = fp64_flops or matmul_flops(device, "float64")
    lay = config_layout(config)
    L, d, V, S = config.num_hidden_layers, config.hidden_size, config.vocab_size, cfg.seqlen
    per_token = 2 * layer_weight_bytes(lay, 1) + 4 * S * lay.n_heads * lay.head_dim  # one layer forward
    fwd = FORWARD_EFFICIENCY * fp32
    n_attn, n_mlp = lay.n_heads * lay.head_dim + 1, lay.intermediate + 1
    cubes = L * (n_attn**3 + n_mlp**3)  # sum over modules of (n+1)^3
    gram = 2 * (n_attn**2 + n_mlp**2)  # flops per token per layer of both Grams
    calib = cfg.nsamples * S
    phases: dict[str, float] = {}
    tokens = {}
    for name in cfg.eval_data:
        tokens[name] = (cfg.eval_windows * S if cfg.eval_windows is not None
                        else (eval_tokens or CORPUS_TEST_TOKENS).get(name, 100_000) // S * S)
    evals = sum(tokens.values()) * (L * per_token + 2 * d * V)
    phases["eval"] = 2 * evals / fwd
    if cfg.method == "global-taylor":
        phases["gradients"] = 3 * calib * (L * per_token + 2 * d * V) / fwd
    elif cfg.method == "magnitude":
        phases["pass2"] = 0.5
    else:
        structprune = cfg.method == "structprune"
        sens = structprune and cfg.allocation in ("softmax", "threshold") and cfg.energy == "sensitivity" \
            and not math.isinf(cfg.temperature)
        p1 = calib * L * (per_token + gram) / fwd
        if structprune:
            p1 += SOLVE_CUBES[f"score-{cfg.saliency}"] * cubes / fp64
        if sens:
            sw = min(cfg.sensitivity_windows, cfg.nsamples) * S
            p1 += SOLVE_CUBES["sensitivity"] * cubes / fp64 + sw * L * L * per_token / fwd  # 2L modules x L/2 layers
        phases["pass1"] = p1
        p2 = calib * L * (2.5 * per_token + gram) / fwd
        if structprune:
            p2 += SOLVE_CUBES[cfg.selector] * cubes / fp64
        phases["pass2"] = p2
        if structprune and cfg.refine_epochs:
            # block refit: the dense layer's targets, then per epoch forward + backward (3 forwards' worth) on
            # 7/8 of the windows and a forward of the held-out 1/8; one held-out forward before the first epoch
            passes = 1 + 1 / 8 + cfg.refine_epochs * (3 * 7 / 8 + 1 / 8)
            phases["refine"] = calib * L * per_token * passes / fwd
    return {"total_s": sum(phases.values()), "phases": phases, "fp32_flops": fp32, "fp64_flops": fp64,
            "note": "rough estimate (within about 2x): the run's FLOPs over this device's measured matmul speed"}


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


def estimate_run(config, cfg: PruneConfig) -> dict:
    """What the Prune page shows before a run: predicted peak device memory (estimate_memory, with
    the run's own options) and time (estimate_seconds) for model `config` on cfg's device.

    Returns {device, memory (estimate_memory's dict), peak_phase, seconds (estimate_seconds's dict),
    fp32_gflops}."""
    from .estimate import estimate_memory
    from .evaluation import resolve_device
    from .methods import get_method

    dev = str(resolve_device(cfg.device))
    mem = estimate_memory(config, cfg.method, cfg.nsamples, cfg.seqlen, cfg.dtype, cfg.batch_size,
                          sensitivity=get_method(cfg.method)(cfg).wants_sensitivity(), target=cfg.target,
                          relative=cfg.relative_error, host_grams=dev.startswith("cuda"), refine=cfg.refine_epochs > 0,
                          device="cuda" if dev.startswith("cuda") else "cpu")
    secs = estimate_seconds(config, cfg, dev)
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


__all__ = ["detect_devices", "device_choices", "available_models", "matmul_flops", "estimate_seconds",
           "form_config", "estimate_run", "run_headline"]
