"""Peak device memory predicted from a config, without weights (docs/METHOD.md "Memory").

`layerwise_moments` describes, moment by moment, what the streaming engine holds on its device
(ledger keys and `memory.py` byte formulas: the keys and formulas of the engine's own `hold` calls
in streaming.py / pipeline.py), and `estimate_memory` takes its maximum, so on the CPU it equals the
accounted peak exactly (tests/test_engine.py); tests/test_footprint.py checks that every set of items
a real run holds lies inside one of the moments. Global methods hold the whole model, its
gradients and the activations saved for backpropagation: O(N) instead of one layer.

What differs between families (the layer layout, the parameters outside the layers, the norm kind)
comes from the family's `AdapterSpec`. `estimate.py` re-exports this module's names next to
`load_config`, which turns a preset or model name into a config.
"""

from __future__ import annotations

from dataclasses import dataclass

from .adapters import adapter_for, config_layout
from .memory import (activation_bytes, backprop_saved_bytes, column_rule_bytes, embed_workspace_bytes,
                     forward_workspace_bytes, gram_bytes, gram_check_bytes, layer_weight_bytes, logits_bytes,
                     loss_head_bytes, norm_saved_bytes, output_energy_bytes, refine_bytes, saliency_bytes,
                     solver_bytes)

_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
LAYERWISE_METHODS = ("structprune", "wanda-sp", "flap", "owl")
WEIGHTS_ONLY_METHODS = ("magnitude",)  # prune the host copy from its weights: the device holds nothing


def model_params(config) -> int:
    """All parameters (tied embeddings counted once), from the config alone."""
    lay = config_layout(config)
    per_layer = layer_weight_bytes(lay, 1)
    head = 0 if getattr(config, "tie_word_embeddings", True) else config.vocab_size * config.hidden_size
    return adapter_for(config).spec.embedding_params(config) + config.num_hidden_layers * per_layer + head


@dataclass(frozen=True)
class Moment:
    """What the engine holds on its device at one moment of a phase: ledger keys and bytes, the
    keys the engine's `DeviceLedger.hold` / `held` calls use. A run's ledger never holds a set of
    items that is not inside one of its moments (tests/test_footprint.py checks it against real runs)."""

    phase: str
    name: str
    items: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.items.values())


def layerwise_moments(config, method: str = "structprune", batch_size: int = 1, seqlen: int = 512,
                      dtype: str = "float32", sensitivity: bool = True, target: str = "local",
                      relative: bool | None = None, host_grams: bool = False,
                      refine: bool = False) -> list[Moment]:
    """The moments of a layer-wise method's run (`pipeline.collect_stats`, `pipeline.prune_sequential`,
    `streaming.LayerStream`), at a config's dense shapes: the one description of what the streaming
    loop holds, from which `estimate_memory` takes its maximum. Options as `estimate_memory`'s."""
    db = _dtype_bytes(dtype)
    lay = config_layout(config)
    spec = adapter_for(config).spec
    B, S = batch_size, seqlen
    if relative is None:
        relative = method == "structprune"
    solver = method == "structprune"  # the methods whose scores and rules run OBS solves
    act = activation_bytes(B, S, lay.hidden, db)
    hooked = forward_workspace_bytes(lay, B, S, db, relative=relative and solver)
    plain = forward_workspace_bytes(lay, B, S, db, hooked=False)
    layer = layer_weight_bytes(lay, db)
    widths = {"attn": lay.n_heads * lay.head_dim, "mlp": lay.intermediate}
    group = {"attn": lay.head_dim, "mlp": 1}
    gram = {k: gram_bytes(n) for k, n in widths.items()}
    check = {k: gram_check_bytes(n) for k, n in widths.items()}
    grams = sum(gram.values())
    host = host_grams and solver  # Grams leave the device once accumulated (pipeline.py)
    held = {} if host else {"grams": grams}  # what stays on the device next to pass 1's solves
    out = [Moment("embed", "base forward", {"embedding": spec.embedding_params(config) * db,
                                            "batch-out": embed_workspace_bytes(spec, B, S, lay.hidden, lay.head_dim, db)})]

    def p1(name, **items):
        out.append(Moment("pass1", name, {"layer": layer, **items}))

    p1("accumulate Grams", grams=grams, **{"batch-in": act, "workspace": hooked})
    p1("layer output", grams=grams, **{"batch-in": act, "batch-out": act})
    if not host:
        for k in widths:
            p1(f"read {k} Gram", grams=grams, **{"gram-check": check[k]})
    if solver:
        for k, n in widths.items():
            p1(f"score {k} units", **held, solver=saliency_bytes(lay.hidden, n, group[k]))
    if not host:  # the module's output energy next to its Gram (pipeline.module_output_energy)
        for k, n in widths.items():
            p1(f"output energy {k}", **held, energy=output_energy_bytes(lay.hidden, n))
    if sensitivity and solver:
        for k, n in widths.items():
            p1(f"sensitivity solve {k}", **held, solver=solver_bytes(lay.hidden, n, group[k]))
        p1("sensitivity streams", **held, **{"batch-in": act, "workspace": plain})
        # only the sensitivity streams run the LM head during pruning, next to the last Grams
        out.append(Moment("head", "sensitivity losses", {"head": spec.lm_head_params(config) * db, "batch-in": act,
                                                          "logits": logits_bytes(B, S, config.vocab_size)}))
    refine = refine and solver
    dense_copy = {"dense-layer": layer} if target == "dense" or refine else {}
    gram_to_host = host and target == "local"  # the Gram goes to the host before the solve

    def p2(name, **items):
        out.append(Moment("pass2", name, {"layer": layer, **dense_copy, **items}))

    for k, n in widths.items():
        rule = (solver_bytes(lay.hidden, n, group[k]) if solver else column_rule_bytes(lay.hidden, n, db))
        p2(f"accumulate {k} Gram", grams=gram[k], **{"batch-in": act, "workspace": hooked})
        if not gram_to_host and target == "local":
            p2(f"read {k} Gram", grams=gram[k], **{"gram-check": check[k]})
        p2(f"solve {k}", **({} if gram_to_host else {"grams": gram[k]}), solver=rule)
    p2("run the pruned layer", **{"batch-in": act, "workspace": plain})
    p2("layer output", **{"batch-in": act, "batch-out": act})
    if refine:
        p2("block refit", refine=refine_bytes(lay, spec.norm, B, S, db))
    return out


def estimate_memory(config, method: str = "structprune", nsamples: int = 64, seqlen: int = 512,
                    dtype: str = "float32", batch_size: int = 1, sensitivity: bool = True,
                    target: str = "local", relative: bool | None = None, host_grams: bool = False,
                    refine: bool = False, weights: str = "memory", on_cpu: bool = False) -> dict:
    """Predicted peak device bytes, per phase, for one pruning run, and the host's peak.

    Layer-wise methods: the largest of `layerwise_moments` (the same items the engine holds), per
    phase and overall, with the moment it happens at. Host memory for the activations
    (nsamples x seqlen x d, twice) is reported separately: it never sits on the device.
    global-taylor: `global_taylor_terms` (returned under "terms"). `relative`: whether the Gram
    hooks are token-weighted (default: for structprune, as its default config). `host_grams`: the
    engine keeps structprune's Grams in host memory between accumulation and solve (its default on
    CUDA; `LayerStream.host_grams`). `refine`: the block refit after each pruned layer
    (structprune's refine_epochs > 0), with a dense copy of the layer through pass 2.
    `weights`: "memory" (the host holds the loaded model and the run's working copy of it) or
    "disk" (the host holds the largest of the base, one layer and the head: weights.py).
    `on_cpu`: the compute device is the host itself, so the host's peak adds the device's working
    set (`host_peak_terms`). The host peak counts the run's own data; the process itself (Python,
    torch, transformers) holds HOST_PROCESS_BYTES more before any model.
    """
    db = _dtype_bytes(dtype)
    lay = config_layout(config)
    n_params = model_params(config)
    if weights not in ("memory", "disk"):
        raise ValueError(f"weights must be memory or disk (got {weights!r})")
    spec = adapter_for(config).spec
    host_weights = (2 * n_params * db if weights == "memory" else
                    max(spec.embedding_params(config), layer_weight_bytes(lay, 1), spec.lm_head_params(config)) * db)
    phases: dict[str, int] = {}
    peak_moment = None
    work = 0  # the device's largest working set besides the model's own weights
    if method in LAYERWISE_METHODS:
        moments = layerwise_moments(config, method, batch_size, seqlen, dtype, sensitivity, target, relative,
                                    host_grams, refine)
        for m in moments:
            phases[m.phase] = max(phases.get(m.phase, 0), m.bytes)
        top = max(moments, key=lambda m: m.bytes)
        peak, peak_moment = top.bytes, f"{top.phase}: {top.name}"
        work = max(m.bytes - sum(v for k, v in m.items.items() if k in _WEIGHT_ITEMS) for m in moments)
    elif method in WEIGHTS_ONLY_METHODS:
        phases["weights-only"] = 0
        peak = 0
    elif method == "global-taylor":
        terms = global_taylor_terms(config, n_params, batch_size, seqlen, db, nsamples)
        phases["global"] = sum(terms.values())
        peak = phases["global"]
        work = peak - terms["weights"]
    else:
        raise ValueError(f"unknown method {method!r}")
    activations = 2 * nsamples * seqlen * lay.hidden * db
    if host_grams and method == "structprune":  # one layer's Grams wait on the host for their solves
        host_grams_bytes = sum(gram_bytes(n) for n in (lay.n_heads * lay.head_dim, lay.intermediate))
    else:
        host_grams_bytes = 0
    host_terms = host_peak_terms(weights, on_cpu, host_weights, activations, peak, work, host_grams_bytes)
    return {
        "method": method, "peak_bytes": int(peak), "phases": {k: int(v) for k, v in phases.items()},
        "peak_moment": peak_moment,
        "model_params": n_params, "model_weight_bytes": n_params * db,
        "layer_weight_bytes": layer_weight_bytes(lay, db), "n_layers": config.num_hidden_layers,
        "host_activation_bytes": activations,
        "host_weight_bytes": host_weights,
        "host_peak_bytes": sum(host_terms.values()), "host_terms": host_terms,
        "host_process_bytes": HOST_PROCESS_BYTES,
        "weights": weights, "on_cpu": on_cpu,
        "nsamples": nsamples, "seqlen": seqlen, "dtype": dtype, "batch_size": batch_size,
        **({"terms": {k: int(v) for k, v in terms.items()}} if method == "global-taylor" else {}),
    }


_WEIGHT_ITEMS = ("layer", "embedding", "head")  # moment items that are the model's own tensors
# Python with torch and transformers imported, before any model: the resident size the scale
# benchmark measures in each child (benchmarks/results/scale/scale.json, rss_after_imports_bytes;
# CPU build of torch; CUDA's libraries add their own)
HOST_PROCESS_BYTES = 363 << 20  # measured 341-363 MiB across scale runs, 398 MiB once in CI: it varies by ~10%


def host_peak_terms(weights: str, on_cpu: bool, host_weights: int, activations: int, device_peak: int,
                    device_work: int, host_grams: int) -> dict[str, int]:
    """The host's peak as named terms. The calibration activations always stay on the host (the
    stream brings one batch to the device). The weights: with the model in memory, the loaded
    model and the run's working copy (`host_weights`); on disk, what is read at once. On the CPU
    the device is the host: with the weights on disk its whole working set (which holds the layer
    read) adds, with the model in memory its working set besides the weights (those are the
    model's own). On a GPU the host also keeps one layer's Grams while they are solved
    (`host_grams`, structprune's default there)."""
    terms = {"activations": activations}
    if on_cpu and weights == "disk":
        terms["device_working_set"] = device_peak
    else:
        terms["weights"] = host_weights
        if on_cpu:
            terms["device_working_set"] = device_work
        elif host_grams:
            terms["grams"] = host_grams
    return terms


def _dtype_bytes(dtype: str) -> int:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def global_taylor_terms(config, n_params: int, batch: int, seqlen: int, dtype_bytes: int,
                        nsamples: int | None = None) -> dict[str, int]:
    """global-taylor's device peak as named terms (bytes). The peak is the log-softmax's backward
    of a batch after the first: the whole model, its gradients (model dtype, accumulated since
    the first batch), every layer's saved activations, the final norm's, and the loss's fp32
    tensors (`memory.loss_head_bytes`). With a single batch (nsamples <= batch) no gradient
    exists yet at that point; the gradients then peak later, as the activations are freed, and
    the larger of the two moments counts.

    Matches the eight H200 measurements (bf16, 32 x 2048, OPT 125m-13b, Llama-2 7b/13b,
    SmolLM2-135M) within 2% with no fitted constant (SmolLM2, the session's first run, also
    holds the CUDA libraries' 65 MiB of persistent cuBLAS / cuBLASLt workspaces)."""
    lay = config_layout(config)
    norm = adapter_for(config).spec.norm
    tokens = batch * seqlen
    terms = {
        "weights": n_params * dtype_bytes,
        "gradients": n_params * dtype_bytes,
        "saved_activations": config.num_hidden_layers * backprop_saved_bytes(lay, norm, batch, seqlen,
                                                                             dtype_bytes),
        "final_norm": tokens * norm_saved_bytes(lay.hidden, dtype_bytes, norm),
        "loss_head": loss_head_bytes(batch, seqlen, config.vocab_size, dtype_bytes),
    }
    if nsamples is not None and nsamples <= batch:  # one batch: no gradient at the loss's peak
        forward = terms["saved_activations"] + terms["final_norm"] + terms["loss_head"]
        terms["gradients"] = max(0, terms["gradients"] - forward)  # whichever moment is higher
    return terms


def global_taylor_bytes(config, n_params: int, batch: int, seqlen: int, dtype_bytes: int,
                        nsamples: int | None = None) -> int:
    """Whole model + its gradients + activations kept for backprop of one batch + the loss's fp32
    logits (`global_taylor_terms`, summed)."""
    return sum(global_taylor_terms(config, n_params, batch, seqlen, dtype_bytes, nsamples).values())


__all__ = ["Moment", "layerwise_moments", "LAYERWISE_METHODS", "WEIGHTS_ONLY_METHODS", "config_layout", "estimate_memory", "global_taylor_bytes",
           "global_taylor_terms", "model_params"]
