"""The engine's public passes against references computed another way: sensitivities against a
whole-model forward, the dense target's damping against its closed form, pass 2's token weights
taken from pass 1 explicitly, and `run` equal to the passes called one by one."""

import copy

import pytest
import torch

from structprune.adapters import set_output_bias
from structprune.allocation import allocate_uniform
from structprune.config import PruneConfig
from structprune.engine import Pass1, PruneEngine
from structprune.methods import get_method
from structprune.models import build_tiny
from structprune.streaming import window_nll

CALIB = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(3))


def _engine(model, **cfg):
    cfg = PruneConfig(model="tiny-llama", sparsity=0.4, nsamples=4, seqlen=24, sensitivity_windows=2, **cfg)
    method = get_method(cfg.method)(cfg)
    return PruneEngine(model, "cpu", method), method, cfg


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_sensitivities_equal_a_whole_model_reference(name):
    dense = build_tiny(name)
    engine, method, cfg = _engine(copy.deepcopy(dense), relative_error=False)  # plain Grams, as module_gram's
    stats = engine.pass1(CALIB, sensitivity=True).stats
    uniform = allocate_uniform(engine.specs, cfg.sparsity, s_max=cfg.s_max)
    windows = CALIB[: cfg.sensitivity_windows]

    def loss(model) -> float:
        with torch.no_grad():
            return float(window_nll(model(input_ids=windows).logits, windows).sum()) / (windows.numel() - windows.shape[0])

    base = loss(dense)
    checked = 0
    for sp, k in zip(engine.specs, uniform.units_kept):
        if sp.layer not in (0, 1):
            continue
        W, b, G, lay = PruneEngine(copy.deepcopy(dense), "cpu").module_gram(CALIB, sp.layer, sp.kind)
        res = method.rule(sp.kind, sp.layer, W, b, G, lay, int(k), selector="saliency")
        model = copy.deepcopy(dense)  # the module pruned alone (units zeroed), everything else dense
        lin = engine.adapter.out_proj(engine.adapter.layers(model)[sp.layer], sp.kind)
        lin.weight.data.copy_(res.W)
        set_output_bias(lin, res.b)
        want = loss(model) - base
        got = stats[sp.layer].sensitivity[sp.kind]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (sp.layer, sp.kind)
        checked += 1
    assert checked == 4


class _Recording:
    """A method wrapper whose rule records what pass 2 hands it per module."""

    def __init__(self, method):
        self._method, self.seen = method, {}

    def __getattr__(self, name):
        return getattr(self._method, name)

    def rule(self, kind, i, W, b, G, lay, k, **kw):
        self.seen[(i, kind)] = (W.clone(), None if b is None else b.clone(), G.clone())
        return self._method.rule(kind, i, W, b, G, lay, k, **kw)


@pytest.mark.parametrize("damp", [0.01, 0.2])
def test_dense_target_uses_the_configured_damping(damp):
    model = build_tiny("tiny-llama")
    engine, method, _ = _engine(model, target="dense", damp=damp, allocation="uniform")
    dense = copy.deepcopy(model)
    rec = _Recording(method)
    engine.method = rec
    engine.run(CALIB)
    # the first module pruned: its input on the pruned path is the dense one, so the cross-Gram C
    # is W_dense G and the target is W_dense G (G + damp * mean(diag G) I)^-1
    (layer, kind), (W, b, G) = next(iter(rec.seen.items()))
    assert layer == 0
    lin = engine.adapter.out_proj(engine.adapter.layers(dense)[0], kind)
    W_dense = torch.cat([lin.weight.detach().double(), torch.zeros(lin.out_features, 1, dtype=torch.float64)], 1)
    Gd = G.double()
    lam = damp * Gd.diagonal().mean()
    want = W_dense @ Gd @ torch.linalg.inv(Gd + lam * torch.eye(Gd.shape[0], dtype=torch.float64))
    got = torch.cat([W.double(), b.double()[:, None]], 1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, W_dense, rtol=1e-3, atol=1e-5)  # damping pulls the target off W_dense


def test_pass2_weighs_tokens_as_the_pass1_it_is_given():
    model = build_tiny("tiny-llama")
    engine, method, _ = _engine(copy.deepcopy(model))
    p1 = engine.pass1(CALIB)
    assert p1.weigh is method.token_weights() and p1.weigh is not None
    keep = engine.allocate(p1).keep
    weighted = engine.pass2(CALIB, keep, p1)
    plain_engine, _, _ = _engine(copy.deepcopy(model))
    plain = plain_engine.pass2(CALIB, keep, Pass1(p1.stats, p1.calib_loss, None))
    errors = lambda infos: [i["err_after_refit"] for i in infos if not i.get("skipped")]  # noqa: E731
    assert errors(weighted) != errors(plain)


def test_run_equals_the_passes_one_by_one():
    model = build_tiny("tiny-opt")
    a, _, _ = _engine(copy.deepcopy(model))
    b, _, _ = _engine(copy.deepcopy(model))
    out = a.run(CALIB)
    p1 = b.pass1(CALIB)
    plan = b.allocate(p1)
    infos = b.pass2(CALIB, plan.keep, p1)
    assert [i["kept"] for i in out.modules] == [i["kept"] for i in infos]
    assert list(out.allocation.units_kept) == list(plan.allocation.units_kept)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert out.peak_bytes == b.ledger.peak > 0


def test_module_gram_and_nll_need_no_method():
    model = build_tiny("tiny-llama")
    engine = PruneEngine(model, "cpu")
    W, b, G, lay = engine.module_gram(CALIB, 1, "mlp")
    assert G.shape == (lay.intermediate + 1, lay.intermediate + 1) and G[-1, -1] == pytest.approx(1.0)
    nll, tokens = engine.nll(CALIB)
    with torch.no_grad():
        whole = window_nll(model(input_ids=CALIB).logits, CALIB)
    assert tokens == CALIB.shape[0] * (CALIB.shape[1] - 1)
    assert torch.allclose(nll, whole, rtol=1e-5)
    with pytest.raises(ValueError, match="without a method"):
        engine.pass1(CALIB)
