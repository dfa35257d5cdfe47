"""The ablation script's variants do what they say, through the engine's extension point
(`run_prune(..., method=...)`), and leave the library's methods as they are."""

import torch

import structprune.gram as gram
from benchmarks.ablations import (ABLATIONS, _output_metric, attention_frozen, output_metric, pass2_damping, report,
                                  token_weight_power)
from structprune.config import PruneConfig
from structprune.methods import get_method
from structprune.methods.structprune import StructPruneMethod
from structprune.models import load_model
from structprune.run import run_prune


def _tiny(seed: int = 0):
    loaded = load_model("tiny-llama", seed=seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm gains, so the output metric is not flat
        for m in loaded.model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
    return loaded


def test_variants_are_subclasses_and_leave_the_registry_alone():
    loaded = _tiny()
    cfg = PruneConfig(model="tiny-llama")
    for make in (attention_frozen, token_weight_power(0.5), output_metric("gain"), pass2_damping(0.1)):
        method = make(loaded, cfg)
        assert isinstance(method, StructPruneMethod) and type(method) is not StructPruneMethod
    assert get_method("structprune") is StructPruneMethod
    assert get_method("structprune")(cfg).token_weights() is gram.relative_weights


def test_token_weight_power_raises_the_relative_weights_to_p():
    y, h = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w = gram.relative_weights(y, h)
    weigh = token_weight_power(0.5)(None, PruneConfig(model="tiny-llama")).token_weights()
    assert torch.allclose(weigh(y, h), w.sqrt())
    assert torch.equal(gram.relative_weights(y, h), w)  # the library's weights are untouched


def test_pass2_damping_changes_the_solves_only():
    loaded = _tiny()
    cfg = PruneConfig(model="tiny-llama", sparsity=0.3, nsamples=4, seqlen=32, eval_windows=1)
    plain = run_prune(cfg, loaded, evaluate_dense=False).record
    damped = run_prune(cfg, loaded, evaluate_dense=False, method=pass2_damping(0.5)(loaded, cfg)).record
    assert [a["units_kept"] for a in damped["allocation"]] == [a["units_kept"] for a in plain["allocation"]]
    assert damped["calib_loss"]["pruned"] != plain["calib_loss"]["pruned"]
    assert damped["config"]["damp"] == cfg.damp  # the run's own settings are unchanged


def test_output_metric_against_an_explicit_average_of_downstream_gains():
    loaded = _tiny()
    body = loaded.model.model
    metric = _output_metric(loaded, "gain")
    n = len(body.layers)
    # the MLP of the first layer: every later layer's two norms, and the final norm
    norms = [body.layers[j].input_layernorm for j in range(1, n)] + \
            [body.layers[j].post_attention_layernorm for j in range(1, n)] + [body.norm]
    terms = [nm.weight.double() ** 2 / (nm.weight.double() ** 2).mean() for nm in norms]
    want = torch.stack(terms).mean(0)
    want = (want / want.mean()).sqrt()
    assert torch.allclose(metric[(0, "mlp")], want.detach())
    # the last layer's attention: its own MLP's norm and the final norm
    last = torch.stack([x.weight.double() ** 2 / (x.weight.double() ** 2).mean()
                        for x in (body.layers[n - 1].post_attention_layernorm, body.norm)]).mean(0)
    assert torch.allclose(metric[(n - 1, "attn")], (last / last.mean()).sqrt().detach())
    assert all(abs(float(m.pow(2).mean()) - 1) < 1e-9 for m in metric.values())


def test_attention_frozen_prunes_only_channels_and_the_output_metric_changes_the_selection():
    loaded = _tiny()
    cfg = PruneConfig(model="tiny-llama", sparsity=0.3, nsamples=4, seqlen=32, eval_windows=1)
    rec = run_prune(cfg, loaded, evaluate_dense=False, method=attention_frozen(loaded, cfg)).record
    attn = [a for a in rec["allocation"] if a["module"] == "attn"]
    assert attn and all(a["units_pruned"] == 0 for a in attn)
    assert rec["sparsity"]["achieved_prunable"] > 0.25
    plain = run_prune(cfg, loaded, evaluate_dense=False).record
    weighted = run_prune(cfg, loaded, evaluate_dense=False, method=output_metric("gain")(loaded, cfg)).record
    # the refit is row-separable, so the weights differ only where the selection (or allocation) did
    assert weighted["ppl"]["pruned"]["random"]["value"] != plain["ppl"]["pruned"]["random"]["value"]


def test_report_lists_deltas_against_the_default():
    names = [a.name for a in ABLATIONS[:2]]
    rows = [{"ablation": names[0], "sparsity": 0.3, "heldout_loss": 3.5, "ppl": {"sotu": 30.0, "brown": 60.0}},
            {"ablation": names[1], "sparsity": 0.3, "heldout_loss": 3.6, "ppl": {"sotu": 33.0, "brown": 70.0}}]
    md = report(rows)
    assert "| 3.6000 | +0.1000 | 33.00 | 70.00 |" in md and md.count("\n| ") == 3
