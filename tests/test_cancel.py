"""Cancel ends a run inside every long loop (structprune/cancel.py), not at the next layer boundary.

Each test cancels at a chosen point inside one phase with a `TripWire`: a cancel flag that sets
itself during the n-th cancellation check made by a given loop (inside a given caller), as a Cancel
click between two iterations would. The run must raise RunCancelledError from that same loop at its
very next check: at most one iteration (one batch, one solver step) runs after the click, and the
phase never finishes.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from structprune.cancel import cancel_scope, cancelled, check, window_done, window_span
from structprune.config import PruneConfig
from structprune.errors import RunCancelledError
from structprune.models import load_model
from structprune.run import run_prune

TINY = dict(model="tiny-llama", nsamples=4, seqlen=32, eval_windows=3, device="cpu", sparsity=0.4)


class TripWire:
    """A cancel flag (`is_set()`) that sets itself during the `nth` check made from function `at`
    while `inside` is on the stack (that check still passes: the click lands mid-iteration), then
    counts the checks made from `at` until the run stops."""

    def __init__(self, at: str, inside: str | None = None, nth: int = 1) -> None:
        self.at, self.inside, self.nth = at, inside, nth
        self.seen = 0
        self.tripped = False
        self.checks_after = 0  # checks made from `at` once set (the one that raises included)

    def is_set(self) -> bool:
        names = _caller_names()
        here = self.at in names and (self.inside is None or self.inside in names)
        if self.tripped:
            self.checks_after += here
            return True
        if here:
            self.seen += 1
            self.tripped = self.seen >= self.nth
        return False


def _caller_names(depth: int = 40) -> list[str]:
    f, names = sys._getframe(2), []
    while f is not None and len(names) < depth:
        names.append(f.f_code.co_name)
        f = f.f_back
    return names


def _raised_in(exc: BaseException) -> list[str]:
    """Function names of the traceback, innermost first."""
    names, tb = [], exc.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names[::-1]


def _cancel_run(wire: TripWire, events: list | None = None, **settings):
    events = [] if events is None else events
    with pytest.raises(RunCancelledError) as info:
        run_prune(PruneConfig(**{**TINY, **settings}), load_model("tiny-llama"), on_event=events.append, cancel=wire)
    assert wire.tripped, "the wire never tripped: the loop has no cancellation check"
    stack = _raised_in(info.value)
    assert wire.at in stack and (wire.inside is None or wire.inside in stack), stack
    assert wire.checks_after == 1, "more than one iteration ran after the cancel"
    return events, stack


def test_cancel_inside_the_pass1_gram_batch_loop():
    events, _ = _cancel_run(TripWire("run_layer", inside="collect_stats", nth=2))
    assert not any(e.stage == "pass1" and e.layer >= 0 for e in events)  # layer 0 never finished


@pytest.mark.parametrize("selector, loop", [("greedy", "greedy_obs_select"), ("admm", "admm_select")])
def test_cancel_inside_the_solver_loops_of_pass2(selector, loop):
    events, stack = _cancel_run(TripWire(loop, inside="prune_sequential", nth=2), selector=selector)
    assert "solve_module" in stack
    assert not any(e.stage == "pass2" and e.layer >= 0 for e in events)


def _problem(n_units: int = 40, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, n_units, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n_units, dtype=torch.float64)
    P = torch.cat([X, torch.ones(400, 1, dtype=torch.float64)], 1)
    return torch.randn(d, n_units + 1, generator=g, dtype=torch.float64), P.T @ P / 400, torch.arange(n_units)[:, None]


@pytest.mark.parametrize("loop", ["greedy_obs_select", "admm_select", "local_search"])
def test_each_solver_loop_stops_at_its_next_iteration(loop):
    """Solver-level: a problem with many iterations in each loop (the swap search starts from the
    worst units, so it has swaps to make); the cancel lands in the third iteration."""
    from structprune.solver import admm_select, greedy_obs_select, local_search

    Wt, G, groups = _problem()
    run = {"greedy_obs_select": lambda: greedy_obs_select(Wt, G, groups, 10),
           "admm_select": lambda: admm_select(Wt, G, groups, 10, max_iter=50),
           "local_search": lambda: local_search(Wt, G, groups, torch.arange(10), max_swaps=20)}[loop]
    run()  # uncancelled: it finishes
    wire = TripWire(loop, nth=3)
    with cancel_scope(wire), pytest.raises(RunCancelledError) as info:
        run()
    assert loop in _raised_in(info.value) and wire.checks_after == 1


def test_cancel_inside_the_pass2_gram_batch_loop():
    events, _ = _cancel_run(TripWire("run_layer", inside="prune_sequential", nth=3))
    assert not any(e.stage == "pass2" and e.layer >= 0 for e in events)


def test_cancel_inside_the_block_refit():
    _, stack = _cancel_run(TripWire("fit_layer", inside="prune_sequential", nth=2), refine_epochs=2)
    assert "prune_sequential" in stack


def test_cancel_inside_the_evaluation_and_the_losses():
    events, _ = _cancel_run(TripWire("perplexity_whole", nth=2))
    assert [e.stage for e in events if e.stage.startswith(("eval", "pass"))] == ["eval-dense"]  # its begin only
    events, _ = _cancel_run(TripWire("heldout_nll", inside="_run_prune", nth=20))  # dense held-out: 16 windows
    assert events[-1].stage == "losses-pruned"  # the pruned model's losses began, never ended


def test_cancel_while_preparing_the_run():
    events, stack = _cancel_run(TripWire("note", nth=1))
    assert [e.stage for e in events] == ["prepare"]


def test_cancel_inside_the_energy_pass_and_its_sensitivities():
    from structprune.explorer import compute_energy_profile

    cfg = PruneConfig(**{**TINY, "sensitivity_windows": 2})
    for wire in (TripWire("run_layer", inside="collect_stats", nth=2),
                 TripWire("logits_nll", inside="collect_stats", nth=3)):
        with pytest.raises(RunCancelledError) as info:
            compute_energy_profile(cfg, load_model("tiny-llama"), cancel=wire)
        assert wire.at in _raised_in(info.value) and wire.checks_after == 1


def test_cancel_inside_the_stepthrough():
    from structprune.stepthrough import admm_stepthrough

    loaded = load_model("tiny-llama")
    for wire in (TripWire("run_layer", inside="module_gram", nth=2), TripWire("admm_select", nth=3),
                 TripWire("greedy_obs_select", inside="solve_module", nth=2)):
        events = []
        with pytest.raises(RunCancelledError) as info:
            admm_stepthrough(loaded, layer=2, kind="mlp", nsamples=4, seqlen=32, on_event=events.append,
                             cancel=wire)
        assert wire.at in _raised_in(info.value) and wire.checks_after == 1
        assert events[-1].stage != "done"


def test_scopes_nest_and_stay_on_their_thread():
    outer, inner = threading.Event(), threading.Event()
    seen = []
    with cancel_scope(outer, on_window=lambda d, n: seen.append((d, n))):
        with cancel_scope(inner):
            check()
            with window_span(10, 30):
                window_done(2, 5)  # counts from the span's offset, out of its total
            inner.set()
            assert cancelled()
            other = []
            t = threading.Thread(target=lambda: other.append(cancelled()))  # another thread: no scope
            t.start()
            t.join()
            assert other == [False]
            with pytest.raises(RunCancelledError):
                window_done(3, 5)
        check()  # the inner flag left with its scope
        outer.set()
        with pytest.raises(RunCancelledError):
            check()
    check()  # outside every scope nothing is cancelled
    assert seen == [(12, 30)]


def test_stepthrough_supports_are_those_of_capped_admm_runs():
    """One ADMM run's on_iteration supports equal the final supports of runs capped at t iterations
    (what the step-through used to compute, one run per iteration)."""
    from structprune.solver import admm_select

    g = torch.Generator().manual_seed(3)
    n, d = 24, 10
    X = torch.randn(200, n, generator=g, dtype=torch.float64)
    P = torch.cat([X, torch.ones(200, 1, dtype=torch.float64)], 1)
    G = P.T @ P / 200
    Wt = torch.randn(d, n + 1, generator=g, dtype=torch.float64)
    groups = torch.arange(n).reshape(12, 2)
    kw = dict(saliency="obs", init="saliency", keep_better=False)
    seen = []
    _, trace = admm_select(Wt, G, groups, 6, max_iter=15, on_iteration=lambda t, k: seen.append((t, k.tolist())), **kw)
    assert [t for t, _ in seen] == list(range(trace.iterations + 1))
    for t, kept in seen:
        capped, _ = admm_select(Wt, G, groups, 6, max_iter=t, **kw)
        assert capped.tolist() == kept
