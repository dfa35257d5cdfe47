"""Pass 1's residual-stream statistics against the hidden states computed directly, and the unit
costs / module energies of energies.py against their formulas (docs/METHOD.md "Allocation across layers")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from structprune.adapters import adapter_for
from structprune.allocation import ModuleSpec, allocate_softmax
from structprune.config import PruneConfig
from structprune.energies import module_energies, unit_costs
from structprune.methods.structprune import StructPruneMethod
from structprune.models import build_tiny
from structprune.pipeline import Emitter, LayerStats, collect_stats
from structprune.streaming import LayerStream
from structprune.units import layouts_of, module_specs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pass1_residual_energies_equal_the_hidden_states_mean_and_harmonic_mean():
    model = build_tiny("tiny-llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    ad = adapter_for(model)
    stream = LayerStream(model, ad, "cpu")
    method = StructPruneMethod(PruneConfig(model="tiny-llama"))
    stats, _ = collect_stats(stream, ids, method.score, Emitter(stream, None, None, 0.0))
    assert len(stats) == model.config.num_hidden_layers
    for i, st in enumerate(stats):
        n2 = hidden[i].double().pow(2).sum(-1).flatten()  # the layer's input, per token
        assert st.residual_energy == pytest.approx(float(n2.mean()), rel=1e-4)
        assert st.residual_energy_hm == pytest.approx(float(1 / (1 / n2).mean()), rel=1e-4)
        assert st.residual_energy_hm <= st.residual_energy * (1 + 1e-9)  # HM <= AM


def _sink_stats():
    """Three layers of one 4-channel MLP each, equal unit saliencies. Layer 1's mean energy is
    inflated 100x by one token (as an attention sink does) while its typical token is like layer
    0's; layer 2's tokens are all 3x larger."""
    specs = [ModuleSpec(layer=i, kind="mlp", n_units=4, unit_params=10) for i in range(3)]
    sal = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    energies = ((1.0, 1.0, 50.0), (100.0, 1.1, 5.0), (3.0, 3.0, 20.0))  # mean, harmonic mean, module
    stats = [LayerStats(None, {"mlp": sal.clone()}, {"mlp": m}, residual_energy=a, residual_energy_hm=h)
             for a, h, m in energies]
    return specs, stats


def test_unit_costs_follow_each_energys_formula():
    specs, stats = _sink_stats()
    per_param = np.array([1.0, 2.0, 3.0, 4.0]) / 10
    for energy, norm in (("relative", (1.0, 1.1, 3.0)), ("residual", (1.0, 100.0, 3.0)),
                         ("module", (50.0, 5.0, 20.0))):
        costs = unit_costs(stats, specs, energy, 0.5)
        for c, d in zip(costs, norm):
            np.testing.assert_allclose(c, per_param / d, rtol=1e-12)
    # the module energy is the mean cost of the units the uniform target would remove (2 of 4)
    np.testing.assert_allclose(module_energies(stats, specs, "relative", 0.5), [0.15, 0.15 / 1.1, 0.05],
                               rtol=1e-12)


def test_relative_energy_is_not_fooled_by_a_sink_token():
    """By the mean, the sink makes layer 1 the cheapest and a low temperature prunes it most; by
    the typical token, layer 2 (3x larger tokens everywhere) is the cheapest."""
    specs, stats = _sink_stats()
    by_mean = allocate_softmax(specs, module_energies(stats, specs, "residual", 0.4), 0.4, 0.5, s_max=0.9)
    by_typical = allocate_softmax(specs, module_energies(stats, specs, "relative", 0.4), 0.4, 0.5, s_max=0.9)
    assert int(np.argmax(by_mean.sparsities)) == 1
    assert int(np.argmax(by_typical.sparsities)) == 2
    assert by_typical.sparsities[1] < by_mean.sparsities[1]


def test_relative_energy_needs_the_pass1_measurement():
    specs, stats = _sink_stats()
    stats[0].residual_energy_hm = 0.0  # e.g. statistics built without it
    with pytest.raises(ValueError, match="relative"):
        unit_costs(stats, specs, "relative", 0.3)


def test_relative_costs_on_a_real_pass1_scale_with_the_typical_token():
    model = build_tiny("tiny-llama").eval()
    ad = adapter_for(model)
    stream = LayerStream(model, ad, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    method = StructPruneMethod(PruneConfig(model="tiny-llama"))
    stats, _ = collect_stats(stream, ids, method.score, Emitter(stream, None, None, 0.0))
    specs = module_specs(layouts_of(model, ad))
    rel = unit_costs(stats, specs, "relative", 0.3)
    res = unit_costs(stats, specs, "residual", 0.3)
    for sp, a, b in zip(specs, rel, res):
        st = stats[sp.layer]
        np.testing.assert_allclose(a * st.residual_energy_hm, b * st.residual_energy, rtol=1e-10)
        assert math.isfinite(float(a.sum()))


def test_relative_gram_discounts_a_token_with_a_huge_residual():
    """One token whose residual stream is 1e4 x the others' (an attention sink) dominates the plain
    Gram of a module's input; the relative Gram weighs it by 1 / ||h + y||^2 like every token."""
    from structprune.gram import GramHook

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    p = torch.randn(1, 10, 6)
    p[0, 0] *= 100.0  # the sink's input to the module is large as well
    h = torch.randn(1, 10, 4)
    h[0, 0] *= 1e4
    plain, rel = GramHook(lin), GramHook(lin, residual=lambda: h)
    with plain, rel, torch.no_grad():
        lin(p)
    G_plain, G_rel = plain.gram.double(), rel.gram.double()
    pa = torch.cat([p[0].double(), torch.ones(10, 1, dtype=torch.float64)], 1)
    with torch.no_grad():
        w = 1.0 / (h[0].double() + lin(p[0]).double()).pow(2).sum(-1)
    torch.testing.assert_close(G_rel, (pa * w[:, None]).T @ pa / w.sum(), rtol=1e-5, atol=1e-8)
    assert float(G_rel[-1, -1]) == pytest.approx(1.0, abs=1e-6)  # the solvers' convention holds
    sink_plain = float(pa[0, :-1].pow(2).sum()) / 10 / float(G_plain.diagonal()[:-1].sum())
    sink_rel = float(w[0] * pa[0, :-1].pow(2).sum()) / float(w.sum()) / float(G_rel.diagonal()[:-1].sum())
    assert sink_plain > 0.95 and sink_rel < 0.01


def test_run_layer_builds_no_autograd_graph_and_exposes_its_batch_only_inside():
    """Streaming never needs gradients (a graph would keep every activation of the layer alive)."""
    from structprune.streaming import Batches

    model = build_tiny("tiny-llama").eval()
    stream = LayerStream(model, adapter_for(model), "cpu")
    x = stream.embed(torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)))
    with stream.layer_on_device(0) as layer:
        out = stream.run_layer(0, layer, Batches(x.tensors))
    assert not any(t.requires_grad for t in out.tensors)
    with pytest.raises(RuntimeError, match="inside run_layer"):
        stream.batch_input()
