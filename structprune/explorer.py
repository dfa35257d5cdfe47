"""The allocation explorer's library side: pass-1 energies computed once, allocations redrawn
from them in milliseconds.

An `EnergyProfile` keeps what pass 1 learns about a dense model on a calibration set (docs/METHOD.md
"Allocation across layers"): every unit's saliency, each module's output energy, each layer's
residual-stream energy and OWL outlier ratio, and, when measured, each module's calibration-loss
sensitivity at the target sparsity. Everything the four allocation schemes need is in it, so a
temperature slider only re-solves the softmax water-filling (about 1 ms for 60 modules) and never
touches the model. Profiles are JSON (the run store caches them) and are built either by
`compute_energy_profile` (pass 1 alone) or from the statistics a prune run leaves in its
`stats_cache` (`profile_from_stats`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from .allocation import (ModuleSpec, allocate_owl, allocate_softmax, allocate_threshold, allocate_uniform,
                         allocation_entropy, softmax_sparsities, softmax_sweep)
from .cancel import cancel_scope
from .cancel import check as check_cancel
from .config import MAX_SPARSITY, PruneConfig
from .data.calibration import calibration_ids
from .energies import module_energies, unit_costs
from .engine import PruneEngine, pass1_key
from .evaluation import check_seqlen, resolve_device
from .methods import get_method
from .pipeline import LayerStats, ProgressEvent

SCHEMA = "structprune.energy-profile/1"
SCHEMES = ("uniform", "threshold", "owl", "softmax")


def _short(x: float) -> float:
    return float(f"{x:.6g}")


@dataclass
class EnergyProfile:
    """Pass-1 statistics of one dense model on one calibration set (JSON-ready)."""

    model: str
    calibration: dict  # calib_data, nsamples, seqlen, seed
    sparsity: float  # target at which sensitivities were measured (and energies default to)
    specs: list[dict]  # ModuleSpec fields per module, attn then mlp per layer
    scores: list[list[float]]  # per module: (n_units,) unit saliency (lower = pruned first)
    out_energy: list[float]  # per module: tr(W~ G W~^T)
    residual_energy: list[float]  # per layer: mean ||h||^2 per token
    outlier_ratio: list[float]  # per layer: OWL's D_l
    sensitivity: list[float] | None  # per module: calib-loss increase (nats/token), or None
    saliency: str = "obs"
    seconds: float = 0.0  # wall time of the pass that produced it
    schema: str = SCHEMA
    # per layer: harmonic mean of ||h_t||^2 (the `relative` energy); None in profiles stored before it
    residual_energy_hm: list[float] | None = None

    def __post_init__(self) -> None:
        self._memo: dict = {}  # (what, kind, s) -> energies / unit costs; not a field, not in JSON

    # --- views --------------------------------------------------------------------------
    def module_specs(self) -> list[ModuleSpec]:
        return [ModuleSpec(**s) for s in self.specs]

    @property
    def n_layers(self) -> int:
        return len(self.residual_energy)

    @property
    def energy_kinds(self) -> list[str]:
        # the default energy first (the explorer's radio starts there)
        return ((["relative"] if self.residual_energy_hm is not None else []) + ["residual"]
                + (["sensitivity"] if self.sensitivity is not None else []) + ["module"])

    def layer_stats(self) -> list[LayerStats]:
        """The pass-1 statistics as `pipeline.LayerStats` (layouts omitted), for energies.py."""
        hm = self.residual_energy_hm or [0.0] * self.n_layers
        stats = [LayerStats(None, {}, {}, self.residual_energy[i], outlier_ratio=self.outlier_ratio[i],
                            residual_energy_hm=hm[i])
                 for i in range(self.n_layers)]
        for m, sp in enumerate(self.specs):
            st = stats[sp["layer"]]
            st.scores[sp["kind"]] = torch.tensor(self.scores[m], dtype=torch.float64)
            st.out_energy[sp["kind"]] = self.out_energy[m]
            if self.sensitivity is not None:
                st.sensitivity[sp["kind"]] = self.sensitivity[m]
        return stats

    def energies(self, kind: str, s: float | None = None) -> np.ndarray:
        """(M,) module energies of `kind` at target s (default: the profile's)."""
        self._check_kind(kind)
        s = self.sparsity if s is None else s
        key = ("energies", kind, s)
        if key not in self._memo:
            self._memo[key] = module_energies(self.layer_stats(), self.module_specs(), kind, s)
        return self._memo[key]

    def unit_costs(self, kind: str, s: float | None = None) -> list[np.ndarray]:
        self._check_kind(kind)
        s = self.sparsity if s is None else s
        key = ("costs", kind, s)
        if key not in self._memo:
            self._memo[key] = unit_costs(self.layer_stats(), self.module_specs(), kind, s)
        return self._memo[key]

    def _check_kind(self, kind: str) -> None:
        if kind not in self.energy_kinds:
            raise ValueError(f"this profile has no {kind!r} energies; it has {', '.join(self.energy_kinds)}")

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnergyProfile:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not an energy profile ({d.get('schema')!r})")
        return cls(**d)


def profile_key(model: str, cfg: PruneConfig, sensitivity: bool = True) -> str:
    """Cache key of a profile: the model, everything pass 1 depends on, and whether module
    sensitivities were measured (a profile without them has residual / module energies only)."""
    sens = f"sens {cfg.sensitivity_windows}" if sensitivity else "no sens"
    return (f"profile|{model}|{cfg.calib_data}|{cfg.nsamples}x{cfg.seqlen}|seed {cfg.seed}|s {cfg.sparsity:g}"
            f"|{sens}|{cfg.saliency}|bias {cfg.bias}|owl {cfg.owl_m:g}|relative {cfg.relative_error}|damp {cfg.damp:g}"
            f"|align {cfg.align_channels}")  # the profile's module steps and its sensitivity pass depend on it


def profile_from_stats(stats: list[LayerStats], specs: list[ModuleSpec], model: str, cfg: PruneConfig,
                       seconds: float = 0.0) -> EnergyProfile:
    """An EnergyProfile from pass-1 statistics (e.g. the entry a prune run put in its stats_cache)."""
    has_sens = all(sp.kind in stats[sp.layer].sensitivity for sp in specs)
    return EnergyProfile(
        model=model,
        calibration={"calib_data": cfg.calib_data, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed},
        sparsity=cfg.sparsity,
        specs=[{"layer": sp.layer, "kind": sp.kind, "n_units": sp.n_units, "unit_params": sp.unit_params,
                "step": sp.step, "min_keep": sp.min_keep} for sp in specs],
        scores=[[_short(v) for v in stats[sp.layer].scores[sp.kind].tolist()] for sp in specs],
        out_energy=[float(stats[sp.layer].out_energy[sp.kind]) for sp in specs],
        residual_energy=[float(st.residual_energy) for st in stats],
        residual_energy_hm=[float(st.residual_energy_hm) for st in stats],
        outlier_ratio=[float(st.outlier_ratio) for st in stats],
        sensitivity=[float(stats[sp.layer].sensitivity[sp.kind]) for sp in specs] if has_sens else None,
        saliency=cfg.saliency,
        seconds=seconds,
    )


@torch.no_grad()
def compute_energy_profile(cfg: PruneConfig, loaded, on_event=None, cancel=None,
                           stats_cache: dict | None = None) -> EnergyProfile:
    """Pass 1 alone (`PruneEngine.pass1`, with the module sensitivities that run_prune measures
    for softmax/threshold allocation), on a copy of `loaded.model`. With `stats_cache` (the dict
    run_prune accepts), the statistics are shared both ways with prune runs. Stages as
    planning.profile_stages; `cancel` is checked inside every loop (cancel.py)."""
    t0 = time.perf_counter()
    cfg = PruneConfig.from_dict({**cfg.to_dict(), "method": "structprune"})
    device = resolve_device(cfg.device)
    method = get_method("structprune")(cfg)
    if on_event is not None:
        on_event(ProgressEvent("prepare", -1, loaded.model.config.num_hidden_layers, 0.0, 0, 0, "copying the model"))
    with cancel_scope(cancel):
        model = copy.deepcopy(loaded.model).float().eval()  # the sensitivity pass edits weights transiently
        check_cancel()
        check_seqlen(model, cfg.seqlen)
        calib_ids = calibration_ids(cfg, loaded.tokenizer, model.config.vocab_size)
    engine = PruneEngine(model, device, method, batch_size=cfg.batch_size, on_event=on_event, cancel=cancel, t0=t0)
    # always with sensitivities, so every energy can be shown
    p1 = engine.pass1(calib_ids, sensitivity=True, cache=stats_cache, cache_key=pass1_key(method, id(loaded.model), True))
    engine.emit("done", -1)
    return profile_from_stats(p1.stats, engine.specs, loaded.name, cfg, seconds=time.perf_counter() - t0)


# --- frames for the explorer's plots (pure numpy/pandas, milliseconds) -------------------------

def _softmax_allocation(specs, energies, s: float, temperature: float, s_max: float):
    """What a run allocates: T = inf is the uniform allocation (as StructPruneMethod.allocate)."""
    if math.isinf(temperature):
        return allocate_uniform(specs, s, s_max=s_max)
    return allocate_softmax(specs, energies, s, temperature, s_max=s_max)


def _module_frame(profile: EnergyProfile) -> pd.DataFrame:
    return pd.DataFrame({"layer": [s["layer"] for s in profile.specs], "module": [s["kind"] for s in profile.specs],
                         "params": [s["n_units"] * s["unit_params"] for s in profile.specs]})


def softmax_frame(profile: EnergyProfile, s: float, temperature: float, energy: str,
                  s_max: float = MAX_SPARSITY) -> pd.DataFrame:
    """One row per module: energy, z-scored log energy, and the softmax allocation at T, both the
    continuous s_m and the whole-unit one a run would use (`sparsity`)."""
    specs, e = profile.module_specs(), profile.energies(energy, s)
    cont = softmax_sparsities(specs, e, s, temperature, s_max=s_max)
    rounded = _softmax_allocation(specs, e, s, temperature, s_max).sparsities
    df = _module_frame(profile)
    le = np.log(e)
    df["energy"] = e
    df["energy_z"] = (le - le.mean()) / (le.std() or 1.0)
    df["continuous"] = cont
    df["sparsity"] = rounded
    df["temperature"] = temperature
    return df


def scheme_frame(profile: EnergyProfile, s: float, temperature: float, energy: str,
                 owl_lambda: float = 0.08, s_max: float = MAX_SPARSITY) -> pd.DataFrame:
    """Long frame (layer, module, scheme, sparsity): uniform, threshold, OWL and softmax(T)
    allocations of the same budget, rounded to whole units as a run would prune."""
    specs = profile.module_specs()
    allocs = {
        "uniform": allocate_uniform(specs, s, s_max=s_max),
        "threshold": allocate_threshold(specs, profile.unit_costs(energy, s), s, s_max=s_max),
        "owl": allocate_owl(specs, np.array(profile.outlier_ratio), s, lam=owl_lambda, s_max=s_max),
        "softmax": _softmax_allocation(specs, profile.energies(energy, s), s, temperature, s_max),
    }
    base = _module_frame(profile)
    frames = []
    for name, a in allocs.items():
        df = base.copy()
        df["scheme"] = f"softmax (T={temperature:g})" if name == "softmax" else name
        df["sparsity"] = a.sparsities
        df["entropy"] = allocation_entropy(a)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def temperature_grid(profile: EnergyProfile, s: float, temperatures, energy: str,
                     s_max: float = MAX_SPARSITY) -> pd.DataFrame:
    """Long frame (temperature, layer, module, sparsity) of the continuous softmax allocation over a
    grid of temperatures (one vectorized water-filling), for the layers x T heatmap."""
    temps = np.asarray(temperatures, dtype=float)
    grid = softmax_sweep(profile.module_specs(), profile.energies(energy, s), s, temps, s_max=s_max)  # (K, M)
    base = _module_frame(profile)
    K, M = grid.shape
    return pd.DataFrame({"temperature": np.repeat(temps, M), "layer": np.tile(base["layer"], K),
                         "module": np.tile(base["module"], K), "params": np.tile(base["params"], K),
                         "sparsity": grid.reshape(-1)})


def entropy_frame(profile: EnergyProfile, s: float, temperatures, energy: str, s_max: float = MAX_SPARSITY) -> pd.DataFrame:
    """Entropy (nats) of where the pruned parameters sit, per temperature; its maximum (uniform
    sparsity) is in the column `uniform`."""
    specs = profile.module_specs()
    temps = np.asarray(temperatures, dtype=float)
    grid = softmax_sweep(specs, profile.energies(energy, s), s, temps, s_max=s_max)
    h = [allocation_entropy(row, specs) for row in grid]
    h_uniform = allocation_entropy(softmax_sweep(specs, profile.energies(energy, s), s, [np.inf], s_max=s_max)[0],
                                   specs)
    return pd.DataFrame({"temperature": temps, "entropy": h, "uniform": h_uniform})


def temperature_ladder(lo: float = 0.05, hi: float = 20.0, n: int = 41) -> np.ndarray:
    """Log-spaced temperatures for sliders and sweeps."""
    return np.round(np.geomspace(lo, hi, n), 4)


__all__ = ["EnergyProfile", "compute_energy_profile", "profile_from_stats", "profile_key", "softmax_frame",
           "scheme_frame", "temperature_grid", "entropy_frame", "temperature_ladder", "SCHEMES"]
