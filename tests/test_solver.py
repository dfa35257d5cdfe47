"""The per-module solver against independent computations: brute force over all supports,
least squares on the explicit activations, hand formulas."""

from __future__ import annotations

import itertools
import json
import logging
import math

import pytest
import torch

from structprune.solver import (
    SolverError,
    damped,
    greedy_obs_select,
    group_saliency,
    reconstruction_error,
    refit,
    solve_module,
)
from structprune.solver import admm_select, local_search

log = logging.getLogger(__name__)
F64 = torch.float64



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one intra-op thread avoids OpenMP spin-waits on a busy 2-core box
    (60 ms instead of 0.3 ms per small solve there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Filled by test_brute_force_rates: within-1%-of-optimum rates per method and metric.
BRUTE_FORCE_RATES: dict[str, float] = {}


# --------------------------------------------------------------------------------------------
# problems with explicit activations


def make_problem(seed: int, U: int, g: int, d: int = 8, tokens_per_col: int = 4):
    """Correlated, heavy-tailed activations P (n, T) with a mean offset, weights W~ = [W, b].
    Returns Wt (d, n+1), P~ (n+1, T), G (n+1, n+1) undamped, groups (U, g)."""
    gen = torch.Generator().manual_seed(seed)
    n = U * g
    T = tokens_per_col * n
    mix = torch.randn(n, n, generator=gen, dtype=F64)  # random mixing: columns correlate
    mix += 2.0 * torch.randn(1, n, generator=gen, dtype=F64) * torch.eye(n, dtype=F64)
    scale = torch.exp(torch.randn(n, 1, generator=gen, dtype=F64))  # per-column magnitudes
    P = scale * (mix @ torch.randn(n, T, generator=gen, dtype=F64))
    P += torch.randn(n, 1, generator=gen, dtype=F64)  # non-zero means: the bias matters
    Pt = torch.cat([P, torch.ones(1, T, dtype=F64)])
    G = Pt @ Pt.T / T
    Wt = torch.randn(d, n + 1, generator=gen, dtype=F64)
    groups = torch.arange(n).reshape(U, g)
    return Wt, Pt, G, groups


def random_case(seed: int):
    """8-12 units of 1-3 columns, a third of the cases in 2-4 blocks, k_keep in [U/4, U-2]."""
    gen = torch.Generator().manual_seed(1000 + seed)
    U = int(torch.randint(8, 13, (1,), generator=gen))
    g = [1, 1, 2, 3][int(torch.randint(0, 4, (1,), generator=gen))]
    d = int(torch.randint(4, 17, (1,), generator=gen))
    Wt, _, G, groups = make_problem(seed, U, g, d)
    blocks = None
    if seed % 3 == 0:
        B = next((B for B in (3, 2, 4) if U % B == 0), None)
        if B is not None:
            blocks = torch.arange(U) // (U // B)
    nb = 1 if blocks is None else int(blocks.max()) + 1
    choices = [k for k in range(max(1, U // 4), U - 1) if k % nb == 0]
    k = choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
    return Wt, G, groups, blocks, k


def ls_losses(Wt, G, groups, supports, rel, metric_G=None):
    """Independent refit of many same-size unit sets at once: W'_S = (Wt Gd)_S (Gd_S,S)^-1
    (bias column in S and undamped), loss tr(D metric_G D^T). supports: (C, k) -> (C,)"""
    n = Wt.shape[1] - 1
    Gd = G.clone()
    Gd.diagonal()[:n] += rel * G.diagonal().mean()
    sup = torch.as_tensor(supports, dtype=torch.long).reshape(len(supports), -1)
    C = sup.shape[0]
    S = torch.cat([groups[sup].reshape(C, -1), torch.full((C, 1), n)], 1)  # (C, s)
    X = torch.linalg.solve(Gd[S[:, :, None], S[:, None, :]],
                           (Wt @ Gd)[:, S].permute(1, 2, 0))  # (C, s, d)
    Wn = torch.zeros(C, *Wt.shape, dtype=F64)
    Wn.scatter_(2, S[:, None, :].expand(C, Wt.shape[0], -1), X.transpose(1, 2))
    D = Wt - Wn  # (C, d, n+1)
    return ((D @ (G if metric_G is None else metric_G)) * D).sum((1, 2))


def ls_loss(Wt, G, groups, kept, rel, metric_G=None):
    return float(ls_losses(Wt, G, groups, [list(kept)], rel, metric_G)[0])


def feasible_supports(U, k, blocks):
    for c in itertools.combinations(range(U), k):
        if blocks is not None:
            cnt = torch.bincount(blocks[list(c)], minlength=int(blocks.max()) + 1)
            if not bool((cnt == cnt[0]).all()):
                continue
        yield c


# --------------------------------------------------------------------------------------------
# brute force


def brute_force_rates(rel: float, N: int = 50) -> dict[str, float]:
    """How often each selector (then refit) lands within 1% of the best support, over N random
    problems, all solved with damp_rel=rel. Metric 'undamped' is the reported loss; 'damped' is
    the objective every selector minimizes."""
    methods = ["saliency", "greedy", "admm", "admm_only", "greedy+ls", "admm+ls"]
    hits = {f"{m}/{metric}": 0 for m in methods for metric in ("undamped", "damped")}
    kw = dict(damp_rel=rel)
    for seed in range(N):
        Wt, G, groups, blocks, k = random_case(seed)
        Gd = damped(G, rel)
        sets = list(feasible_supports(groups.shape[0], k, blocks))
        best = {"undamped": float(ls_losses(Wt, G, groups, sets, rel).min()),
                "damped": float(ls_losses(Wt, G, groups, sets, rel, Gd).min())}
        kept = {}
        kept["greedy"] = greedy_obs_select(Wt, G, groups, k, blocks, **kw)
        kept["admm"], trace = admm_select(Wt, G, groups, k, blocks, **kw)
        kept["admm_only"], _ = admm_select(Wt, G, groups, k, blocks, keep_better=False, **kw)
        kept["saliency"] = solve_module(Wt[:, :-1], Wt[:, -1], G, groups, k, blocks,
                                        selector="saliency", **kw).kept
        kept["greedy+ls"] = local_search(Wt, G, groups, kept["greedy"], blocks, **kw)
        kept["admm+ls"] = local_search(Wt, G, groups, kept["admm"], blocks, **kw)
        for m in methods:
            for metric, MG in (("undamped", None), ("damped", Gd)):
                loss = ls_loss(Wt, G, groups, kept[m].tolist(), rel, MG)
                hits[f"{m}/{metric}"] += loss <= 1.01 * best[metric]
        # ADMM returns the better of its initial (greedy) and final support: never worse
        assert (ls_loss(Wt, G, groups, kept["admm"].tolist(), rel, Gd)
                <= ls_loss(Wt, G, groups, kept["greedy"].tolist(), rel, Gd) * (1 + 1e-9))
        assert trace.loss_init >= 0 and trace.loss_admm >= 0
    return {key: v / N for key, v in hits.items()}


def test_brute_force_rates():
    """Default damping (0.01 of mean diag G). The selectors minimize the damped loss; with
    column scales spread over orders of magnitude that shifts the optimum of the undamped loss,
    so the undamped rates are lower (see the tiny-damping test for the selection alone)."""
    r = brute_force_rates(0.01)
    BRUTE_FORCE_RATES.update({f"damp=0.01 {k}": v for k, v in r.items()})
    log.info("brute-force within-1%% rates (damp 0.01): %s", json.dumps(r))
    print("brute-force within-1% rates, damp_rel=0.01:", json.dumps(r, indent=1))
    # measured at commit time, damped / undamped metric: saliency .60/.54, greedy .94/.82,
    # admm .94/.82 (admm alone .86/.74), greedy+ls 1.0/.90, admm+ls 1.0/.90
    assert max(r["greedy/damped"], r["admm/damped"]) >= 0.9
    assert r["greedy+ls/damped"] >= 0.96
    assert max(r["greedy+ls/undamped"], r["admm+ls/undamped"]) >= 0.86
    assert r["greedy+ls/damped"] >= r["greedy/damped"] >= r["saliency/damped"]


def test_brute_force_rates_tiny_damping():
    """Damping 1e-6: damped and undamped objectives agree, which isolates the selection."""
    r = brute_force_rates(1e-6)
    BRUTE_FORCE_RATES.update({f"damp=1e-6 {k}": v for k, v in r.items()})
    log.info("brute-force within-1%% rates (damp 1e-6): %s", json.dumps(r))
    print("brute-force within-1% rates, damp_rel=1e-6:", json.dumps(r, indent=1))
    assert max(r["greedy+ls/undamped"], r["admm+ls/undamped"]) >= 0.9
    assert r["greedy+ls/undamped"] >= r["greedy/undamped"]


@pytest.mark.parametrize("U,g,n_blocks,k", [(40, 1, 1, 12), (16, 3, 4, 8)])
def test_greedy_equals_backward_elimination_by_refit(U, g, n_blocks, k):
    """Greedy group OBS (incremental W/Hinv updates, column norms, compaction) must pick what
    naive backward elimination picks when it re-solves every candidate from scratch."""
    Wt, _, G, groups = make_problem(7, U=U, g=g, d=6, tokens_per_col=3)
    Gd = damped(G)
    blocks = torch.arange(U) % n_blocks
    quota = k // n_blocks
    kept = list(range(U))
    while len(kept) > k:
        full = [v for v in kept if sum(int(blocks[u] == blocks[v]) for u in kept) > quota]
        costs = [ls_loss(Wt, G, groups, [u for u in kept if u != v], 0.01, Gd) for v in full]
        kept.remove(full[min(range(len(full)), key=costs.__getitem__)])
    got = greedy_obs_select(Wt, G, groups, k, blocks if n_blocks > 1 else None)
    assert got.tolist() == kept


def test_greedy_groups_blocks_and_per_step():
    Wt, _, G, groups = make_problem(3, U=12, g=3, d=5)
    blocks = torch.arange(12) // 4
    for per_step in (1, 2, 5):
        kept = greedy_obs_select(Wt, G, groups, 6, blocks, per_step=per_step)
        assert torch.bincount(blocks[kept], minlength=3).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="divisible"):
        greedy_obs_select(Wt, G, groups, 5, blocks)


# --------------------------------------------------------------------------------------------
# refit, error, saliency against the explicit activations


@pytest.mark.parametrize("rel", [0.0, 0.01])
@pytest.mark.parametrize("allow_bias", [True, False])
def test_refit_is_least_squares_on_explicit_activations(rel, allow_bias):
    Wt, Pt, G, groups = make_problem(11, U=6, g=2, d=5)
    n, T = Pt.shape[0] - 1, Pt.shape[1]
    kept = torch.tensor([0, 2, 5])
    Y = Wt @ Pt  # (d, T) dense outputs
    cols = groups[kept].reshape(-1)
    target = Y - (0 if allow_bias else Wt[:, n:] @ Pt[n:])  # a fixed bias is subtracted
    S = torch.cat([cols, torch.tensor([n])]) if allow_bias else cols
    lam = rel * float(G.diagonal().mean())
    # damping pulls the kept weight columns (not the bias) towards their original values
    reg = torch.diag((S < n).to(F64)) * math.sqrt(lam * T)
    A = torch.cat([Pt[S].T, reg])  # (T + |S|, |S|)
    B = torch.cat([target.T, reg @ Wt[:, S].T])
    X = torch.linalg.lstsq(A, B).solution  # (|S|, d)
    expected = torch.zeros_like(Wt)
    expected[:, S] = X.T
    if not allow_bias:
        expected[:, n] = Wt[:, n]
    got = refit(Wt, G, kept, groups, allow_bias=allow_bias, damp_rel=rel)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


def test_reconstruction_error_on_explicit_activations():
    Wt, Pt, G, groups = make_problem(5, U=5, g=1, d=4)
    W_new = refit(Wt, G, torch.tensor([1, 3]), groups)
    explicit = float(((Wt @ Pt - W_new @ Pt) ** 2).sum()) / Pt.shape[1]
    assert reconstruction_error(Wt, W_new, G) == pytest.approx(explicit, rel=1e-10)
    assert reconstruction_error(Wt, Wt, G) == 0.0


@pytest.mark.parametrize("g", [1, 3])
def test_obs_saliency_is_exact_loss_of_removing_one_unit(g):
    Wt, _, G, groups = make_problem(2, U=6, g=g, d=7)
    U = groups.shape[0]
    sal = group_saliency(Wt, G, groups, "obs", damp_rel=0.0)
    for u in range(U):
        rest = torch.tensor([v for v in range(U) if v != u])
        loss = reconstruction_error(Wt, refit(Wt, G, rest, groups, damp_rel=0.0), G)
        assert float(sal[u]) == pytest.approx(loss, rel=1e-8)
    # with damping: the damped loss increase (the objective the selectors minimize)
    sal_d = group_saliency(Wt, G, groups, "obs")
    for u in range(U):
        rest = torch.tensor([v for v in range(U) if v != u])
        loss = reconstruction_error(Wt, refit(Wt, G, rest, groups), damped(G))
        assert float(sal_d[u]) == pytest.approx(loss, rel=1e-8)


def test_diag_saliency_formula():
    Wt, _, G, groups = make_problem(4, U=4, g=2, d=3)
    sal = group_saliency(Wt, G, groups, "diag")
    for u in range(4):
        J = groups[u]
        expected = float((Wt[:, J] ** 2).sum() * G.diagonal()[J].mean())
        assert float(sal[u]) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------
# ADMM, local search


def test_admm_trace_blocks_and_json():
    Wt, _, G, groups = make_problem(8, U=12, g=2, d=6)
    blocks = torch.arange(12) % 3  # interleaved blocks
    for init in ("greedy", "saliency"):
        for sal in ("obs", "diag"):
            kept, tr = admm_select(Wt, G, groups, 6, blocks, saliency=sal, init=init,
                                   max_iter=60)
            assert torch.bincount(blocks[kept], minlength=3).tolist() == [2, 2, 2]
            d = json.loads(json.dumps(tr.to_dict()))
            n_it = d["iterations"]
            assert 1 <= n_it <= 60
            for key in ("rho", "primal_residual", "dual_residual", "support_changes"):
                assert len(d[key]) == n_it
            scale = float(G.diagonal().mean())
            assert d["rho"][0] == pytest.approx(0.1 * scale)
            assert all(b >= a for a, b in zip(d["rho"], d["rho"][1:]))
            if tr.converged:
                assert d["primal_residual"][-1] < 1e-4 and d["support_changes"][-5:] == [0] * 5
    kept, tr = admm_select(Wt, G, groups, 6, init_kept=torch.arange(6), rho_max_rel=1.0,
                           max_iter=30)
    assert max(tr.rho) <= float(G.diagonal().mean()) * (1 + 1e-12) and tr.init == "given"


def test_local_search_reaches_a_swap_optimum():
    Wt, _, G, groups = make_problem(21, U=10, g=1, d=4)
    Gd = damped(G)
    start = [0, 1, 2, 3, 4]  # a poor start
    kept = local_search(Wt, G, groups, torch.tensor(start), max_swaps=50).tolist()
    loss = ls_loss(Wt, G, groups, kept, 0.01, Gd)
    assert loss < ls_loss(Wt, G, groups, start, 0.01, Gd)
    for i in kept:  # no single swap improves the damped loss any more
        for j in set(range(10)) - set(kept):
            swapped = [u for u in kept if u != i] + [j]
            assert ls_loss(Wt, G, groups, swapped, 0.01, Gd) >= loss * (1 - 1e-9)


def test_local_search_keeps_block_counts():
    Wt, _, G, groups = make_problem(9, U=9, g=2, d=4)
    blocks = torch.arange(9) // 3
    kept = local_search(Wt, G, groups, torch.tensor([0, 3, 6]), blocks, max_swaps=20)
    assert torch.bincount(blocks[kept], minlength=3).tolist() == [1, 1, 1]


# --------------------------------------------------------------------------------------------
# solve_module: edge cases and bookkeeping


@pytest.mark.parametrize("selector", ["greedy", "admm", "saliency"])
def test_keep_all_returns_original_weights(selector):
    Wt, _, G, groups = make_problem(1, U=6, g=1, d=4)
    W, b = Wt[:, :-1].to(torch.bfloat16), Wt[:, -1].to(torch.bfloat16)
    sol = solve_module(W, b, G, groups, 6, selector=selector)
    assert torch.equal(sol.W_new, W) and torch.equal(sol.b_new, b)
    assert sol.kept.tolist() == list(range(6)) and sol.error_after_refit == 0.0
    sol = solve_module(W, None, G, groups, 6, selector=selector)
    assert torch.equal(sol.W_new, W) and sol.b_new is None


def test_keep_none_gives_mean_output_bias():
    Wt, Pt, G, groups = make_problem(6, U=5, g=2, d=4)
    W, b = Wt[:, :-1].float(), Wt[:, -1].float()
    sol = solve_module(W, b, G, groups, 0)
    assert sol.kept.numel() == 0 and bool((sol.W_new == 0).all())
    mean_out = (Wt @ Pt).mean(1)  # (d,)
    torch.testing.assert_close(sol.b_new, mean_out.float(), rtol=1e-6, atol=1e-6)
    assert sol.b_new.dtype == torch.float32
    # no bias allowed and none present: everything zero, the error is the mean output energy
    sol = solve_module(W, None, G, groups, 0, allow_bias=False)
    assert sol.b_new is None and bool((sol.W_new == 0).all())
    Y = Wt[:, :-1] @ Pt[:-1]
    assert sol.error_after_refit == pytest.approx(float((Y ** 2).sum()) / Pt.shape[1], rel=1e-6)


def test_solve_module_bookkeeping():
    Wt, Pt, G, groups = make_problem(12, U=9, g=2, d=6)
    W, b = Wt[:, :-1].float(), Wt[:, -1].float()
    blocks = torch.arange(9) // 3
    for selector in ("greedy", "admm", "saliency"):
        sol = solve_module(W, b, G, groups, 6, blocks, selector=selector)
        assert torch.bincount(blocks[sol.kept], minlength=3).tolist() == [2, 2, 2]
        removed = groups[[u for u in range(9) if u not in sol.kept.tolist()]].reshape(-1)
        assert bool((sol.W_new[:, removed] == 0).all()) and sol.W_new.dtype == torch.float32
        Wn = torch.cat([sol.W_new, sol.b_new[:, None]], 1).double()
        explicit = float(((Wt @ Pt - Wn @ Pt) ** 2).sum()) / Pt.shape[1]
        assert sol.error_after_refit == pytest.approx(explicit, rel=1e-4)
        assert sol.error_after_refit < sol.error_dense_to_masked_no_refit
        assert (sol.trace is not None) == (selector == "admm") and sol.seconds > 0
    # no refit: the masked weights; a fixed bias stays as it was
    sol = solve_module(W, b, G, groups, 6, blocks, refit_weights=False, allow_bias=False)
    assert sol.error_after_refit == sol.error_dense_to_masked_no_refit
    assert torch.equal(sol.b_new, b)
    kept_cols = groups[sol.kept].reshape(-1)
    assert torch.equal(sol.W_new[:, kept_cols], W[:, kept_cols])


def test_input_validation():
    Wt, _, G, groups = make_problem(0, U=4, g=1, d=3)
    W, b = Wt[:, :-1], Wt[:, -1]
    with pytest.raises(ValueError, match="k_keep"):
        solve_module(W, b, G, groups, 5)
    with pytest.raises(ValueError, match="overlap"):
        solve_module(W, b, G, torch.tensor([[0], [1], [1], [3]]), 2)
    with pytest.raises(ValueError, match="outside"):
        solve_module(W, b, G, torch.tensor([[0], [1], [2], [4]]), 2)
    with pytest.raises(ValueError, match="G must be"):
        solve_module(W, b, G[:-1, :-1], groups, 2)
    with pytest.raises(ValueError, match="augmented"):
        solve_module(W, b, 2 * G, groups, 2)
    with pytest.raises(ValueError, match="selector"):
        solve_module(W, b, G, groups, 2, selector="random")
    bad = G.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(SolverError, match="NaN"):
        solve_module(W, b, bad, groups, 2)
    with pytest.raises(SolverError, match="NaN"):
        refit(Wt * float("inf"), G, torch.tensor([0]), groups)


def test_quadratic_form_by_column_blocks_equals_one_product():
    """The blocked read of G (how losses read a Gram kept in host memory) gives tr(A G A^T)."""
    from structprune.solver import quadratic_form

    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 23, generator=g, dtype=torch.float64)
    X = torch.randn(40, 23, generator=g, dtype=torch.float64)
    G = X.T @ X / 40
    expected = float(torch.trace(A @ G @ A.T))
    for block in (None, 1, 7, 23, 64):
        assert quadratic_form(A, G, block) == pytest.approx(expected, rel=1e-12)


def test_check_finite_finds_one_bad_entry_and_tolerates_an_overflowing_sum():
    from structprune.solver import SolverError, check_finite

    big = torch.full((300, 300), 3e36)  # finite entries whose fp32 sum overflows to inf
    check_finite("big", big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(2000, 700)
        t[1999, 3] = bad
        with pytest.raises(SolverError, match="NaN or Inf"):
            check_finite("t", t)
