"""Peak device memory predicted from a config, without weights (METHOD.md "Memory").

`estimate_memory` replays, phase by phase, the items the streaming pipeline holds on its device
(`memory.py` byte formulas; the same `hold` calls in streaming.py / pipeline.py), so on the CPU it
equals the accounted peak exactly (tests/test_memory.py). Global methods hold the whole model, its
gradients and the activations saved for backpropagation: O(N) instead of one layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapters import LayerLayout, adapter_for
from .memory import (DTYPE_BYTES, activation_bytes, backprop_saved_bytes, column_rule_bytes, embed_workspace_bytes,
                     forward_workspace_bytes, gram_bytes, gram_check_bytes, layer_weight_bytes, logits_bytes,
                     loss_head_bytes, norm_saved_bytes, refine_bytes, saliency_bytes, solver_bytes)

_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
LAYERWISE_METHODS = ("structprune", "wanda-sp", "flap", "owl")
WEIGHTS_ONLY_METHODS = ("magnitude",)  # prune the host copy from its weights: the device holds nothing


def config_layout(config) -> LayerLayout:
    """The dense layer layout a config describes (every layer alike before pruning)."""
    adapter_for(config)  # unsupported architectures fail here
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if config.model_type == "opt":
        return LayerLayout(hidden, heads, heads, hidden // heads, config.ffn_dim, False,
                           bool(getattr(config, "enable_bias", True)), bool(getattr(config, "enable_bias", True)))
    return LayerLayout(hidden, heads, kv, head_dim, config.intermediate_size, True,
                       bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False)))


def _opt_extras(config) -> tuple[int, int]:
    """OPT: (final layer norm params, one projection's params) around the layers."""
    h, wep = config.hidden_size, config.word_embed_proj_dim
    final = 2 * h if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False) else 0
    return final, (h * wep if wep != h else 0)


def _embedding_params(config) -> int:
    """Parameters of the model's base outside the layers (what `LayerStream.embed` moves)."""
    h = config.hidden_size
    if config.model_type == "opt":
        final, proj = _opt_extras(config)
        return (config.vocab_size * config.word_embed_proj_dim + (config.max_position_embeddings + 2) * h
                + final + 2 * proj)
    return config.vocab_size * h + h


def _head_params(config) -> int:
    """Final modules + LM head (what `LayerStream.logits_nll` moves)."""
    h = config.hidden_size
    if config.model_type == "opt":
        final, proj = _opt_extras(config)
        return final + proj + config.vocab_size * config.word_embed_proj_dim
    return h + config.vocab_size * h


def model_params(config) -> int:
    """All parameters (tied embeddings counted once), from the config alone."""
    lay = config_layout(config)
    per_layer = layer_weight_bytes(lay, 1)
    head = 0 if getattr(config, "tie_word_embeddings", True) else config.vocab_size * config.hidden_size
    return _embedding_params(config) + config.num_hidden_layers * per_layer + head


def estimate_memory(config, method: str = "structprune", nsamples: int = 64, seqlen: int = 512,
                    dtype: str = "float32", batch_size: int = 1, sensitivity: bool = True,
                    target: str = "local", relative: bool | None = None, host_grams: bool = False,
                    refine: bool = False) -> dict:
    """Predicted peak device bytes, per phase, for one pruning run.

    Layer-wise methods: the maximum over embedding (the base's weights, the embeddings and the
    final norm's transients), pass 1 (both Grams, the previous layer's Grams, the layer, one batch
    and its forward workspace or the Gram read's torch.isfinite transients; the solver when
    sensitivities are measured), the head (logits), and pass 2 (one Gram, the solver or the
    column-score rule). Host memory for the activations (nsamples x seqlen x d, twice) is
    reported separately: it never sits on the device. global-taylor: `global_taylor_terms`
    (returned under "terms"). `relative`: whether the Gram hooks are token-weighted (default: for
    structprune, as its default config). `host_grams`: the pipeline keeps structprune's Grams in
    host memory between accumulation and solve (its default on CUDA; `LayerStream.host_grams`):
    no solve then sits next to a Gram, and no Gram is checked or kept on the device. `refine`: the
    block refit after each pruned layer (structprune's refine_epochs > 0), with a dense copy of the
    layer through pass 2.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")
    db = _DTYPES[dtype]
    lay = config_layout(config)
    B, S = batch_size, seqlen
    act = activation_bytes(B, S, lay.hidden, db)
    if relative is None:
        relative = method == "structprune"
    work = forward_workspace_bytes(lay, B, S, db, relative=relative and method == "structprune")
    layer = layer_weight_bytes(lay, db)
    g_attn, g_mlp = gram_bytes(lay.n_heads * lay.head_dim), gram_bytes(lay.intermediate)
    solve_attn = solver_bytes(lay.hidden, lay.n_heads * lay.head_dim, lay.head_dim)
    solve_mlp = solver_bytes(lay.hidden, lay.intermediate)
    n_params = model_params(config)
    phases: dict[str, int] = {}
    if method in LAYERWISE_METHODS:
        family = adapter_for(config).spec.family
        phases["embed"] = _embedding_params(config) * db + embed_workspace_bytes(family, B, S, lay.hidden,
                                                                               lay.head_dim, db)
        run = act + work
        solver = method == "structprune"  # the methods whose scores and rules run OBS solves
        grams = g_attn + g_mlp
        # pass 1 reads a layer's Grams (torch.isfinite's transients) while the previous layer's are
        # still referenced (pipeline.collect_stats)
        prev = grams if config.num_hidden_layers > 1 else 0
        check_attn, check_mlp = gram_check_bytes(lay.n_heads * lay.head_dim), gram_check_bytes(lay.intermediate)
        host = host_grams and solver  # Grams leave the device once accumulated (pipeline.py)
        held = 0 if host else grams  # what stays on the device next to the solves
        pass1 = layer + grams + (run if host else prev + max(run, check_attn, check_mlp))
        if solver:
            sal = max(saliency_bytes(lay.hidden, lay.n_heads * lay.head_dim, lay.head_dim),
                      saliency_bytes(lay.hidden, lay.intermediate))
            pass1 = max(pass1, layer + held + sal)
        if sensitivity and solver:
            pass1 = max(pass1, layer + held + max(solve_attn, solve_mlp))
        phases["pass1"] = pass1
        if sensitivity and solver:  # only the sensitivity streams run the LM head during pruning
            phases["head"] = (_head_params(config) * db + act + logits_bytes(B, S, config.vocab_size)
                              + held)  # the last layer's Grams, still referenced (on the device)
        refine = refine and solver
        extra = layer if target == "dense" or refine else 0  # the dense copy of the layer
        if solver:
            rules = (solve_attn, solve_mlp)
        else:
            rules = (column_rule_bytes(lay.hidden, lay.n_heads * lay.head_dim, db),
                     column_rule_bytes(lay.hidden, lay.intermediate, db))
        checks = (check_attn, check_mlp) if target != "dense" else (0, 0)
        if host and target == "local":  # the Gram goes to the host before the solve
            p2 = [layer + extra + max(g + run, r) for g, r in zip((g_attn, g_mlp), rules)]
        else:
            p2 = [layer + extra + g + max(run, c, r) for g, c, r in zip((g_attn, g_mlp), checks, rules)]
        if refine:
            p2.append(2 * layer + refine_bytes(lay, family, B, S, db))
        phases["pass2"] = max(p2)
        peak = max(phases.values())
    elif method in WEIGHTS_ONLY_METHODS:
        phases["weights-only"] = 0
        peak = 0
    elif method == "global-taylor":
        terms = global_taylor_terms(config, n_params, B, S, db, nsamples)
        phases["global"] = sum(terms.values())
        peak = phases["global"]
    else:
        raise ValueError(f"unknown method {method!r}")
    return {
        "method": method, "peak_bytes": int(peak), "phases": {k: int(v) for k, v in phases.items()},
        "model_params": n_params, "model_weight_bytes": n_params * db,
        "layer_weight_bytes": layer, "n_layers": config.num_hidden_layers,
        "host_activation_bytes": 2 * nsamples * S * lay.hidden * db,
        "nsamples": nsamples, "seqlen": seqlen, "dtype": dtype, "batch_size": batch_size,
        **({"terms": {k: int(v) for k, v in terms.items()}} if method == "global-taylor" else {}),
    }


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
    family = "opt" if config.model_type == "opt" else "llama"
    tokens = batch * seqlen
    terms = {
        "weights": n_params * dtype_bytes,
        "gradients": n_params * dtype_bytes,
        "saved_activations": config.num_hidden_layers * backprop_saved_bytes(lay, family, batch, seqlen,
                                                                             dtype_bytes),
        "final_norm": tokens * norm_saved_bytes(lay.hidden, dtype_bytes, family),
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


def load_config(name_or_path: str):
    """A config from a built-in / tiny name, a preset, a model folder, or a config.json file."""
    from transformers import AutoConfig

    from .models import BUILTIN_MODELS, TINY_MODELS, converted_dir, tiny_config
    from .presets import PRESETS, preset_config

    if name_or_path in TINY_MODELS:
        return tiny_config(name_or_path)
    if name_or_path in PRESETS:
        return preset_config(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        return AutoConfig.from_pretrained(converted_dir(name_or_path))
    path = Path(name_or_path)
    if path.is_file():
        return config_from_json(path.read_text())
    return AutoConfig.from_pretrained(path)


def config_from_json(text: str):
    """A config from pasted config.json text."""
    from transformers import AutoConfig

    d = json.loads(text)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    return AutoConfig.for_model(model_type, **d)


__all__ = ["estimate_memory", "model_params", "config_layout", "load_config", "config_from_json", "DTYPE_BYTES"]
