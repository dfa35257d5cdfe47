"""structprune/speed.py and a CPU smoke run of benchmarks/speed.py (no speed is asserted: speed
is measured in benchmarks, never by timed tests)."""

import copy
import json

import pytest
import torch

from benchmarks import speed as bench
from structprune.adapters import adapter_for
from structprune.models import build_tiny
from structprune.speed import Shape, compare_speed, quick_speed, shrink_to_counts, speedups
from structprune.units import layouts_of


def test_shrink_to_counts_gives_the_asked_shapes_and_a_working_model():
    model = build_tiny("tiny-llama")
    keep = [{"attn": 4, "mlp": 64}, {"attn": 8, "mlp": 32}, {"attn": 2, "mlp": 96}, {"attn": 6, "mlp": 64}]
    small = shrink_to_counts(copy.deepcopy(model), keep)
    lays = layouts_of(small, adapter_for(small))
    assert [(lay.n_heads, lay.intermediate) for lay in lays] == [(k["attn"], k["mlp"]) for k in keep]
    out = small(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert out.shape == (1, 4, 512) and torch.isfinite(out).all()


def test_compare_speed_interleaves_and_counts_every_repeat():
    model = build_tiny("tiny-llama")
    shapes = [Shape("prefill", 2, 8), Shape("decode", 1, 4, 3)]
    steps = []
    timings = compare_speed({"a": model, "b": model}, shapes, repeats=3, warmup=1, on_step=steps.append)
    assert [(t.model, t.shape) for t in timings] == [(m, s) for s in shapes for m in ("a", "b")]
    assert all(len(t.seconds) == 3 and min(t.seconds) > 0 for t in timings)
    assert timings[0].shape.tokens == 16 and timings[2].shape.tokens == 3
    assert len(steps) == 2 * 4  # per shape: one warm-up and three repeats
    ratio = speedups(timings, "a")
    assert ratio[("a", "prefill 2x8")] == 1.0 and ratio[("b", "prefill 2x8")] > 0


def test_quick_speed_reports_both_models_with_the_load():
    model = build_tiny("tiny-llama")
    rep = quick_speed(model, model, repeats=1)
    assert {r["model"] for r in rep["rows"]} == {"dense", "pruned"} and len(rep["rows"]) == 4
    assert len(rep["loadavg"]) == 3 and rep["repeats"] == 1


@pytest.mark.parametrize("bad", [dict(kind="train", batch=1, length=8), dict(kind="decode", batch=1, length=8)])
def test_bad_shapes_are_refused(bad):
    with pytest.raises(ValueError):
        Shape(**bad)


def test_cpu_smoke_run_of_the_speed_benchmark(tmp_path):
    bench.main(["--cpu-smoke", "--out", str(tmp_path), "--sparsities", "0.3", "--aligns", "32", "1",
                "--repeats", "2"])
    rec = json.loads((tmp_path / "smoke__s0.30.json").read_text())
    assert rec["interleaved"] and rec["repeats"] == 2 and len(rec["load_before"]["loadavg"]) == 3
    assert {t["model"] for t in rec["timings"]} == {"dense", "align32", "align1"}
    assert all(len(t["seconds"]) == 2 for t in rec["timings"])
    kept = rec["allocations"]["align32"]["kept"]
    assert all(k["mlp"] % 32 == 0 for k in kept) and any(k["mlp"] < 96 for k in kept)
    assert abs(rec["allocations"]["align32"]["achieved_sparsity"] - 0.3) < 0.05
    assert rec["params"]["align32"] < rec["params"]["dense"]
