"""Every check a run's settings allow before any weights load (docs/PROTOCOL.md "Refusals").

`PruneConfig` checks each setting and the rules between settings; this module checks them against
what they name: the model (its config.json, read without weights, says its context length and its
layers, so whether the target sparsity is reachable under --s-max and the units every module keeps),
the corpora (installed, readable, a text column), the device. `run_prune` calls it first, so a run
that cannot finish is refused in well under a second instead of after its dense evaluation.
Messages name the CLI flags, like the rest of the library's refusals.
"""

from __future__ import annotations

import math

from .allocation import ModuleSpec, max_reachable_sparsity
from .config import MAX_SPARSITY, PruneConfig, default_for
from .data.corpora import check_corpus
from .engine import check_sensitivity_windows
from .errors import InvalidConfigError, SequenceLengthError
from .evaluation import resolve_device
from .methods import get_method
from .models import TINY_MODELS, model_config


def preflight(cfg: PruneConfig, model: bool = True) -> None:
    """Raises the first StructPruneError that a run of `cfg` would meet before its first result.
    model=False skips reading the model's config (the caller holds the loaded model)."""
    cfg.validate()
    resolve_device(cfg.device)
    check_sensitivity_windows(get_method(cfg.method)(cfg), cfg.nsamples)
    config = model_config(cfg.model) if model else None  # None where only loading tells: checked after it
    if config is not None:
        check_context(config, cfg.seqlen)
        check_reachable(cfg, specs_of_config(config))
    check_corpora(cfg)


def specs_of_config(config) -> list[ModuleSpec]:
    """The allocation units of a dense model from its config (every layer alike)."""
    from .adapters import config_layout
    from .units import module_specs

    return module_specs([config_layout(config)] * config.num_hidden_layers)


def check_context(config, seqlen: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise SequenceLengthError(f"--seqlen {seqlen} exceeds the model's context of {limit} tokens; "
                                  f"use --seqlen {limit} or less")


def check_reachable(cfg: PruneConfig, specs: list[ModuleSpec]) -> None:
    """Refuses a target no allocation can reach: each module keeps at least one KV group of heads
    (GQA; one head with MHA) and one MLP channel, and loses at most --s-max of its units."""
    most = max_reachable_sparsity(specs, cfg.s_max)
    if cfg.sparsity <= most + 1e-12:
        return
    hint = f"lower --sparsity to {math.floor(most * 100) / 100:g} or less"
    if cfg.s_max < MAX_SPARSITY and cfg.sparsity <= max_reachable_sparsity(specs, MAX_SPARSITY):
        hint += f", or raise --s-max (up to {MAX_SPARSITY:g})"
    raise InvalidConfigError(
        f"--sparsity {cfg.sparsity:g} cannot be reached on {cfg.model}: with --s-max {cfg.s_max:g} and one KV "
        f"group of heads and one MLP channel kept in every layer, at most {math.floor(most * 1e4) / 1e4:g} of "
        f"the prunable parameters can be removed; {hint}")


def check_corpora(cfg: PruneConfig) -> None:
    """Tiny demo models have no tokenizer and run on random tokens: a corpus named for one would be
    ignored, so it is refused; other models' corpora must be installed and readable."""
    if cfg.model in TINY_MODELS:
        named = [flag for flag, name in (("--calib-data", "calib_data"), ("--eval-data", "eval_data"))
                 if getattr(cfg, name) not in (default_for(name), ())]  # () names none (compare.py)
        if named:
            raise InvalidConfigError(
                f"{' and '.join(named)} cannot apply to {cfg.model}: it has no tokenizer, so it calibrates and "
                "is evaluated on random tokens; drop the option or use a model with a tokenizer")
        return
    check_corpus(cfg.calib_data, "--calib-data")
    for name in cfg.eval_data:
        check_corpus(name, "--eval-data")


__all__ = ["preflight", "specs_of_config", "check_context", "check_reachable", "check_corpora"]
