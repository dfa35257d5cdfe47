"""The baselines (docs/METHOD.md "Baselines") against independent computations on tiny random models:
scores by explicit loops and norms, FLAP's bias compensation against the dense output mean,
global-taylor gradients against finite differences, budgets, the record schema, and the memory
estimate of the O(N) reference."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from structprune.adapters import adapter_for
from structprune.allocation import allocate_owl
from structprune.config import PruneConfig
from structprune.estimate import estimate_memory, model_params
from structprune.evaluation import perplexity_whole
from structprune.gram import GramHook
from structprune.methods import available_methods, get_method
from structprune.methods.baselines import FLAP, Magnitude, WandaSP
from structprune.methods.common import group_aligned_costs
from structprune.methods.global_taylor import calibration_loss_gradients
from structprune.models import build_tiny, tiny_config
from structprune.pipeline import Emitter, collect_stats
from structprune.run import run_prune
from structprune.streaming import LayerStream
from structprune.units import layouts_of, module_specs, unit_groups

BASELINES = ("magnitude", "wanda-sp", "flap", "owl", "global-taylor")
SCHEMES = {"magnitude": "uniform", "wanda-sp": "uniform", "flap": "al-am", "owl": "owl",
           "global-taylor": "global-taylor"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine
    (about 20x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


IDS = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(3))  # (2 windows, 6 tokens)


def _cfg(model="tiny-llama", method="wanda-sp", **kw) -> PruneConfig:
    base = dict(model=model, method=method, sparsity=0.4, nsamples=4, seqlen=24, eval_windows=1,
                sensitivity_windows=2, device="cpu")
    return PruneConfig(**{**base, **kw})


def _module_inputs(model, layer_idx: int, kind: str):
    """The explicit inputs X (T, n) of a module's output projection on IDS, and its Gram."""
    ad = adapter_for(model)
    layer = ad.layers(model)[layer_idx]
    lin = ad.out_proj(layer, kind)
    seen = []
    handle = lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with GramHook(lin) as g, torch.no_grad():
            model(input_ids=IDS)
    finally:
        handle.remove()
    return torch.cat(seen).double(), g.gram, lin, ad.layout(layer)


# --------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_wanda_sp_scores_by_explicit_loops(kind):
    model = build_tiny("tiny-llama")
    X, G, lin, lay = _module_inputs(model, 1, kind)
    W = lin.weight.detach().double()
    T, n = X.shape
    norms = []  # ||X_j|| = sqrt(sum_t x_tj^2), token by token
    for j in range(n):
        acc = 0.0
        for t in range(T):
            acc += float(X[t, j]) ** 2
        norms.append(math.sqrt(acc))
    col = [sum(abs(float(W[i, j])) for i in range(W.shape[0])) * norms[j] for j in range(n)]
    groups, _ = unit_groups(lay, kind)
    expected = torch.tensor([sum(col[j] for j in g.tolist()) for g in groups], dtype=torch.float64)
    got = WandaSP(_cfg()).score(kind, lin.weight.detach(), None, G, lay) * math.sqrt(T)  # scale: E vs sum
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    # the rule keeps the top units (equal per KV group), zeroes the rest, leaves the bias alone
    k_keep = lay.n_heads // 2 if kind == "attn" else 40
    res = WandaSP(_cfg()).rule(kind, 1, lin.weight.detach(), None, G, lay, k_keep)
    if kind == "attn":
        per = lay.n_heads // lay.n_kv_heads
        top = [g * per + int(i) for g in range(lay.n_kv_heads)
               for i in expected[g * per:(g + 1) * per].topk(k_keep // lay.n_kv_heads).indices]
    else:
        top = expected.topk(k_keep).indices.tolist()
    assert res.kept.tolist() == sorted(top)
    assert res.b is None
    kept_cols = groups[res.kept].reshape(-1)
    torch.testing.assert_close(res.W[:, kept_cols], lin.weight.detach()[:, kept_cols])
    assert float(res.W.abs().sum()) == pytest.approx(float(lin.weight.detach()[:, kept_cols].abs().sum()))


@pytest.mark.parametrize("name,kind", [("tiny-llama", "attn"), ("tiny-llama", "mlp"), ("tiny-opt", "attn"),
                                       ("tiny-opt", "mlp")])
def test_flap_scores_and_bias_compensation_keep_the_mean_output(name, kind):
    model = build_tiny(name)
    X, G, lin, lay = _module_inputs(model, 0, kind)
    W = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    # independent WIFV: population variance of the explicit inputs, squared for attention (FLAP)
    m = X.var(0, unbiased=False) * W.double().pow(2).sum(0)
    if kind == "attn":
        m = m ** 2
    z = (m - m.mean()) / m.std()
    groups, _ = unit_groups(lay, kind)
    torch.testing.assert_close(FLAP(_cfg()).score(kind, W, b, G, lay), z[groups].mean(1), rtol=1e-4, atol=1e-6)

    k_keep = lay.n_heads // 2 if kind == "attn" else lay.intermediate // 3
    res = FLAP(_cfg(method="flap")).rule(kind, 0, W, b, G, lay, k_keep)
    bias = b.double() if b is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    dense_mean = (X @ W.double().T + bias).mean(0)  # E[W x + b] on the calibration inputs
    pruned_mean = (X @ res.W.double().T + res.b.double()).mean(0)  # E[W' x + b']
    torch.testing.assert_close(pruned_mean, dense_mean, rtol=1e-4, atol=1e-5)
    removed = torch.ones(W.shape[1], dtype=torch.bool)
    removed[groups[res.kept].reshape(-1)] = False
    assert bool((res.W[:, removed] == 0).all()) and bool((res.W[:, ~removed] == W[:, ~removed]).all())
    assert res.info["err_after_refit"] <= res.info["err_no_refit"] + 1e-9  # the mean shift only helps


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@torch.no_grad()
def test_magnitude_norms_and_pruned_rows(name):
    model = build_tiny(name)
    ad = adapter_for(model)
    layer = ad.layers(model)[0]
    lay = ad.layout(layer)
    hd = lay.head_dim
    heads = []
    for h in range(lay.n_heads):  # explicit slices of every parameter of head h
        parts = []
        for role in ("q", "k", "v") if lay.mha else ("q",):
            lin = ad.module(layer, role)
            parts.append(lin.weight[h * hd:(h + 1) * hd].reshape(-1))
            if lin.bias is not None:
                parts.append(lin.bias[h * hd:(h + 1) * hd])
        parts.append(ad.module(layer, "o").weight[:, h * hd:(h + 1) * hd].reshape(-1))
        heads.append(float(torch.cat(parts).double().norm()))
    chans = []
    for c in range(lay.intermediate):
        parts = [ad.module(layer, "mlp_out").weight[:, c]]
        for j in range(len(ad.spec.mlp_in)):
            lin = ad.module(layer, f"mlp_in{j}")
            parts.append(lin.weight[c])
            if lin.bias is not None:
                parts.append(lin.bias[c:c + 1])
        chans.append(float(torch.cat(parts).double().norm()))
    torch.testing.assert_close(Magnitude.unit_norms(ad, layer, lay, "attn"), torch.tensor(heads, dtype=torch.float64))
    torch.testing.assert_close(Magnitude.unit_norms(ad, layer, lay, "mlp"), torch.tensor(chans, dtype=torch.float64))

    # the pruned model keeps exactly the largest-norm channels of layer 0 (uniform allocation)
    res = run_prune(_cfg(name, "magnitude"), evaluate_dense=False)
    rec0 = next(r for r in res.record["allocation"] if r["layer"] == 0 and r["module"] == "mlp")
    top = sorted(np.argsort(chans)[::-1][: rec0["units_kept"]].tolist())
    pruned_down = adapter_for(res.model).module(ad.layers(res.model)[0], "mlp_out").weight
    torch.testing.assert_close(pruned_down, ad.module(layer, "mlp_out").weight[:, top])
    # no calibration pass (no "dense" loss): only the pruned model's in-sample and held-out losses
    assert res.record["calib_loss"].keys() == {"pruned", "pruned_windows", "heldout", "heldout_windows"}


def test_group_aligned_costs_price_chunks_as_the_per_group_selection():
    model = build_tiny("tiny-llama")
    lay = adapter_for(model).layout(adapter_for(model).layers(model)[0])
    assert (lay.n_heads, lay.n_kv_heads) == (8, 2)
    costs = np.array([4.0, 1.0, 3.0, 2.0, 10.0, 13.0, 11.0, 12.0])  # group 0: heads 0-3, group 1: 4-7
    got = group_aligned_costs(costs, lay, "attn")
    # rank r of each group gets the mean of the r-th cheapest of both groups: (1+10)/2, (2+11)/2, ...
    np.testing.assert_allclose(got, [8.5, 5.5, 7.5, 6.5, 5.5, 8.5, 6.5, 7.5])
    np.testing.assert_array_equal(group_aligned_costs(costs, lay, "mlp"), costs)


# --------------------------------------------------------------------------------------------- allocation


def _pass1(name: str, method):
    model = build_tiny(name)
    ad = adapter_for(model)
    stream = LayerStream(model, ad, "cpu")
    ids = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(0))
    stats, _ = collect_stats(stream, ids, method.score, Emitter(stream, None, None, 0.0))
    return module_specs(layouts_of(model, ad)), stats


def test_flap_al_am_prunes_the_lowest_pooled_standardized_scores():
    cfg = _cfg("tiny-llama-mha", "flap", sparsity=0.3)
    specs, stats = _pass1("tiny-llama-mha", FLAP(cfg))
    alloc, _ = FLAP(cfg).allocate(specs, stats)
    # reference: pool every unit's z-score, prune ascending until the parameters are closest to B
    z = np.concatenate([stats[sp.layer].scores[sp.kind].numpy() for sp in specs])
    mod = np.concatenate([np.full(sp.n_units, m) for m, sp in enumerate(specs)])
    cost = np.array([specs[m].unit_params for m in mod], dtype=np.float64)
    order = np.argsort(z, kind="stable")
    cum = np.concatenate([[0], np.cumsum(cost[order])])
    budget = 0.3 * sum(sp.params for sp in specs)
    j = int(np.argmin(np.abs(cum - budget)))
    expected = np.bincount(mod[order[:j]], minlength=len(specs))
    np.testing.assert_array_equal(alloc.pruned_units, expected)
    assert alloc.scheme == "al-am"
    assert len(set(alloc.sparsities.round(6))) > 1  # not uniform


def test_owl_allocates_from_outlier_ratios_whatever_cfg_allocation():
    cfg = _cfg("tiny-llama", "owl", allocation="uniform", owl_lambda=0.1)
    specs, stats = _pass1("tiny-llama", get_method("owl")(cfg))
    alloc, info = get_method("owl")(cfg).allocate(specs, stats)
    d = np.array([st.outlier_ratio for st in stats])
    ref = allocate_owl(specs, d, 0.4, lam=0.1)
    np.testing.assert_array_equal(alloc.pruned_units, ref.pruned_units)
    assert alloc.scheme == "owl" and info["layer_values"] == d.tolist()


# --------------------------------------------------------------------------------------------- global-taylor


def _nll(model, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
    return float(-logp.mean())


def test_global_taylor_gradients_match_finite_differences():
    model = build_tiny("tiny-llama-mha").double()  # 2 layers, fp64 for clean differences
    ids = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(1))
    loss = calibration_loss_gradients(model, ids, torch.device("cpu"), batch_size=2)
    whole = perplexity_whole(model, ids, torch.device("cpu"))
    assert loss == pytest.approx(whole.nll / whole.tokens, rel=1e-6)  # the evaluator's NLL is in fp32
    assert loss == pytest.approx(_nll(model, ids), rel=1e-10)
    ad = adapter_for(model)
    layers = ad.layers(model)
    probes = [ad.module(layers[0], "q").weight, ad.module(layers[1], "o").weight, ad.module(layers[1], "v").weight,
              ad.module(layers[1], "mlp_in0").weight, ad.module(layers[0], "mlp_out").weight]
    # central differences at each matrix's largest gradient; eps 1e-3 because RMSNorm and the
    # rotary tables compute in fp32 even in an fp64 model (smaller steps drown in that noise)
    eps = 1e-3
    for p in probes:
        idx = divmod(int(p.grad.abs().argmax()), p.shape[1])
        w0 = float(p.data[idx])
        p.data[idx] = w0 + eps
        up = _nll(model, ids)
        p.data[idx] = w0 - eps
        down = _nll(model, ids)
        p.data[idx] = w0
        assert float(p.grad[idx]) == pytest.approx((up - down) / (2 * eps), rel=2e-3)

    # the importance of head 1 of layer 1: |w g| summed over its q/k/v rows and o columns (MHA)
    from structprune.methods.common import unit_parameter_sums
    from structprune.methods.global_taylor import _taylor

    layer = ad.layers(model)[1]
    lay = ad.layout(layer)
    hd, h = lay.head_dim, 1
    w = {r: ad.module(layer, r).weight for r in ("q", "k", "v", "o")}
    expect = sum(float((w[r].detach() * w[r].grad)[h * hd:(h + 1) * hd].abs().sum()) for r in ("q", "k", "v"))
    expect += float((w["o"].detach() * w["o"].grad)[:, h * hd:(h + 1) * hd].abs().sum())
    got = unit_parameter_sums(ad, layer, lay, "attn", _taylor)
    assert float(got[h]) == pytest.approx(expect, rel=1e-12)


def test_global_taylor_accounted_memory_equals_the_estimate():
    cfg = _cfg("tiny-llama", "global-taylor", batch_size=2)
    rec = run_prune(cfg, evaluate_dense=False).record
    est = estimate_memory(tiny_config("tiny-llama"), "global-taylor", nsamples=4, seqlen=24, dtype="float32",
                          batch_size=2)
    assert rec["memory"]["kind"] == "accounted-cpu"
    assert rec["memory"]["peak_bytes"] == est["peak_bytes"]
    assert est["model_params"] == model_params(tiny_config("tiny-llama"))
    layerwise = estimate_memory(tiny_config("tiny-llama"), "wanda-sp", nsamples=4, seqlen=24, batch_size=2)
    assert est["peak_bytes"] > 2 * layerwise["peak_bytes"]  # O(N) vs one layer


# --------------------------------------------------------------------------------------------- budget + schema


@pytest.fixture(scope="module")
def records():
    """One record per (model, method), computed once for the module."""
    cache = {}

    def get(name, method):
        if (name, method) not in cache:
            res = run_prune(_cfg(name, method), evaluate_dense=False)
            cache[(name, method)] = (res.record, res.model)
        return cache[(name, method)]

    return get


def test_all_baselines_are_registered():
    assert set(BASELINES) | {"structprune"} <= set(available_methods())


def test_registry_lists_builtins_and_takes_registered_variants(monkeypatch):
    from structprune.errors import InvalidConfigError
    from structprune.methods import BUILTIN_METHODS, register, registry
    from structprune.methods.structprune import StructPruneMethod

    assert list(BUILTIN_METHODS) == available_methods()[: len(BUILTIN_METHODS)]
    assert all(get_method(name) is cls for name, cls in BUILTIN_METHODS.items())
    with pytest.raises(InvalidConfigError, match="unknown method 'no-such-method'"):
        get_method("no-such-method")

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after the test

    class Variant(StructPruneMethod):
        name = "structprune-variant"

    register("structprune-variant", Variant)
    assert get_method("structprune-variant") is Variant and "structprune-variant" in available_methods()
    with pytest.raises(TypeError):
        register("not-a-method", object)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("method", BASELINES)
def test_budget_met_within_one_unit_per_module(records, name, method):
    rec, model = records(name, method)
    assert rec["allocation_scheme"] == SCHEMES[method]
    sp = rec["sparsity"]
    dense = build_tiny(name)
    max_chunk = max(s.step * s.unit_params for s in module_specs(layouts_of(dense, adapter_for(dense))))
    assert abs(sp["allocation_pruned_params"] - sp["allocation_target_params"]) <= max_chunk
    # the model holds what the allocation says, module by module
    ad = adapter_for(model)
    layouts = layouts_of(model, ad)
    for r in rec["allocation"]:
        lay = layouts[r["layer"]]
        assert (lay.n_heads if r["module"] == "attn" else lay.intermediate) == r["units_kept"]
    kept = {(m["layer"], m["module"]): m["kept"] for m in rec["modules"]}
    assert all(kept[(r["layer"], r["module"])] == r["units_kept"] for r in rec["allocation"])
    # achieved prunable sparsity = the allocation's pruned parameters
    prunable = rec["params"]["before"]["prunable"]
    assert sp["achieved_prunable"] * prunable == pytest.approx(sp["allocation_pruned_params"], abs=0.5)
    assert abs(sp["achieved_prunable"] - 0.4) * prunable <= max_chunk
    assert math.isfinite(rec["calib_loss"]["pruned"])


def _shape(x):
    """A record's structure: dict keys (recursively for the fixed sections), types elsewhere."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


@pytest.mark.parametrize("method", BASELINES)
def test_record_schema_matches_structprune(records, method):
    ref, _ = records("tiny-llama", "structprune")
    rec, _ = records("tiny-llama", method)
    assert rec.keys() == ref.keys()
    for key in ref:
        assert type(rec[key]) is type(ref[key]) or rec[key] is None or ref[key] is None, key
    for section in ("sparsity", "params", "model", "config", "ppl"):
        assert _shape(rec[section]) == _shape(ref[section]), section
    assert rec["memory"].keys() == ref["memory"].keys()
    assert [r.keys() for r in rec["allocation"]] == [r.keys() for r in ref["allocation"]]
    assert all({"layer", "module", "kept"} <= m.keys() for m in rec["modules"])
    assert len(rec["modules"]) == len(ref["modules"])
    assert {"pruned", "pruned_windows"} <= rec["calib_loss"].keys()
    assert rec["method"] == method


def test_methods_do_not_modify_the_loaded_model():
    from structprune.models import load_model

    loaded = load_model("tiny-llama")
    before = copy.deepcopy(loaded.model.state_dict())
    run_prune(_cfg("tiny-llama", "global-taylor"), loaded=loaded, evaluate_dense=False)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in loaded.model.parameters())
