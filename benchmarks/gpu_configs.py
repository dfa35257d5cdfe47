"""Real model shapes for the GPU benchmarks, random weights built fast, and a time model.

Every model here is built from a config written in code (the published shapes of OPT, Llama-2 and
SmolLM2) with random weights: memory and time do not depend on the weights' values, and no model
file can travel to the GPU machine (docs/ASSETS.md). Only torch, transformers and structprune are
imported, so this runs on the GPU machine's bare image.

`build_random` skips transformers' weight initialisation (slow for 13B parameters on a CPU) and
fills the weights itself: on the GPU when there is one (seconds for 26 GB), copied to where the
model lives. `predict_seconds` is a coarse cost model (FLOPs and bytes over assumed rates) used to
order and skip runs within the wall-clock budget; it is corrected online by measured runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from structprune.estimate import config_layout, model_params


def _opt(hidden: int, layers: int, heads: int, ffn: int, **kw) -> OPTConfig:
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                     word_embed_proj_dim=kw.pop("word_embed_proj_dim", hidden),
                     vocab_size=kw.pop("vocab_size", 50272),
                     max_position_embeddings=kw.pop("max_position_embeddings", 2048),
                     do_layer_norm_before=True, enable_bias=True, tie_word_embeddings=True,
                     activation_function="relu", **kw)


def _llama(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, ctx: int,
           tied: bool, theta: float = 10000.0, **kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=ctx, tie_word_embeddings=tied, rope_theta=theta,
                       rms_norm_eps=1e-5, hidden_act="silu", **kw)


# Published shapes (config.json of facebook/opt-*, meta-llama/Llama-2-*-hf, HuggingFaceTB/SmolLM2-135M).
REAL_CONFIGS: dict[str, Callable[[], object]] = {
    "smollm2-135m": lambda: _llama(576, 30, 9, 3, 1536, 49152, 8192, True, theta=100000.0, head_dim=64),
    "opt-125m": lambda: _opt(768, 12, 12, 3072),
    "opt-1.3b": lambda: _opt(2048, 24, 32, 8192),
    "opt-2.7b": lambda: _opt(2560, 32, 32, 10240),
    "llama-2-7b": lambda: _llama(4096, 32, 32, 32, 11008, 32000, 4096, False),
    "opt-6.7b": lambda: _opt(4096, 32, 32, 16384),
    "llama-2-13b": lambda: _llama(5120, 40, 40, 40, 13824, 32000, 4096, False),
    "opt-13b": lambda: _opt(5120, 40, 40, 20480),
}

# Scaled-down shapes of the same families for the CPU smoke run (seconds on 2 cores). Small
# vocabularies keep the head phase below the layers' (as in the real sizes).
SMOKE_CONFIGS: dict[str, Callable[[], object]] = {
    "smoke-opt-s": lambda: _opt(32, 2, 4, 64, vocab_size=256, max_position_embeddings=128),
    "smoke-opt-m": lambda: _opt(64, 3, 4, 128, vocab_size=256, max_position_embeddings=128),
    "smoke-opt-l": lambda: _opt(96, 4, 6, 192, vocab_size=256, max_position_embeddings=128),
    "smoke-llama-gqa": lambda: _llama(72, 3, 9, 3, 192, 256, 128, True, head_dim=8),
    "smoke-llama-mha": lambda: _llama(64, 2, 4, 4, 96, 256, 128, False),
}


def family_of(config) -> str:
    return "opt" if config.model_type == "opt" else "llama"


def get_config(name: str, layers: int | None = None):
    """A config by name (real or smoke), with sdpa attention; `layers` truncates the depth."""
    table = {**REAL_CONFIGS, **SMOKE_CONFIGS}
    if name not in table:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(table)}")
    cfg = table[name]()
    if layers is not None:
        cfg.num_hidden_layers = min(layers, cfg.num_hidden_layers)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    return cfg


# --- building random models fast ---------------------------------------------------------------

@contextlib.contextmanager
def _skip_init():
    """transformers' own `no_init_weights` when it exists, else a no-op patch of torch.nn.init."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = None
    if no_init_weights is not None:
        with no_init_weights():
            yield
        return
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0, fill_device: torch.device | str | None = None,
                 std: float = 0.02) -> None:
    """Norm weights 1, biases 0, every other weight N(0, std^2), drawn on `fill_device` (the GPU
    when given: 13B normals in well under a second) and copied to where each parameter lives."""
    fill_device = torch.device(fill_device) if fill_device is not None else None
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            dev = fill_device or p.device
            g = torch.Generator(device=dev).manual_seed(seed * 100003 + i)
            p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=p.dtype).mul_(std))


def build_random(config, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0,
                 fill_device: str | torch.device | None = None) -> torch.nn.Module:
    """A causal LM of `config` on `device` in `dtype`, random weights, eval mode, tied embeddings
    tied. Buffers (rotary tables) are computed by the modules as usual."""
    with _skip_init(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    fill_random_(model, seed, fill_device)
    for name, b in model.named_buffers():
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise RuntimeError(f"buffer {name} is not finite after building {config.model_type}")
    return model.eval()


# --- a coarse time model ----------------------------------------------------------------------

# Effective rates (FLOP/s, B/s) assumed for one H200 (bf16 matmuls, TF32 Grams, fp64 solves,
# pageable host copies) and for a small CPU; the runner multiplies predictions by a per-method
# correction learned from the runs that finished.
RATES = {
    "cuda": dict(mm=250e12, gram=250e12, fp64=25e12, host=8e9, launch=0.6e-3),
    "cpu": dict(mm=30e9, gram=30e9, fp64=10e9, host=4e9, launch=1e-3),
}


def _layer_numbers(config, seqlen: int) -> dict:
    lay = config_layout(config)
    d = lay.hidden
    per_layer = (d * lay.head_dim * (2 * lay.n_heads + 2 * lay.n_kv_heads)
                 + (3 if lay.gated else 2) * d * lay.intermediate)
    return dict(d=d, p=per_layer, na=lay.n_heads * lay.head_dim + 1, nm=lay.intermediate + 1,
                attn=2 * seqlen * d)  # causal attention FLOPs per token per layer (QK^T and AV, halved)


def predict_seconds(config, method: str, nsamples: int, seqlen: int, sensitivity: bool,
                    layers_run: int | None = None, device: str = "cuda", sens_windows: int = 4,
                    db: int = 2) -> float:
    """Rough wall time of one run (all phases), before any correction."""
    r = RATES[device]
    x = _layer_numbers(config, seqlen)
    L = layers_run or config.num_hidden_layers
    T = nsamples * seqlen

    def fwd(tokens: int, windows: int) -> float:  # one layer over `tokens`, activations in and out
        # (`launch`: kernel launches and Python per layer and window)
        return (2 * x["p"] + x["attn"]) * tokens / r["mm"] + 2 * tokens * x["d"] * db / r["host"] + windows * r["launch"]

    def gram(n: int) -> float:
        return 2 * T * n * n / r["gram"]

    def solve(m: int) -> float:  # inverses, greedy downdates, swaps, refit and error on (m x m)
        return (5 * m ** 3 + 8 * x["d"] * m * m) / r["fp64"]

    move = 2 * x["p"] * db / r["host"]
    if method == "global-taylor":
        n = model_params(config)
        return n * db / r["host"] + nsamples * (6 * n * seqlen / r["mm"] + 3 * L * r["launch"]) + 2.0
    solves = method == "structprune"
    score = (2.5 * (x["na"] ** 3 + x["nm"] ** 3) / r["fp64"]) if solves else 0.0
    pass1 = L * (fwd(T, nsamples) + gram(x["na"]) + gram(x["nm"]) + score + move)
    pass2 = L * (2.3 * fwd(T, nsamples) + gram(x["na"]) + gram(x["nm"]) + move
                 + ((solve(x["na"]) + solve(x["nm"])) if solves else 0.0))
    sens = 0.0
    if sensitivity and solves:
        Ts = sens_windows * seqlen
        sens = (L * L + 3 * L) * fwd(Ts, sens_windows) + L * (solve(x["na"]) + solve(x["nm"]))
        sens += (2 * L + 1) * 2 * Ts * x["d"] * config.vocab_size / r["mm"]
    return pass1 + pass2 + sens + 1.0


def n_params(config) -> int:
    return model_params(config)


def log_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x); None with fewer than two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx
