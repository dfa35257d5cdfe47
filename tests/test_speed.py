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


def test_speed_section_sizes_the_pruned_model_and_leaves_dense_alone():
    from structprune.speed import QUICK_PROTOCOL, n_params, speed_section

    dense = build_tiny("tiny-llama").eval()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    keep = [{"attn": 2, "mlp": 48} for _ in layouts_of(dense, adapter_for(dense))]
    pruned = shrink_to_counts(copy.deepcopy(dense), keep)
    sec = speed_section(pruned, dense, "cpu", torch.float32, repeats=1)
    assert sec["size"]["bytes"] == n_params(pruned) * 4 and sec["size"]["dense_bytes"] == n_params(dense) * 4
    assert 0 < sec["size"]["ratio"] < 1
    assert set(sec["speedup"]) == {"prefill 1x128", "decode b1 (16 tokens after 32)"}
    assert all(x > 0 for x in sec["speedup"].values()) and sec["protocol"] == QUICK_PROTOCOL
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    # a bf16 request converts a copy of dense, never dense itself
    half = speed_section(pruned, dense, "cpu", torch.bfloat16, repeats=1)
    assert half["dtype"] == "bfloat16" and half["size"]["bytes"] == n_params(pruned) * 2
    assert next(dense.parameters()).dtype == torch.float32


def test_a_record_with_speed_feeds_the_compare_frame_and_the_trade_off_chart():
    from structprune import plots, reports

    rec = {"run_id": "r1", "method": "structprune", "config": {"allocation": "softmax", "energy": "relative",
           "temperature": 1.0}, "allocation_scheme": "softmax", "sparsity": {"target": 0.3},
           "ppl": {"dense": {"sotu": {"value": 20.0}}, "pruned": {"sotu": {"value": 30.0, "protocol": "p"}}},
           "speed": {"device": "cpu", "dtype": "float32", "size": {"ratio": 0.7},
                     "speedup": {"prefill 1x128": 1.3, "decode b1 (16 tokens after 32)": 1.1}}}
    old = {**rec, "run_id": "r0", "speed": None}
    df = reports.runs_frame([rec, old])
    row = df[df["run_id"] == "r1"].iloc[0]
    assert (row["speedup_prefill"], row["speedup_decode"], row["size_ratio"]) == (1.3, 1.1, 0.7)
    assert df[df["run_id"] == "r0"]["speedup_prefill"].isna().all()
    fig = plots.ppl_vs_speedup_figure(df, "p")
    pts = [t for t in fig.data if t.name != "dense"]
    assert [list(t.x) for t in pts] == [[1.3]] and [list(t.y) for t in pts] == [[30.0]]
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert [list(t.x) for t in fig.data if t.name == "dense"] == [[1.0]]


def test_the_model_card_tabulates_the_measured_speed_and_says_when_there_is_none():
    from structprune.model_card import model_card

    shapes = [{"n_heads": 4, "n_kv_heads": 2, "intermediate": 64, "o_bias": False, "mlp_out_bias": False}]
    speed = {"device": "cpu", "dtype": "float32", "loadavg": [0.5, 0.5, 0.5], "cpu_count": 2, "protocol": "p",
             "size": {"ratio": 0.7}, "rows": [
                 {"shape": "prefill 1x128", "model": "dense", "tokens_per_s": 100.0, "speedup": 1.0},
                 {"shape": "prefill 1x128", "model": "pruned", "tokens_per_s": 130.0, "speedup": 1.3}]}
    card = model_card({"speed": speed}, shapes, False, "llama")
    assert "| prefill 1x128 | 100 | 130 | 1.30x |" in card and "0.70x of the dense model" in card
    assert "Not measured for this run" in model_card({}, shapes, False, "llama")
    assert "on disk" in model_card({"speed": {"skipped": "weights on disk"}}, shapes, False, "llama")


def test_smollm2_speed_records_are_attached_to_their_quality_runs(tmp_path):
    from structprune import reports

    t = lambda model, label, tps: {"model": model, "label": label, "tokens_per_s": tps}  # noqa: E731
    rec = {"device": "cpu", "dtype": "float32", "repeats": 5, "warmup": 1,
           "params": {"dense": 100, "align64": 70, "align1": 69},
           "timings": [t("dense", "prefill 1x512", 10.0), t("align64", "prefill 1x512", 13.0),
                       t("align1", "prefill 1x512", 12.0)],
           "speedup": {"align64 | prefill 1x512": 1.3, "align1 | prefill 1x512": 1.2},
           "allocations": {"align64": {"run": "run-a64"}, "align1": {"run": "run-missing"}},
           "load_before": {"loadavg": [0.4, 0.5, 0.6], "cpu_count": 2}}
    (tmp_path / "smollm2__cpu__float32__s0.30.json").write_text(json.dumps(rec))
    (tmp_path / "quality").mkdir()
    (tmp_path / "quality" / "run-a64.json").write_text(json.dumps({"run_id": "q", "ppl": {}}))
    assert bench.attach_to_quality(tmp_path, tmp_path / "quality") == [tmp_path / "quality" / "run-a64.json"]
    got = json.loads((tmp_path / "quality" / "run-a64.json").read_text())
    assert got["speed"]["speedup"] == {"prefill 1x512": 1.3} and got["speed"]["size"]["ratio"] == 0.7
    assert [(r["model"], r["tokens_per_s"]) for r in got["speed"]["rows"]] == [("dense", 10.0), ("pruned", 13.0)]
    assert reports.speed_columns(got)["speedup_prefill"] == 1.3
