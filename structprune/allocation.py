"""Allocation across layers: how many heads and channels each module loses.

An allocation unit is a *module*: the attention or the MLP of one decoder layer. The budget is in
parameters, B = s * sum_m N_m (N_m = prunable parameters of module m), because a head and a
channel cost different amounts. Four schemes turn per-module (or per-unit) scores into a
continuous sparsity s_m; one shared rounding turns it into whole steps of units:

- ``uniform``: s_m = s everywhere (water-filled where a module's cap is below s).
- ``threshold``: global structured pruning's exact rule, one cost threshold tau over all units.
- ``softmax``: the energy-based rule B_m proportional to N_m exp(-E_m / T), clipped, water-filled.
- ``owl``: OWL's layer outlier ratios mapped linearly into [s - lambda, s + lambda].

Bounds, in whole units. A module m may lose k_m units with k_m a multiple of its ``step``,
``lo_m <= k_m <= hi_m``, where hi_m = the largest multiple of ``step`` that is at most both
``n_units - min_keep`` and ``floor(s_max * n_units)``, and lo_m = the smallest multiple of ``step``
that is at least ``s_min * n_units`` (capped at hi_m: s_max and min_keep win over s_min). The
continuous schemes clip s_m to [lo_m / n_units, hi_m / n_units], so the rounding can always reach
the budget.

Rounding guarantee (every scheme, tested): |params_pruned - B| <= max_m(step_m * unit_params_m) / 2,
i.e. half the largest chunk that can be removed at once. When the continuous allocation meets the
budget and s_min = 0, every module also stays within one step of its continuous unit count. A
budget the bounds cannot hold (B above sum_m hi_m * unit_params_m, or below the lower bounds)
raises ``InvalidConfigError`` (a ``ValueError``) rather than silently missing it.

Pure numpy; no torch. Arrays: M = number of modules, L = number of layers, K = number of
temperatures.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np

from structprune.errors import InvalidConfigError

log = logging.getLogger(__name__)

S_RANGE: tuple[float, float] = (0.0, 0.9)  # allowed target sparsity s (fraction of prunable params)
DEFAULT_S_MAX = 0.9  # per-module cap on the fraction of a module's units removed
DEFAULT_OWL_LAMBDA = 0.08  # OWL's half-width of the sparsity band [s - lambda, s + lambda]
_FLOOR_EPS = 1e-9  # slack when flooring unit counts, so 2.9999999999 units floors to 3
_MIN_TEMPERATURE = 1e-8  # smaller temperatures act as this one (see _log_weights)
_SWEEP_CHUNK = 4_000_000  # max elements of the (K, 2M+1, M) breakpoint tensor per block


@dataclass(frozen=True)
class ModuleSpec:
    """One allocation unit: the attention or the MLP of one decoder layer."""

    layer: int = field(metadata={"help": "Decoder layer index (0-based)."})
    kind: Literal["attn", "mlp"] = field(
        metadata={"help": "attn (units: query heads) or mlp (units: intermediate channels)."}
    )
    n_units: int = field(metadata={"help": "Query heads (attn) or intermediate channels (mlp)."})
    unit_params: int = field(
        metadata={
            "help": "Parameters removed with one unit: head = q rows + o cols (+ biases); channel = 3d or 2d+1."
        }
    )
    step: int = field(
        default=1,
        metadata={"help": "Units removed together: n_kv_heads for GQA attention (one per KV group); the channel "
                "alignment (align_channels) for mlp, so that it keeps a multiple of it."},
    )
    min_keep: int = field(
        default=0,
        metadata={"help": "Units that must stay: n_kv_heads for attention unless it may be removed whole."},
    )

    def __post_init__(self) -> None:
        for name in ("layer", "n_units", "unit_params", "step", "min_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise InvalidConfigError(f"ModuleSpec.{name} must be an integer, got {value!r}.")
            object.__setattr__(self, name, int(value))
        if self.kind not in ("attn", "mlp"):
            raise InvalidConfigError(f"ModuleSpec.kind must be 'attn' or 'mlp', got {self.kind!r}.")
        if self.layer < 0 or self.n_units < 1 or self.unit_params < 1 or self.step < 1:
            raise InvalidConfigError(
                f"ModuleSpec {self.name}: need layer >= 0, n_units >= 1, unit_params >= 1 and step >= 1 "
                f"(got layer={self.layer}, n_units={self.n_units}, unit_params={self.unit_params}, "
                f"step={self.step})."
            )
        if self.n_units % self.step:
            raise InvalidConfigError(
                f"ModuleSpec {self.name}: n_units={self.n_units} is not a multiple of step={self.step} "
                "(query heads must split evenly over the KV groups)."
            )
        if not 0 <= self.min_keep <= self.n_units:
            raise InvalidConfigError(
                f"ModuleSpec {self.name}: min_keep={self.min_keep} must lie in [0, n_units={self.n_units}]."
            )

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def params(self) -> int:
        """Prunable parameters of the module, N_m."""
        return self.n_units * self.unit_params


class _Arrays(NamedTuple):
    """The specs as int64 arrays, each (M,)."""

    n: np.ndarray  # units
    p: np.ndarray  # params per unit
    q: np.ndarray  # step
    keep: np.ndarray  # min_keep
    layer: np.ndarray

    @property
    def params(self) -> np.ndarray:  # N_m
        return self.n * self.p


def _spec_arrays(specs: Sequence[ModuleSpec]) -> tuple[tuple[ModuleSpec, ...], _Arrays]:
    specs = tuple(specs)
    if not specs:
        raise InvalidConfigError("specs is empty: there is nothing to allocate over.")
    if not all(isinstance(sp, ModuleSpec) for sp in specs):
        raise InvalidConfigError("specs must be ModuleSpec instances.")
    names = [sp.name for sp in specs]
    if len(set(names)) != len(names):
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        raise InvalidConfigError(f"specs name a module twice: {twice}.")
    cols = [(sp.n_units, sp.unit_params, sp.step, sp.min_keep, sp.layer) for sp in specs]
    cols = np.array(cols, dtype=np.int64)
    return specs, _Arrays(*cols.T)


def _check_fraction(name: str, value: float, low: float, high: float) -> float:
    if not isinstance(value, Real) or not (low <= float(value) <= high):  # also rejects NaN
        raise InvalidConfigError(f"{name}={value!r} is outside the allowed range [{low:g}, {high:g}].")
    return float(value)


def _unit_bounds(a: _Arrays, s_min: float, s_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) in units, each (M,) int64 and a multiple of the module's step (see module doc)."""
    cap = np.minimum(a.n - a.keep, np.floor(s_max * a.n + _FLOOR_EPS).astype(np.int64))
    hi = a.q * (cap // a.q)
    lo = a.q * np.ceil(s_min * a.n / a.q - _FLOOR_EPS).astype(np.int64)
    return np.minimum(lo, hi), hi


def max_reachable_sparsity(specs: Sequence[ModuleSpec], s_max: float = DEFAULT_S_MAX) -> float:
    """The largest target sparsity any scheme can reach under s_max, min_keep and step: every
    module at its upper bound hi_m (see the module doc). Known from the specs alone, so a target
    above it is refused before any model is loaded."""
    _, a = _spec_arrays(specs)
    _, hi = _unit_bounds(a, 0.0, _check_fraction("s_max", s_max, 0.0, 1.0))
    return float(hi @ a.p) / float(a.params.sum())


def _check_budget(a: _Arrays, lo: np.ndarray, hi: np.ndarray, budget: float, s: float) -> None:
    most, least = float(hi @ a.p), float(lo @ a.p)
    total = float(a.params.sum())
    if budget > most:
        raise InvalidConfigError(
            f"s={s:g} asks for {budget:.0f} pruned parameters but these modules can lose at most "
            f"{most:.0f} (sparsity {most / total:.4f}) under s_max, min_keep and step; "
            "lower s or raise s_max."
        )
    if budget < least:
        raise InvalidConfigError(
            f"s={s:g} asks for {budget:.0f} pruned parameters but s_min forces at least {least:.0f} "
            f"(sparsity {least / total:.4f}); lower s_min."
        )


@dataclass(frozen=True, eq=False)
class Allocation:
    """Units pruned per module, and how close the result came to the parameter budget."""

    specs: tuple[ModuleSpec, ...]
    pruned_units: np.ndarray  # (M,) int64, a multiple of each module's step, in [0, n_units - min_keep]
    scheme: str  # "uniform" | "threshold" | "softmax" | "owl"
    params_target: float  # the budget B = s * sum_m N_m
    continuous: np.ndarray  # (M,) float64, the pre-rounding sparsity s_m (threshold: the achieved one)

    def __post_init__(self) -> None:
        specs, a = _spec_arrays(self.specs)
        k = np.array(self.pruned_units)  # copies: the arrays are frozen below
        cont = np.array(self.continuous, dtype=np.float64)
        if k.shape != (len(specs),) or cont.shape != (len(specs),):
            raise InvalidConfigError(f"pruned_units and continuous must have shape ({len(specs)},).")
        if not np.issubdtype(k.dtype, np.integer):
            raise InvalidConfigError("pruned_units must be integers.")
        k = k.astype(np.int64)
        if np.any(k % a.q) or np.any(k < 0) or np.any(k > a.n - a.keep):
            raise InvalidConfigError("pruned_units must be multiples of step in [0, n_units - min_keep].")
        for arr in (k, cont):
            arr.setflags(write=False)
        object.__setattr__(self, "specs", specs)
        object.__setattr__(self, "pruned_units", k)
        object.__setattr__(self, "continuous", cont)

    @property
    def units_kept(self) -> np.ndarray:  # (M,)
        return np.array([sp.n_units for sp in self.specs], dtype=np.int64) - self.pruned_units

    @property
    def module_params_pruned(self) -> np.ndarray:  # (M,) parameters removed per module
        return self.pruned_units * np.array([sp.unit_params for sp in self.specs], dtype=np.int64)

    @property
    def params_pruned(self) -> int:
        """Achieved number of pruned parameters."""
        return int(self.module_params_pruned.sum())

    @property
    def params_total(self) -> int:
        return int(sum(sp.params for sp in self.specs))

    @property
    def sparsities(self) -> np.ndarray:
        """(M,) achieved per-module sparsity (units or, equivalently, parameters)."""
        return self.pruned_units / np.array([sp.n_units for sp in self.specs], dtype=np.float64)

    @property
    def target_sparsity(self) -> float:
        return self.params_target / self.params_total

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of prunable parameters removed."""
        return self.params_pruned / self.params_total

    @property
    def budget_error(self) -> float:
        """params_pruned - params_target (parameters; positive = pruned more than asked)."""
        return self.params_pruned - self.params_target

    @property
    def budget_tolerance(self) -> float:
        """The guaranteed bound on |budget_error|: half the largest step chunk, in parameters."""
        return max(sp.step * sp.unit_params for sp in self.specs) / 2

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per module, in spec order."""
        return [
            {
                "layer": sp.layer,
                "module": sp.kind,
                "units_total": sp.n_units,
                "units_kept": sp.n_units - int(k),
                "units_pruned": int(k),
                "params_total": sp.params,
                "params_pruned": int(k) * sp.unit_params,
                "sparsity": int(k) / sp.n_units,
            }
            for sp, k in zip(self.specs, self.pruned_units)
        ]


# ---------------------------------------------------------------------------------------------
# Water-filling: s_m = clip(g_m(t), lo_m, hi_m) with sum_m N_m s_m = B, g monotone in t.
# f(t) = sum_m N_m s_m(t) is continuous, non-decreasing and piecewise linear between the points
# where a module leaves its lower or reaches its upper bound; evaluate f at all of them, keep the
# last one with f <= B, and solve the linear piece there exactly (no iteration, no tolerance).
# This is the fixed point of "redistribute what clipping moved over the unclipped modules".
# ---------------------------------------------------------------------------------------------


def _fill_scaled(
    n_params: np.ndarray, logw: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float
) -> np.ndarray:
    """s = clip(lam * w, lo, hi) per row with n_params @ s = budget, solved in log space.

    n_params, lo, hi: (M,); logw: (K, M) log-weights (finite or very negative); returns (K, M).
    """
    K = logw.shape[0]
    with np.errstate(divide="ignore"):
        log_lo, log_hi = np.log(lo), np.log(hi)  # -inf where a bound is 0
    b_lo = log_lo - logw  # (K, M) log lam at which module m leaves lo
    b_hi = log_hi - logw  # (K, M) log lam at which module m reaches hi
    cand = np.concatenate([np.full((K, 1), -np.inf), b_lo, b_hi], axis=1)  # (K, 2M+1)
    # Module m at the breakpoint of module i: bound_i * w_m / w_i, with the log-weight difference
    # taken first so that large |logw| (small T) loses no precision.
    log_bound = np.concatenate([[-np.inf], log_lo, log_hi])  # (2M+1,)
    w_src = np.concatenate([np.zeros((K, 1)), logw, logw], axis=1)  # (K, 2M+1)
    with np.errstate(over="ignore"):
        s_at = np.exp(log_bound[None, :, None] + (logw[:, None, :] - w_src[:, :, None]))  # (K, 2M+1, M)
    f = np.clip(s_at, lo, hi) @ n_params  # (K, 2M+1)
    t = np.max(np.where(f <= budget, cand, -np.inf), axis=1, keepdims=True)  # (K, 1)
    at_hi = b_hi <= t
    free = (b_lo <= t) & ~at_hi
    fixed = np.where(at_hi, hi, lo)  # (K, M)
    rest = budget - np.where(free, 0.0, fixed) @ n_params  # (K,) budget left for the free modules
    has_free = free.any(axis=1, keepdims=True)
    top = np.where(has_free, np.max(np.where(free, logw, -np.inf), axis=1, keepdims=True), 0.0)
    e = np.where(free, np.exp(np.where(free, logw - top, 0.0)), 0.0)  # softmax numerators, max 1
    denom = np.where(has_free[:, 0], e @ n_params, 1.0)
    s = np.where(free, np.maximum(rest, 0.0)[:, None] * e / denom[:, None], fixed)
    return np.clip(s, lo, hi)


def _fill_shifted(
    n_params: np.ndarray, a: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float
) -> np.ndarray:
    """s = clip(a + mu, lo, hi) with n_params @ s = budget; all (M,)."""
    cand = np.concatenate([lo - a, hi - a])  # (2M,)
    f = np.clip(a[None, :] + cand[:, None], lo, hi) @ n_params  # (2M,)
    ok = f <= budget
    t = cand[ok].max() if ok.any() else cand.min()
    at_hi = hi - a <= t
    free = (lo - a <= t) & ~at_hi
    s = np.where(at_hi, hi, lo).astype(np.float64)
    if free.any():
        rest = budget - n_params[~free] @ s[~free]
        mu = (rest - n_params[free] @ a[free]) / n_params[free].sum()
        s[free] = a[free] + mu
    return np.clip(s, lo, hi)


def _round_to_steps(
    specs: Sequence[ModuleSpec],
    s_continuous: np.ndarray,
    budget: float,
    caps: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Whole steps of units per module from continuous sparsities, meeting the budget.

    Largest remainder by parameters: floor every module to a whole step, then, while the
    parameter deficit D > 0, add one step to the module with the largest leftover
    (x_m - k_m) * unit_params_m, but only if that brings the total closer to the budget
    (chunk < 2D); symmetric removal when D < 0. First every module moves only between the
    whole steps around its continuous count x_m; only if that cannot reach |D| <= max chunk / 2
    (the continuous allocation itself missed the budget) may modules move anywhere within
    ``caps = (lo, hi)`` (units, (M,) each). |D| falls with every move, so it ends with
    |D| <= max chunk / 2 whenever lo @ unit_params <= B <= hi @ unit_params. Returns (M,) int64.
    """
    _, a = _spec_arrays(specs)
    lo, hi = caps
    x = np.asarray(s_continuous, dtype=np.float64) * a.n  # (M,) continuous units
    down = np.clip(a.q * np.floor(x / a.q + _FLOOR_EPS).astype(np.int64), lo, hi)
    up = np.clip(a.q * np.ceil(x / a.q - _FLOOR_EPS).astype(np.int64), lo, hi)
    k = down.copy()
    chunk = (a.q * a.p).astype(np.float64)
    deficit = budget - float(k @ a.p)
    deficit = _greedy_steps(k, x, a, down, up, chunk, deficit)
    if abs(deficit) > chunk.max() / 2:  # the continuous allocation missed the budget
        deficit = _greedy_steps(k, x, a, lo, hi, chunk, deficit)
    return k


def _greedy_steps(k, x, a: _Arrays, k_min, k_max, chunk, deficit: float) -> float:
    """Move k (in place) by whole steps within [k_min, k_max] towards the budget; return D."""
    moved = True
    while moved and deficit != 0:
        moved = False
        sign = 1 if deficit > 0 else -1
        room = (k + a.q <= k_max) if sign > 0 else (k - a.q >= k_min)
        leftover = sign * (x - k) * a.p  # the largest leftover moves first
        for m in sorted(np.flatnonzero(room), key=lambda m: (-leftover[m], m)):
            if chunk[m] >= 2 * abs(deficit):
                continue
            k[m] += sign * a.q[m]
            deficit -= sign * chunk[m]
            moved = True
            if deficit * sign <= 0:
                break
    return deficit


class _Problem(NamedTuple):
    """A validated allocation problem: specs, their arrays, the budget and the unit bounds."""

    specs: tuple[ModuleSpec, ...]
    a: _Arrays
    budget: float  # B, parameters
    lo_units: np.ndarray  # (M,) int64
    hi_units: np.ndarray  # (M,) int64

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) as sparsities, each (M,) float64."""
        return self.lo_units / self.a.n, self.hi_units / self.a.n

    @property
    def n_params(self) -> np.ndarray:  # (M,) float64, N_m
        return self.a.params.astype(np.float64)


def _prepare(specs: Sequence[ModuleSpec], s: float, s_min: float, s_max: float) -> _Problem:
    specs, a = _spec_arrays(specs)
    s = _check_fraction("s", s, *S_RANGE)
    s_max = _check_fraction("s_max", s_max, 0.0, 1.0)
    s_min = _check_fraction("s_min", s_min, 0.0, s_max)
    lo, hi = _unit_bounds(a, s_min, s_max)
    budget = s * float(a.params.sum())
    _check_budget(a, lo, hi, budget, s)
    return _Problem(specs, a, budget, lo, hi)


def _finish(pb: _Problem, s_cont: np.ndarray, scheme: str) -> Allocation:
    k = _round_to_steps(pb.specs, s_cont, pb.budget, (pb.lo_units, pb.hi_units))
    alloc = Allocation(
        specs=pb.specs, pruned_units=k, scheme=scheme, params_target=pb.budget, continuous=s_cont
    )
    log.debug(
        "%s allocation: target %.0f params, achieved %d (error %+.0f, tolerance %.0f)",
        scheme, pb.budget, alloc.params_pruned, alloc.budget_error, alloc.budget_tolerance,
    )
    return alloc


# ---------------------------------------------------------------------------------------------
# Schemes
# ---------------------------------------------------------------------------------------------


def allocate_uniform(specs: Sequence[ModuleSpec], s: float, s_max: float = DEFAULT_S_MAX) -> Allocation:
    """s_m = s for every module; where a module's cap (s_max, min_keep, step) is below s, the
    overflow is spread evenly over the others (the T = infinity softmax)."""
    pb = _prepare(specs, s, 0.0, s_max)
    s_cont = _fill_scaled(pb.n_params, np.zeros((1, len(pb.specs))), *pb.bounds, pb.budget)[0]
    same = _identical_shapes(pb, s)
    if same is not None:  # every layer pruned alike: the model keeps one shape (plain-HF loadable)
        return Allocation(pb.specs, same, "uniform", pb.budget, s_cont)
    return _finish(pb, s_cont, "uniform")


def _identical_shapes(pb: _Problem, s: float) -> np.ndarray | None:
    """Equal unit counts for modules of equal shape, when that still meets the budget to one
    step per module. The class with the smallest chunk (MLP channels) absorbs the rounding of
    the others (whole heads per KV group)."""
    a = pb.a
    keys = [(sp.kind, sp.n_units, sp.unit_params, sp.step, sp.min_keep) for sp in pb.specs]
    classes: dict[tuple, list[int]] = {}
    for m, key in enumerate(keys):
        classes.setdefault(key, []).append(m)
    if len(classes) > 2 or min(len(idx) for idx in classes.values()) < 2:
        return None  # not a stack of repeated layers
    order = sorted(classes.values(), key=lambda idx: -(a.q[idx[0]] * a.p[idx[0]]))
    k = np.zeros(len(keys), dtype=np.int64)
    for n_class, idx in enumerate(order):
        m0 = idx[0]
        if n_class < len(order) - 1:
            x = s * a.n[m0]
        else:
            rest = pb.budget - float(k @ a.p)
            x = rest / (len(idx) * a.p[m0])
        kc = int(np.clip(a.q[m0] * np.round(x / a.q[m0]), pb.lo_units[m0], pb.hi_units[m0]))
        k[idx] = kc
    if abs(pb.budget - float(k @ a.p)) > float((a.q * a.p).max()) / 2:  # the common guarantee
        return None
    return k


def allocate_threshold(
    specs: Sequence[ModuleSpec], unit_costs: Sequence[np.ndarray], s: float, s_max: float = DEFAULT_S_MAX
) -> Allocation:
    """Global structured pruning's rule: prune every chunk whose cost is below one global tau.

    unit_costs[m]: (n_units_m,) cost of each unit of module m (lower = cheaper to prune; costs of
    different modules must be on one scale). A module loses ``step`` units at a time, the
    cheapest remaining ones; the cost of such a chunk is the MEAN of its units' costs, so a chunk
    of heads competes with single channels on the same per-unit scale (a sum would make chunks
    look ``step`` times dearer). Chunks beyond the module's cap are never eligible.

    All eligible chunks are sorted globally by (cost, module, chunk), and the shortest prefix
    whose parameter count is closest to B is pruned (the shorter one on a tie); tau lies between
    the last pruned and the first kept chunk's cost. Hence |params_pruned - B| <= max chunk / 2.
    """
    pb = _prepare(specs, s, 0.0, s_max)
    specs, a, budget, hi = pb.specs, pb.a, pb.budget, pb.hi_units
    if len(unit_costs) != len(specs):
        raise InvalidConfigError(f"unit_costs has {len(unit_costs)} entries for {len(specs)} modules.")
    costs, mods, idx = [], [], []
    for m, (sp, c) in enumerate(zip(specs, unit_costs)):
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (sp.n_units,) or not np.all(np.isfinite(c)):
            raise InvalidConfigError(
                f"unit_costs[{m}] ({sp.name}) must be {sp.n_units} finite numbers, got shape {c.shape}."
            )
        n_chunks = int(hi[m] // sp.step)
        cheapest = np.sort(c)[: n_chunks * sp.step].reshape(n_chunks, sp.step)  # (n_chunks, step)
        chunk_cost = cheapest.mean(axis=1)  # (n_chunks,)
        costs.append(chunk_cost)
        mods.append(np.full(n_chunks, m))
        idx.append(np.arange(n_chunks))
    cost, mod, chunk_idx = (np.concatenate(v) for v in (costs, mods, idx))
    order = np.lexsort((chunk_idx, mod, cost))  # by cost, then module, then chunk
    chunk_params = (a.q * a.p)[mod[order]]
    cum = np.concatenate([[0], np.cumsum(chunk_params)])  # params pruned by the first j chunks
    j = int(np.searchsorted(cum, budget, side="right")) - 1  # cum[j] <= B < cum[j + 1]
    if j + 1 < len(cum) and cum[j + 1] - budget < budget - cum[j]:
        j += 1
    k = np.bincount(mod[order[:j]], minlength=len(specs)).astype(np.int64) * a.q
    alloc = Allocation(
        specs=specs, pruned_units=k, scheme="threshold", params_target=budget, continuous=k / a.n
    )
    log.debug(
        "threshold allocation: %d of %d chunks pruned, error %+.0f params", j, len(order), alloc.budget_error
    )
    return alloc


def _standardized_log_energy(energies: np.ndarray, M: int) -> np.ndarray:
    """z-score of log(energies), (M,); all equal -> zeros."""
    e = np.asarray(energies, dtype=np.float64)
    if e.shape != (M,):
        raise InvalidConfigError(f"energies must have shape ({M},) (one per module), got {e.shape}.")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise InvalidConfigError(
            "energies must be finite and positive (they are mean unit costs; their log is taken)."
        )
    le = np.log(e)
    sd = le.std()
    if sd <= 1e-12 * max(1.0, abs(le.mean())):
        return np.zeros(M)
    return (le - le.mean()) / sd


def _log_weights(z: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """(K, M) log softmax weights -z / T, shifted to max 0; T = inf gives exactly 0."""
    t = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if t.size == 0 or np.any(np.isnan(t)) or np.any(t <= 0):
        raise InvalidConfigError(
            f"temperature must be > 0 (float('inf') = uniform), got {temperatures!r}."
        )
    # T below 1e-8 acts as 1e-8: already the T -> 0 limit for z-scores more than ~1e-6 apart
    # (weight ratio < e^-100), and it keeps |logw| < 1e11, where log-space breakpoints are still
    # resolved to ~1e-5. Shifted so that the largest log-weight is 0.
    t = np.maximum(t, _MIN_TEMPERATURE)
    return np.where(np.isinf(t)[:, None], 0.0, -(z - z.min())[None, :] / t[:, None])


def _softmax_continuous(pb: _Problem, energies: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """(K, M) water-filled softmax sparsities, in blocks of temperatures to bound memory."""
    z = _standardized_log_energy(energies, len(pb.specs))
    logw = _log_weights(z, temperatures)
    M = len(pb.specs)
    rows = max(1, _SWEEP_CHUNK // ((2 * M + 1) * M))
    blocks = [
        _fill_scaled(pb.n_params, logw[i : i + rows], *pb.bounds, pb.budget) for i in range(0, len(logw), rows)
    ]
    return np.concatenate(blocks)


def softmax_sparsities(
    specs: Sequence[ModuleSpec],
    energies: np.ndarray,
    s: float,
    temperature: float,
    s_min: float = 0.0,
    s_max: float = DEFAULT_S_MAX,
) -> np.ndarray:
    """The continuous (pre-rounding) softmax allocation s_m, (M,).

    energies: (M,) positive mean unit cost per module. e = zscore(log energies) (0 if all equal);
    B_m = B N_m exp(-e_m/T) / sum N_m' exp(-e_m'/T), s_m = B_m / N_m, clipped to the module's
    bounds and water-filled so that sum_m N_m s_m = B exactly. T = inf: uniform (bit for bit the
    same as allocate_uniform); T -> 0: the lowest-energy modules fill to their cap first; T below
    1e-8 acts as 1e-8. Closed form, about 1 ms for 60 modules on one CPU core.
    """
    pb = _prepare(specs, s, s_min, s_max)
    return _softmax_continuous(pb, energies, np.array([temperature], dtype=np.float64))[0]


def softmax_sweep(
    specs: Sequence[ModuleSpec],
    energies: np.ndarray,
    s: float,
    temperatures: Sequence[float] | np.ndarray,
    s_min: float = 0.0,
    s_max: float = DEFAULT_S_MAX,
) -> np.ndarray:
    """softmax_sparsities for many temperatures at once: (K, M), row k for temperatures[k]."""
    pb = _prepare(specs, s, s_min, s_max)
    return _softmax_continuous(pb, energies, np.asarray(temperatures, dtype=np.float64))


def allocate_softmax(
    specs: Sequence[ModuleSpec],
    energies: np.ndarray,
    s: float,
    temperature: float,
    s_min: float = 0.0,
    s_max: float = DEFAULT_S_MAX,
) -> Allocation:
    """Energy-based allocation (see softmax_sparsities), rounded to whole steps."""
    pb = _prepare(specs, s, s_min, s_max)
    s_cont = _softmax_continuous(pb, energies, np.array([temperature], dtype=np.float64))[0]
    return _finish(pb, s_cont, "softmax")


def _owl_continuous(pb: _Problem, layer_outlier_ratio: np.ndarray, s: float, lam: float) -> np.ndarray:
    if not isinstance(lam, Real) or not (0.0 <= float(lam) < math.inf):
        raise InvalidConfigError(f"lam={lam!r} must be a finite number >= 0.")
    layers, layer_of = np.unique(pb.a.layer, return_inverse=True)
    d = np.asarray(layer_outlier_ratio, dtype=np.float64)
    if d.shape != (len(layers),) or not np.all(np.isfinite(d)):
        raise InvalidConfigError(
            f"layer_outlier_ratio must be {len(layers)} finite numbers (one per layer), got shape {d.shape}."
        )
    spread = d.max() - d.min()
    if spread > 0:
        s_layer = s + lam - 2 * lam * (d - d.min()) / spread  # (L,)
    else:
        s_layer = np.full(len(layers), float(s))
    layer_params = np.bincount(layer_of, weights=pb.n_params)  # (L,)
    s_layer = s_layer + s - (layer_params @ s_layer) / layer_params.sum()
    return _fill_shifted(pb.n_params, s_layer[layer_of], *pb.bounds, pb.budget)


def owl_sparsities(
    specs: Sequence[ModuleSpec],
    layer_outlier_ratio: np.ndarray,
    s: float,
    lam: float = DEFAULT_OWL_LAMBDA,
    s_max: float = DEFAULT_S_MAX,
) -> np.ndarray:
    """OWL's continuous allocation, (M,).

    layer_outlier_ratio: (L,) D_l, indexed by the specs' distinct layer ids in ascending order.
    s_l = s + lam - 2 lam (D_l - min D) / (max D - min D) (s_l = s if all D equal): more outliers,
    less sparsity. Then shifted by one constant so the parameter-weighted mean is s, given to
    both modules of the layer, and clipped to each module's bounds with the clipped amount
    spread as one additive shift over the others (the parameter-weighted mean stays s).
    """
    return _owl_continuous(_prepare(specs, s, 0.0, s_max), layer_outlier_ratio, s, lam)


def allocate_owl(
    specs: Sequence[ModuleSpec],
    layer_outlier_ratio: np.ndarray,
    s: float,
    lam: float = DEFAULT_OWL_LAMBDA,
    s_max: float = DEFAULT_S_MAX,
) -> Allocation:
    """OWL allocation (see owl_sparsities), rounded to whole steps."""
    pb = _prepare(specs, s, 0.0, s_max)
    return _finish(pb, _owl_continuous(pb, layer_outlier_ratio, s, lam), "owl")


def allocation_entropy(
    alloc_or_sparsities: Allocation | np.ndarray,
    specs: Sequence[ModuleSpec] | None = None,
    *,
    over: Literal["parameters", "modules"] = "parameters",
) -> float:
    """Shannon entropy (nats) of where the pruned parameters sit.

    P_m = pruned parameters of module m (achieved for an Allocation, N_m s_m for an (M,) array of
    sparsities), p_m = P_m / sum P.

    - over="parameters" (default): the entropy of the position of a randomly chosen pruned
      parameter among all prunable parameters, uniform within a module:
      H = -sum_m p_m log(s_m / sum P) = H(p) + sum_m p_m log N_m. Its maximum, log(sum_m N_m), is
      reached exactly by uniform sparsity, whatever the module sizes; concentrating the budget
      lowers it.
    - over="modules": the plain H(p) = -sum_m p_m log p_m; maximum log M at equal pruned
      parameters per module, which is uniform sparsity only when all modules have equal size.

    Nothing pruned -> 0.0.
    """
    if isinstance(alloc_or_sparsities, Allocation):
        specs = alloc_or_sparsities.specs if specs is None else specs
        specs, a = _spec_arrays(specs)
        s_m = alloc_or_sparsities.sparsities
    else:
        if specs is None:
            raise InvalidConfigError("allocation_entropy needs specs when given an array of sparsities.")
        specs, a = _spec_arrays(specs)
        s_m = np.asarray(alloc_or_sparsities, dtype=np.float64)
    if s_m.shape != (len(specs),) or not np.all(np.isfinite(s_m)) or np.any(s_m < 0) or np.any(s_m > 1):
        raise InvalidConfigError(f"sparsities must be {len(specs)} numbers in [0, 1].")
    pruned = a.params * s_m
    total = pruned.sum()
    if total <= 0:
        return 0.0
    p = pruned / total
    nz = p > 0
    if over == "parameters":
        return float(-(p[nz] @ np.log(s_m[nz] / total)))
    if over == "modules":
        return float(-(p[nz] @ np.log(p[nz])))
    raise InvalidConfigError(f"over must be 'parameters' or 'modules', got {over!r}.")
