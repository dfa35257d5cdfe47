"""The CPU transient-memory probe (structprune/memprobe.py) on allocations of known size."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from structprune.memprobe import ProbeResult, measure_peak, probe

MB = 1_000_000
ROOT = Path(__file__).resolve().parent.parent


def test_probe_peak_of_known_allocations():
    before = torch.ones(250_000)  # 1 MB that exists before the region
    with probe() as r:
        a = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        b = torch.empty(1_000_000, dtype=torch.float64)  # 8 MB
        del a
        c = torch.empty(500_000, dtype=torch.float32)  # 2 MB: 8 + 2 < 4 + 8
        del before  # freed inside, allocated before: the profiler does not report its size
        d = torch.empty(500_000, dtype=torch.float32)  # 2 MB: 8 + 2 + 2 = 12 MB, = the peak
        del b
    assert r.peak == 12 * MB
    assert r.retained == (2 + 2) * MB
    assert r.largest == 8 * MB and r.allocations == 4 and r.allocated_bytes == 16 * MB
    del c, d


def test_measure_peak_counts_temporaries_of_an_expression():
    x = torch.ones(500, 500, dtype=torch.float64)  # 2 MB
    y, r = measure_peak(lambda: (x @ x + x).sum())  # x @ x (2 MB), + x (2 MB) live together
    assert float(y) == 500 * 500 * 501
    assert r.peak == 4 * MB


def test_from_events_orders_by_time():
    r = ProbeResult.from_events([(3, -5), (1, 5), (2, 7)])
    assert (r.peak, r.retained, r.allocations) == (12, 7, 2)


def test_solver_transients_match_the_byte_formulas():
    """The measured peak of a module's saliencies and solve stays within 15% of what the ledger
    holds for them (memory.saliency_bytes / solver_bytes), heads and channels alike."""
    from structprune.adapters import LayerLayout
    from structprune.config import PruneConfig
    from structprune.memory import saliency_bytes, solver_bytes
    from structprune.methods.structprune import StructPruneMethod

    method = StructPruneMethod(PruneConfig(sparsity=0.3))
    g = torch.Generator().manual_seed(0)
    for kind, d, n, group in (("attn", 1024, 1024, 128), ("mlp", 384, 1024, 1)):
        X = torch.randn(2 * n, n, generator=g) * torch.rand(n, generator=g)
        Xa = torch.cat([X, torch.ones(2 * n, 1)], 1)
        G = Xa.T @ Xa / (2 * n)
        W = (torch.randn(d, n, generator=g) / n ** 0.5).to(torch.bfloat16)
        lay = LayerLayout(d, n // 128, n // 128, 128, n if kind == "mlp" else 4 * d, True, False, False)
        units = n // group
        with probe() as r:
            method.score(kind, W, None, G, lay)
        assert abs(r.peak / saliency_bytes(d, n, group) - 1) < 0.15
        with probe() as r:
            method.rule(kind, 0, W, None, G, lay, int(round(0.7 * units)))
        assert abs(r.peak / solver_bytes(d, n, group) - 1) < 0.15


def test_gram_hook_holds_one_fp32_copy_of_a_batch():
    from structprune.gram import GramHook

    lin = torch.nn.Linear(300, 4, bias=False)
    x = torch.randn(2, 50, 300).to(torch.bfloat16)
    hook = GramHook(lin)
    with probe() as r:
        hook._pre_hook(lin, (x,))
    assert 0 <= r.peak - 100 * 301 * 4 < 64  # one (T, n+1) fp32 buffer (and a scalar)


def test_block_refit_allocations_match_the_byte_formula():
    """What fit_layer allocates (the targets aside: host memory, like every activation stream) is
    within 15% of memory.refine_bytes on a real layer shape, LayerNorm and RMSNorm families alike."""
    import copy

    import benchmarks.gpu_configs as gcfg
    from structprune.adapters import adapter_for
    from structprune.memory import activation_bytes, refine_bytes
    from structprune.refine import fit_layer
    from structprune.streaming import LayerStream

    for name in ("opt-125m", "smollm2-135m"):
        cfg = gcfg.get_config(name, 1)
        cfg.vocab_size = 512
        model = gcfg.build_random(cfg, torch.float32)
        ad = adapter_for(model)
        stream = LayerStream(model, ad, "cpu")
        n, seqlen = 4, 128
        x = stream.embed(torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(0)))
        with stream.layer_on_device(0) as layer:
            dense = copy.deepcopy(layer)
            with probe() as r:
                fit_layer(stream, 0, layer, dense, x, epochs=1, lr=1e-5)
            lay = ad.layout(layer)
        measured = r.peak - n * activation_bytes(1, seqlen, lay.hidden, 4)
        assert abs(measured / refine_bytes(lay, ad.spec.norm, 1, seqlen, 4) - 1) < 0.15, name


STALE_SIZE = """
import torch
from structprune.memprobe import probe
with probe():
    t = torch.empty(300_000)  # 1.2 MB, allocated under a profile
del t  # freed with no profile running: torch's allocator keeps its size
before = torch.empty(250_000)  # 1 MB, no profile: the heap hands out the same address
with probe() as r:
    a = torch.empty(1_000_000)  # 4 MB
    del before  # reported as a free of 1.2 MB
print(r.retained, r.peak)
"""


def test_a_free_of_a_block_from_before_the_region_is_not_counted_even_with_a_stale_size():
    # a mmap threshold above these sizes makes glibc reuse the heap address (as a long process does)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", STALE_SIZE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(4 * MB), str(4 * MB)]
