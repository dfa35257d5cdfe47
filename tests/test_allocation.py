"""Allocation schemes: budgets, bounds, limits, and brute-force / hand-worked references."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from structprune.allocation import (
    Allocation,
    ModuleSpec,
    _round_to_steps,
    _unit_bounds,
    _spec_arrays,
    allocate_owl,
    allocate_softmax,
    allocate_threshold,
    allocate_uniform,
    allocation_entropy,
    owl_sparsities,
    softmax_sparsities,
    softmax_sweep,
)
from structprune.errors import InvalidConfigError


def random_specs(rng: np.random.Generator, n_layers: int) -> list[ModuleSpec]:
    """GQA attention (9 heads, 3 KV groups: step 3, min_keep 3) and gated MLPs of varied width."""
    specs = []
    for layer in range(n_layers):
        d = int(rng.integers(16, 96))
        head_dim = int(rng.integers(4, 16))
        head = 2 * d * head_dim  # q rows + o columns
        specs.append(ModuleSpec(layer, "attn", n_units=9, unit_params=head, step=3, min_keep=3))
        specs.append(ModuleSpec(layer, "mlp", n_units=int(rng.integers(8, 120)), unit_params=3 * d))
    return specs


def max_feasible_s(specs, s_max=0.9) -> float:
    _, a = _spec_arrays(specs)
    _, hi = _unit_bounds(a, 0.0, s_max)
    return float(hi @ a.p) / float(a.params.sum())


def chunk_bound(specs) -> float:
    return max(sp.step * sp.unit_params for sp in specs) / 2


def check_allocation(alloc: Allocation, s: float, s_max: float = 0.9, s_min: float = 0.0) -> None:
    """The invariants every scheme promises."""
    specs = alloc.specs
    n = np.array([sp.n_units for sp in specs])
    B = s * sum(sp.params for sp in specs)
    assert alloc.params_target == pytest.approx(B)
    assert abs(alloc.params_pruned - B) <= chunk_bound(specs) + 1e-6
    assert alloc.budget_tolerance == chunk_bound(specs)
    k = alloc.pruned_units
    assert all(ki % sp.step == 0 for ki, sp in zip(k, specs))
    assert np.all(k >= 0) and np.all(k <= n - np.array([sp.min_keep for sp in specs]))
    assert np.all(k <= np.floor(s_max * n + 1e-9))
    assert np.all(alloc.sparsities <= s_max + 1e-12)


def water_fill_reference(N, w, lo, hi, B):
    """docs/METHOD.md's procedure, written independently: give the free modules B_m proportional to
    N_m w_m, fix every module that overflows its cap, redistribute, repeat (lo = 0 here)."""
    assert np.all(lo == 0)
    fixed = np.zeros(len(N), dtype=bool)
    s = np.zeros(len(N))
    for _ in range(len(N) + 1):
        free = ~fixed
        s[free] = (B - N[fixed] @ hi[fixed]) * w[free] / (N[free] @ w[free])
        s[fixed] = hi[fixed]
        over = free & (s > hi)
        if not over.any():
            return s
        fixed |= over
    raise AssertionError("did not converge")


# ---------------------------------------------------------------- budget, every scheme


@pytest.mark.parametrize("seed", range(6))
def test_every_scheme_meets_budget_to_half_a_chunk(seed):
    rng = np.random.default_rng(seed)
    specs = random_specs(rng, int(rng.integers(2, 12)))
    s_top = min(0.9, max_feasible_s(specs))
    energies = rng.lognormal(0.0, 1.0, len(specs))
    costs = [rng.lognormal(0.0, 1.0, sp.n_units) for sp in specs]
    outliers = rng.uniform(0.0, 0.2, len(specs) // 2)
    for s in np.concatenate([[0.0, s_top], rng.uniform(0.0, s_top, 8)]):
        check_allocation(allocate_uniform(specs, s), s)
        check_allocation(allocate_threshold(specs, costs, s), s)
        check_allocation(allocate_owl(specs, outliers, s, lam=0.1), s)
        for T in (float("inf"), 3.0, 1.0, 0.3, 0.01):
            check_allocation(allocate_softmax(specs, energies, s, T), s)
    # With s_min > 0 (rounded up to whole steps: 0.05 of 9 heads in steps of 3 -> 3 heads).
    _, a = _spec_arrays(specs)
    lo, hi = _unit_bounds(a, 0.05, 0.8)
    s_lo, s_hi = float(lo @ a.p) / a.params.sum(), float(hi @ a.p) / a.params.sum()
    for s in np.linspace(s_lo, s_hi, 6):
        alloc = allocate_softmax(specs, energies, s, 0.5, s_min=0.05, s_max=0.8)
        check_allocation(alloc, s, s_max=0.8, s_min=0.05)
        assert np.all(alloc.pruned_units >= lo)


@pytest.mark.parametrize("seed", range(4))
def test_rounding_stays_within_one_step_of_continuous(seed):
    rng = np.random.default_rng(100 + seed)
    specs = random_specs(rng, 8)
    n = np.array([sp.n_units for sp in specs])
    q = np.array([sp.step for sp in specs])
    for s in rng.uniform(0.05, max_feasible_s(specs), 5):
        energies = rng.lognormal(size=len(specs))
        for alloc in (allocate_uniform(specs, s), allocate_softmax(specs, energies, s, 0.7)):
            assert np.all(np.abs(alloc.pruned_units - alloc.continuous * n) <= q + 1e-9)


def test_rounding_hand_worked():
    # Two MLPs (unit 10 and 30 params) and one attention (step 2, 20 params per head: chunk 40).
    specs = [ModuleSpec(0, "mlp", 10, 10), ModuleSpec(0, "attn", 4, 20, step=2),
             ModuleSpec(1, "mlp", 10, 30)]
    s_cont = np.array([0.45, 0.5, 0.42])  # units 4.5, 2, 4.2 -> params 45 + 40 + 126 = 211
    caps = (np.zeros(3, dtype=np.int64), np.array([9, 4, 9]))
    # floors 4, 2, 4 -> 40 + 40 + 120 = 200, deficit 11; leftovers 0.5*10 = 5, 0, 0.2*30 = 6.
    # Module 2 first (6 > 5): chunk 30 >= 2 * 11, skipped; module 0: chunk 10 < 22, taken -> 210.
    k = _round_to_steps(specs, s_cont, 211.0, caps)
    assert k.tolist() == [5, 2, 4]


def test_infeasible_budget_raises_with_the_reachable_sparsity():
    specs = [ModuleSpec(0, "attn", 9, 100, step=3, min_keep=3), ModuleSpec(0, "mlp", 10, 10)]
    # attention can lose 6 of 9 heads (600), mlp 9 of 10 channels (90): at most 690 / 1000.
    with pytest.raises(InvalidConfigError, match="0.6900"):
        allocate_uniform(specs, 0.7)
    assert allocate_uniform(specs, 0.69).params_pruned == 690


# ---------------------------------------------------------------- uniform


def test_uniform_is_exact_where_caps_allow_and_spreads_overflow():
    specs = [ModuleSpec(0, "attn", 6, 50, step=3, min_keep=3), ModuleSpec(0, "mlp", 100, 10),
             ModuleSpec(1, "mlp", 100, 20)]
    a = allocate_uniform(specs, 0.5)  # 0.5 of 300 = 150 = 3 heads: everything fits
    assert a.pruned_units.tolist() == [3, 50, 50] and a.params_pruned == 1650
    # s = 0.6: attention is capped at 3 heads (0.5); its missing 0.1 * 300 = 30 params go to the
    # mlps at one common sparsity x: 3000 x = 0.6 * 3300 - 150 -> x = 0.61.
    a = allocate_uniform(specs, 0.6)
    np.testing.assert_allclose(a.continuous, [0.5, 0.61, 0.61])
    assert a.pruned_units.tolist() == [3, 61, 61]


# ---------------------------------------------------------------- softmax


def test_softmax_unclipped_equals_the_formula():
    rng = np.random.default_rng(1)
    specs = random_specs(rng, 6)
    N = np.array([sp.params for sp in specs], dtype=float)
    E = rng.lognormal(0.0, 0.5, len(specs))
    s, T = 0.1, 2.0
    le = np.log(E)
    z = (le - le.mean()) / le.std()
    B = s * N.sum()
    expected = B * N * np.exp(-z / T) / (N @ np.exp(-z / T)) / N
    assert expected.max() < 0.6  # no clipping in this case
    np.testing.assert_allclose(softmax_sparsities(specs, E, s, T), expected, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_softmax_water_fill_matches_iterative_redistribution(seed):
    rng = np.random.default_rng(10 + seed)
    specs = random_specs(rng, 10)
    _, a = _spec_arrays(specs)
    _, hi_units = _unit_bounds(a, 0.0, 0.9)
    N, hi = a.params.astype(float), hi_units / a.n
    E = rng.lognormal(0.0, 1.0, len(specs))
    le = np.log(E)
    z = (le - le.mean()) / le.std()
    for s in (0.2, 0.4, 0.55):
        for T in (0.25, 1.0, 4.0):
            ref = water_fill_reference(N, np.exp(-z / T), np.zeros(len(N)), hi, s * N.sum())
            got = softmax_sparsities(specs, E, s, T)
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
            assert N @ got == pytest.approx(s * N.sum(), rel=1e-12)


def test_softmax_infinite_and_huge_temperature_equal_uniform():
    rng = np.random.default_rng(2)
    specs = random_specs(rng, 10)
    q = np.array([sp.step for sp in specs])
    E = rng.lognormal(0.0, 1.0, len(specs))
    for s in (0.1, 0.3, 0.5):
        uni = allocate_uniform(specs, s)
        inf = allocate_softmax(specs, E, s, float("inf"))
        assert np.array_equal(inf.continuous, uni.continuous)  # bit for bit
        assert np.array_equal(inf.pruned_units, uni.pruned_units)
        huge = allocate_softmax(specs, E, s, 1e6)
        np.testing.assert_allclose(huge.continuous, uni.continuous, rtol=1e-5)
        # Weights differ by ~1e-6, which may move a near-tied leftover unit to another module.
        assert np.all(np.abs(huge.pruned_units - uni.pruned_units) <= q)
    # Where uniform lands on whole steps, T = 1e6 rounds back to exactly the same units.
    specs = [ModuleSpec(0, "attn", 6, 40, step=3, min_keep=3), ModuleSpec(0, "mlp", 100, 12),
             ModuleSpec(1, "mlp", 40, 30)]
    huge = allocate_softmax(specs, np.array([1.0, 5.0, 0.2]), 0.5, 1e6)
    assert huge.continuous.tolist() != [0.5, 0.5, 0.5]
    assert huge.pruned_units.tolist() == allocate_uniform(specs, 0.5).pruned_units.tolist()
    assert huge.pruned_units.tolist() == [3, 50, 20]


def test_softmax_low_temperature_fills_cheapest_modules_first():
    # 12 MLPs of equal size, well-separated energies in shuffled order.
    rng = np.random.default_rng(3)
    specs = [ModuleSpec(layer, "mlp", 100, 10) for layer in range(12)]
    E = np.exp(rng.permutation(np.linspace(0.0, 3.0, 12)))
    s = 0.35  # B = 0.35 * 12000 = 4200 params: four modules at 0.9 (3600), a fifth at 0.6
    got = softmax_sparsities(specs, E, s, 1e-3)
    order = np.argsort(E)
    # Greedy reference: fill modules in order of energy up to 0.9 until the budget is spent.
    expected, left = np.zeros(12), s * 12
    for m in order:
        expected[m] = min(0.9, left)
        left -= expected[m]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    alloc = allocate_softmax(specs, E, s, 1e-3)
    assert np.all(alloc.pruned_units[order[:4]] == 90)  # the four cheapest at s_max
    assert alloc.pruned_units[order[4]] == 60
    assert np.all(alloc.pruned_units[order[5:]] == 0)  # the most expensive untouched
    assert alloc.params_pruned == 4200


def test_softmax_tiny_temperatures_are_the_zero_limit():
    rng = np.random.default_rng(16)
    specs = random_specs(rng, 12)
    N = np.array([sp.params for sp in specs], dtype=float)
    E = rng.lognormal(0.0, 1.0, len(specs))
    ref = softmax_sparsities(specs, E, 0.4, 1e-8)
    for T in (1e-30, 1e-300, 5e-324):
        x = softmax_sparsities(specs, E, 0.4, T, s_min=0.0)
        np.testing.assert_allclose(x, ref, atol=1e-12)
        assert N @ x == pytest.approx(0.4 * N.sum(), rel=1e-12)
    # At most one module sits strictly between its bounds (the one the budget runs out in).
    _, a = _spec_arrays(specs)
    _, hi = _unit_bounds(a, 0.0, 0.9)
    between = (ref > 1e-12) & (ref < hi / a.n - 1e-12)
    assert between.sum() <= 1


def test_softmax_bounds_respected():
    rng = np.random.default_rng(4)
    specs = random_specs(rng, 10)
    n = np.array([sp.n_units for sp in specs])
    E = rng.lognormal(0.0, 1.5, len(specs))
    for T in (0.05, 0.5, 5.0):
        x = softmax_sparsities(specs, E, 0.4, T, s_min=0.1, s_max=0.75)
        _, a = _spec_arrays(specs)
        lo, hi = _unit_bounds(a, 0.1, 0.75)
        assert np.all(x >= 0.1 - 1e-12) and np.all(x <= 0.75 + 1e-12)
        assert np.all(x >= lo / n - 1e-12) and np.all(x <= hi / n + 1e-12)
        alloc = allocate_softmax(specs, E, 0.4, T, s_min=0.1, s_max=0.75)
        assert np.all(alloc.pruned_units >= lo) and np.all(alloc.pruned_units <= hi)
        assert np.all(alloc.units_kept[::2] >= 3)  # attention keeps one head per KV group


def test_softmax_sweep_rows_equal_single_calls():
    rng = np.random.default_rng(5)
    specs = random_specs(rng, 15)
    E = rng.lognormal(0.0, 1.0, len(specs))
    temps = np.array([1e-3, 0.1, 0.5, 1.0, 10.0, float("inf")])
    sweep = softmax_sweep(specs, E, 0.35, temps)
    assert sweep.shape == (len(temps), len(specs))
    for row, T in zip(sweep, temps):
        np.testing.assert_allclose(row, softmax_sparsities(specs, E, 0.35, T), rtol=1e-12, atol=1e-15)


def test_softmax_equal_energies_give_uniform():
    specs = random_specs(np.random.default_rng(6), 5)
    x = softmax_sparsities(specs, np.full(len(specs), 2.5), 0.3, 0.01)
    np.testing.assert_allclose(x, softmax_sparsities(specs, np.ones(len(specs)), 0.3, float("inf")))


def test_softmax_speed_60_modules():
    rng = np.random.default_rng(7)
    specs = random_specs(rng, 30)
    E = rng.lognormal(0.0, 1.0, 60)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        softmax_sparsities(specs, E, 0.4, 0.7)
        times.append(time.perf_counter() - t0)
    median_ms = 1e3 * float(np.median(times))
    print(f"softmax_sparsities, 60 modules: median {median_ms:.3f} ms")
    assert median_ms < 50


# ---------------------------------------------------------------- threshold


def test_threshold_mlp_only_equals_brute_force_sort():
    rng = np.random.default_rng(8)
    specs = [ModuleSpec(layer, "mlp", int(rng.integers(5, 15)), int(rng.integers(3, 9)))
             for layer in range(4)]
    costs = [rng.uniform(size=sp.n_units) for sp in specs]
    total = sum(sp.params for sp in specs)
    for s in (0.1, 0.3, 0.5, 0.8):
        B = s * total
        # Brute force: every unit as (cost, module); walk them cheapest first, skipping modules at
        # their 0.9 cap; stop at the unit that crosses B, keeping it if that lands closer.
        units = sorted((c, m) for m, cm in enumerate(costs) for c in cm)
        k, done = [0] * len(specs), 0
        for c, m in units:
            if k[m] + 1 > math.floor(0.9 * specs[m].n_units + 1e-9):
                continue
            p = specs[m].unit_params
            if done + p > B and done + p - B >= B - done:
                break
            k[m] += 1
            done += p
            if done >= B:
                break
        alloc = allocate_threshold(specs, costs, s)
        assert alloc.pruned_units.tolist() == k


def test_threshold_with_steps_equals_tau_enumeration():
    # Independent formulation: s_m(tau) = empirical CDF of module m's chunk costs at tau, capped;
    # the allocation is the tau whose parameter count is closest to B (the smaller on a tie).
    rng = np.random.default_rng(9)
    specs = random_specs(rng, 3)
    costs = [rng.lognormal(size=sp.n_units) for sp in specs]
    _, a = _spec_arrays(specs)
    _, hi = _unit_bounds(a, 0.0, 0.9)
    chunk_means = [np.sort(c)[: (h // sp.step) * sp.step].reshape(-1, sp.step).mean(1)
                   for c, sp, h in zip(costs, specs, hi)]
    taus = np.concatenate([[-np.inf], np.sort(np.concatenate(chunk_means)) + 1e-12])
    for s in np.linspace(0.02, max_feasible_s(specs), 9):
        B = s * a.params.sum()
        best = None
        for tau in taus:
            k = np.array([(cm < tau).sum() * sp.step for cm, sp in zip(chunk_means, specs)])
            params = k @ a.p
            key = (abs(params - B), params)
            if best is None or key < best[0]:
                best = (key, k)
        alloc = allocate_threshold(specs, costs, s)
        assert alloc.pruned_units.tolist() == best[1].tolist()


def test_threshold_chunk_cost_is_the_mean_of_the_cheapest_heads():
    # Attention: 4 heads, 2 KV groups (step 2), 10 params per head; MLP: 20 channels of 1 param.
    specs = [ModuleSpec(0, "attn", 4, 10, step=2), ModuleSpec(0, "mlp", 20, 1)]
    costs = [np.array([0.5, 0.1, 0.9, 0.3]), np.full(20, 0.25)]
    # Head chunks: mean(0.1, 0.3) = 0.2, then mean(0.5, 0.9) = 0.7; channels cost 0.25 each.
    # B = 0.5 * 60 = 30: the 0.2 chunk (20 params) first, then 10 channels at 0.25 -> 30.
    alloc = allocate_threshold(specs, costs, 0.5)
    assert alloc.pruned_units.tolist() == [2, 10]


# ---------------------------------------------------------------- OWL


def test_owl_formula_mean_and_monotonicity():
    rng = np.random.default_rng(11)
    specs = random_specs(rng, 8)
    _, a = _spec_arrays(specs)
    N = a.params.astype(float)
    D = rng.uniform(0.01, 0.2, 8)
    s, lam = 0.3, 0.08
    x = owl_sparsities(specs, D, s, lam)
    # Independent: the linear map, then the parameter-weighted mean shift.
    layer_s = s + lam - 2 * lam * (D - D.min()) / (D.max() - D.min())
    NL = N[0::2] + N[1::2]
    layer_s += s - NL @ layer_s / NL.sum()
    np.testing.assert_allclose(x[0::2], layer_s, rtol=1e-12)
    np.testing.assert_allclose(x[1::2], layer_s, rtol=1e-12)
    assert N @ x / N.sum() == pytest.approx(s, rel=1e-12)
    order = np.argsort(D)
    assert np.all(np.diff(x[1::2][order]) < 0)  # more outliers, less sparsity
    check_allocation(allocate_owl(specs, D, s, lam), s)


def test_owl_clipping_keeps_the_weighted_mean():
    rng = np.random.default_rng(12)
    specs = random_specs(rng, 8)
    N = np.array([sp.params for sp in specs], dtype=float)
    D = rng.uniform(0.0, 1.0, 8)
    x = owl_sparsities(specs, D, 0.6, lam=0.2)  # attention is capped at 6/9 < 0.6 + 0.2
    assert np.all(x[0::2] <= 6 / 9 + 1e-12) and np.all(x <= 0.9 + 1e-12)
    assert N @ x / N.sum() == pytest.approx(0.6, rel=1e-12)
    assert np.all(np.diff(x[1::2][np.argsort(D)]) <= 1e-12)


def test_owl_equal_outliers_give_uniform():
    specs = random_specs(np.random.default_rng(13), 4)
    np.testing.assert_allclose(owl_sparsities(specs, np.full(4, 0.07), 0.25), 0.25)


# ---------------------------------------------------------------- entropy


def test_entropy_hand_worked_two_modules():
    specs = [ModuleSpec(0, "mlp", 10, 10), ModuleSpec(1, "mlp", 30, 10)]  # N = 100, 300
    x = np.array([0.5, 0.1])  # pruned 50 and 30 of 80: p = 0.625, 0.375
    h_params = 0.625 * math.log(160) + 0.375 * math.log(800)  # per-parameter prob 0.5/80, 0.1/80
    assert allocation_entropy(x, specs) == pytest.approx(h_params, rel=1e-12)
    h_modules = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    assert allocation_entropy(x, specs, over="modules") == pytest.approx(h_modules, rel=1e-12)
    assert allocation_entropy(np.array([0.2, 0.2]), specs) == pytest.approx(math.log(400), rel=1e-12)
    assert allocation_entropy(np.zeros(2), specs) == 0.0


def test_entropy_uniform_is_maximal():
    rng = np.random.default_rng(14)
    specs = random_specs(rng, 10)
    E = rng.lognormal(0.0, 1.0, len(specs))
    h_uniform = allocation_entropy(softmax_sparsities(specs, E, 0.4, float("inf")), specs)
    assert h_uniform == pytest.approx(math.log(sum(sp.params for sp in specs)), rel=1e-12)
    hs = [allocation_entropy(softmax_sparsities(specs, E, 0.4, T), specs)
          for T in (10.0, 1.0, 0.3, 0.01)]
    assert all(h < h_uniform for h in hs)
    assert hs == sorted(hs, reverse=True)  # colder -> more concentrated
    alloc = allocate_softmax(specs, E, 0.4, 1.0)
    assert allocation_entropy(alloc) == pytest.approx(allocation_entropy(alloc.sparsities, specs))


# ---------------------------------------------------------------- records and validation


def test_records():
    specs = [ModuleSpec(3, "attn", 6, 50, step=3, min_keep=3), ModuleSpec(3, "mlp", 100, 10)]
    a = allocate_uniform(specs, 0.5)
    assert a.to_records() == [
        dict(layer=3, module="attn", units_total=6, units_kept=3, units_pruned=3,
             params_total=300, params_pruned=150, sparsity=0.5),
        dict(layer=3, module="mlp", units_total=100, units_kept=50, units_pruned=50,
             params_total=1000, params_pruned=500, sparsity=0.5),
    ]
    assert a.achieved_sparsity == 0.5 and a.budget_error == 0 and a.scheme == "uniform"
    assert specs[0].name == "3.attn" and specs[0].params == 300
    with pytest.raises(ValueError):
        a.pruned_units[0] = 0  # frozen


def test_validation_errors():
    specs = random_specs(np.random.default_rng(15), 2)
    E = np.ones(4)
    with pytest.raises(ValueError, match=r"\[0, 0.9\]"):
        allocate_uniform(specs, 0.95)
    with pytest.raises(ValueError, match=r"\[0, 0.9\]"):
        allocate_softmax(specs, E, -0.1, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 0.9\]"):
        allocate_uniform(specs, float("nan"))
    with pytest.raises(ValueError, match="empty"):
        allocate_uniform([], 0.3)
    with pytest.raises(ValueError, match="shape"):
        softmax_sparsities(specs, np.ones(3), 0.3, 1.0)
    for T in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            softmax_sparsities(specs, E, 0.3, T)
    for bad in (0.0, -2.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="positive"):
            softmax_sparsities(specs, np.array([1.0, bad, 1.0, 1.0]), 0.3, 1.0)
    with pytest.raises(ValueError, match="unit_costs"):
        allocate_threshold(specs, [np.ones(sp.n_units) for sp in specs[:-1]], 0.3)
    with pytest.raises(ValueError, match="unit_costs"):
        allocate_threshold(specs, [np.ones(sp.n_units + 1) for sp in specs], 0.3)
    with pytest.raises(ValueError, match="layer_outlier_ratio"):
        allocate_owl(specs, np.ones(3), 0.3)
    with pytest.raises(ValueError, match="step"):
        ModuleSpec(0, "attn", 8, 10, step=3)
    with pytest.raises(ValueError, match="kind"):
        ModuleSpec(0, "ffn", 8, 10)
    with pytest.raises(ValueError, match="twice"):
        allocate_uniform([specs[0], specs[0]], 0.3)
