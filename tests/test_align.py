"""Channel alignment (`align_channels`): every MLP keeps a multiple of it, every method and
allocation scheme meets the budget to within half the largest step, bad alignments are refused."""

import numpy as np
import pytest

from structprune.adapters import adapter_for
from structprune.allocation import allocate_owl, allocate_softmax, allocate_threshold, allocate_uniform
from structprune.cli import main
from structprune.config import PruneConfig
from structprune.errors import InvalidConfigError
from structprune.models import TINY_MODELS, build_tiny
from structprune.run import run_prune
from structprune.units import layouts_of, mlp_step, module_specs

ALIGN = 32  # divides every tiny model's MLP width (96, 128)


def _specs(name, align):
    model = build_tiny(name)
    return module_specs(layouts_of(model, adapter_for(model)), align)


def _check(alloc, align):
    for sp, kept in zip(alloc.specs, alloc.units_kept):
        if sp.kind == "mlp":
            assert kept % align == 0 and kept >= align, (sp.name, kept)
    assert abs(alloc.budget_error) <= alloc.budget_tolerance
    assert alloc.budget_tolerance == max(sp.step * sp.unit_params for sp in alloc.specs) / 2


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("s", [0.1, 0.3, 0.5])
def test_every_scheme_keeps_multiples_and_meets_the_budget(name, s):
    specs = _specs(name, ALIGN)
    rng = np.random.default_rng(0)
    layers = max(sp.layer for sp in specs) + 1
    allocs = [allocate_uniform(specs, s),
              allocate_softmax(specs, rng.uniform(0.1, 10, len(specs)), s, 1.0),
              allocate_softmax(specs, rng.uniform(0.1, 10, len(specs)), s, 0.05),
              allocate_threshold(specs, [rng.uniform(0, 1, sp.n_units) for sp in specs], s),
              allocate_owl(specs, rng.uniform(1, 5, layers), s)]
    for alloc in allocs:
        _check(alloc, ALIGN)
    # an MLP may only move by whole aligned steps, so the achieved sparsity is not always the same as unaligned
    mlp = [sp for sp in specs if sp.kind == "mlp"]
    assert all(sp.step == ALIGN and sp.min_keep == ALIGN for sp in mlp)


@pytest.mark.parametrize("method, allocation", [
    ("structprune", "softmax"), ("structprune", "threshold"), ("structprune", "uniform"), ("structprune", "owl"),
    ("magnitude", "uniform"), ("wanda-sp", "uniform"), ("flap", "uniform"), ("owl", "uniform"),
    ("global-taylor", "uniform")])
def test_every_method_prunes_to_aligned_widths(method, allocation):
    cfg = PruneConfig(model="tiny-llama", method=method, allocation=allocation, sparsity=0.3, align_channels=ALIGN,
                      nsamples=4, seqlen=24, eval_windows=1, device="cpu")
    res = run_prune(cfg, evaluate_dense=False)
    adapter = adapter_for(res.model)
    widths = [lay.intermediate for lay in layouts_of(res.model, adapter)]
    assert all(w % ALIGN == 0 and w >= ALIGN for w in widths), widths
    assert any(w < 96 for w in widths)  # something was pruned from the MLPs
    tol = max(sp.step * sp.unit_params for sp in module_specs(layouts_of(build_tiny("tiny-llama"),
                                                                         adapter), ALIGN)) / 2
    params = res.record["params"]
    pruned = params["before"]["prunable"] - params["after"]["prunable"]
    assert abs(pruned - 0.3 * params["before"]["prunable"]) <= tol


@pytest.mark.parametrize("name", TINY_MODELS)
def test_pruned_models_of_every_family_keep_aligned_widths(name):
    cfg = PruneConfig(model=name, sparsity=0.4, align_channels=ALIGN, nsamples=4, seqlen=24, eval_windows=1,
                      device="cpu")
    res = run_prune(cfg, evaluate_dense=False)
    widths = [lay.intermediate for lay in layouts_of(res.model, adapter_for(res.model))]
    assert all(w % ALIGN == 0 for w in widths), widths


def test_a_width_that_is_not_a_multiple_steps_by_the_common_divisor():
    assert mlp_step(5632, 64) == 64 and mlp_step(5632, 128) == 128
    assert mlp_step(96, 64) == 32  # the tiny models' width: aligned to 32
    assert mlp_step(1000, 1) == 1


def test_an_alignment_wider_than_a_module_is_one_error_before_any_work():
    with pytest.raises(InvalidConfigError, match=r"align_channels=128 is wider than the MLP of layer 0 \(96 channels\)"):
        run_prune(PruneConfig(model="tiny-llama", align_channels=128, nsamples=4, seqlen=24, eval_windows=1,
                              device="cpu"))


def test_a_target_the_aligned_steps_cannot_hold_is_refused_before_any_pass():
    # width 96 aligned to 96: the MLPs cannot lose a channel, the heads alone cannot hold 0.8
    with pytest.raises(InvalidConfigError, match="can lose at most"):
        run_prune(PruneConfig(model="tiny-llama", align_channels=96, sparsity=0.8, nsamples=4, seqlen=24,
                              eval_windows=1, device="cpu"))


@pytest.mark.parametrize("value", [0, -64, 1.5, True])
def test_bad_alignments_are_refused_by_the_config(value):
    with pytest.raises(InvalidConfigError, match="align_channels must be"):
        PruneConfig(align_channels=value)


def test_cli_refuses_a_bad_alignment_in_one_line(capsys):
    assert main(["prune", "--model", "tiny-llama", "--align-channels", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --align-channels must be between 1 and 1024 (got 0)"]
