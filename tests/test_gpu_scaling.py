"""The GPU benchmark's whole flow on the CPU (`--cpu-smoke`): records, summary, budget, failures.

The GPU run happens once, on a lent machine with a bare image; these tests make sure the script
gets there in working order: every record has its fields, the CPU-accounted peaks equal the
estimator (which replays the same accounting), a spent budget or an out-of-memory error becomes a
record instead of a crash, and nothing outside torch / transformers / structprune is imported.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
gs = importlib.import_module("gpu_scaling")
gcfg = importlib.import_module("gpu_configs")

FIELDS = ("kind", "config_name", "family", "n_params", "n_layers", "hidden", "method", "nsamples", "seqlen",
          "dtype", "peak_bytes", "estimate_bytes", "estimate_error", "pass1_s", "pass2_s", "total_s", "status",
          "message", "device", "torch", "transformers", "git_commit")


def _records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("gpu-*.json"))}


# Packages the GPU machine's image does not have: they look not installed to the smoke run.
BLOCKER = """
import sys, importlib.machinery
BLOCKED = ("datasets", "pandas", "plotly", "streamlit", "pyarrow", "gguf", "accelerate")
_find = importlib.machinery.PathFinder.find_spec
def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in BLOCKED else _find(name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole --cpu-smoke flow, in a fresh interpreter where datasets, pandas, plotly and
    streamlit cannot be imported (as on the GPU machine)."""
    out = tmp_path_factory.mktemp("smoke")
    code = BLOCKER + f"""
sys.path.insert(0, {str(BENCH)!r})
import gpu_scaling
rc = gpu_scaling.main(["--cpu-smoke", "--out", {str(out)!r}])
leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
print("LEAKED", leaked)
sys.exit(rc or (3 if leaked else 0))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=BENCH.parent)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "LEAKED []" in res.stdout
    return out, _records(out)


def test_smoke_writes_every_planned_record(smoke):
    out, recs = smoke
    plan = gs.plan_runs(gs.SMOKE, "scaling,correctness,speed,long,wanda".split(","))
    for item in plan:
        name = f"gpu-{item}.json" if isinstance(item, str) else item.filename
        assert name in recs, name
        rec = recs[name]
        # every run record says what ran, how it ended and at which commit (a short git hash)
        assert rec["kind"] == (f"gpu-{item}" if isinstance(item, str) else "gpu-scaling"), name
        assert rec["status"] == "ok" or (rec["status"] == "skipped" and "not available" in rec["message"]), name
        assert re.fullmatch(r"[0-9a-f]{7,40}", rec["git_commit"] or ""), (name, rec["git_commit"])
    assert recs["gpu-summary.json"]["status_counts"]["error"] == 0


def test_scaling_records_have_the_schema_and_exact_cpu_estimates(smoke):
    _, recs = smoke
    scaling = [r for r in recs.values() if r["kind"] == "gpu-scaling"]
    assert len(scaling) >= 9
    for r in scaling:
        for f in FIELDS:
            assert f in r, (r["config_name"], r["method"], f)
        if r["method"] == "wanda-sp" and r["status"] == "skipped":
            assert "not available" in r["message"]
            continue
        assert r["status"] == "ok", (r["config_name"], r["method"], r["message"])
        assert r["memory_kind"] == "accounted-cpu" and r["dtype"] == "float32"
        assert r["peak_bytes"] > 0 and r["estimate_bytes"] > 0
        assert r["pass1_s"] > 0 and r["total_s"] == pytest.approx(r["pass1_s"] + r["pass2_s"], abs=2e-3)
        assert r["n_params"] == gcfg.n_params(gcfg.get_config(r["config_name"]))
        if r["method"] == "structprune":
            # the estimator replays the pipeline's own accounting: equal to the byte
            assert r["estimate_error"] == 0.0 and r["peak_bytes"] == r["estimate_bytes"]
            assert r["pass2_s"] > 0 and r["sensitivity"] is True


def test_truncated_depth_has_the_whole_models_peak(smoke):
    _, recs = smoke
    whole = recs["gpu-smoke-opt-m-structprune-4x32.json"]
    cut = recs["gpu-smoke-opt-m-structprune-4x32-L2.json"]
    assert cut["layers_run"] == 2 < whole["layers_run"] == whole["n_layers"] == 3
    assert cut["peak_bytes"] == whole["peak_bytes"]
    assert cut["timing_extrapolated"] and cut["total_s_full"] > cut["total_s"]
    assert cut["n_params"] == whole["n_params"]


def test_correctness_and_speed_records(smoke):
    _, recs = smoke
    corr = recs["gpu-correctness.json"]
    assert corr["status"] == "ok" and corr["fp32_pass"] is True
    fp32 = [c for c in corr["cases"] if c["dtype"] == "float32"]
    assert fp32 and all(c["agreement"] == 1.0 and c["max_rel_err_diff"] <= 1e-2 for c in fp32)
    bf16 = [c for c in corr["cases"] if c["dtype"] == "bfloat16"]
    # bf16 rounding may flip a near-tie, never most of a tiny model's choices (measured: 1.0, 0.006)
    assert bf16 and all(c["agreement"] >= 0.9 and c["max_rel_err_diff"] <= 0.05 for c in bf16)
    speed = recs["gpu-speed.json"]
    assert speed["status"] == "ok"
    res = speed["results"]
    assert [r["sparsity"] for r in res] == [0.0, 0.2, 0.3, 0.5]
    achieved = [r["achieved_prunable"] for r in res]
    assert achieved[0] == 0.0 and all(abs(a - s) < 0.05 for a, s in zip(achieved[1:], (0.2, 0.3, 0.5)))
    assert res[0]["prefill_speedup"] == 1.0
    for r in res:  # speed-ups are the tokens/s ratios to dense, for prefill and every decode batch
        assert r["prefill_speedup"] == pytest.approx(r["prefill_tok_s"] / res[0]["prefill_tok_s"])
        assert r["decode_speedup"] == pytest.approx({b: v / res[0]["decode_tok_s"][b] for b, v in r["decode_tok_s"].items()})
    params = [r["params_total"] for r in res]
    assert params == sorted(params, reverse=True) and params[-1] < params[0]


def test_summary_has_slopes_ratios_and_estimator_errors(smoke):
    _, recs = smoke
    s = recs["gpu-summary.json"]
    assert s["status_counts"]["error"] == 0 and s["status_counts"]["oom"] == 0
    sp = s["slopes"]["structprune 4x32"]
    assert len(sp["points"]) == 3 and sp["slope_all"] is not None
    assert {r["config_name"] for r in s["ratios"]} >= {"smoke-opt-s", "smoke-opt-m", "smoke-llama-gqa"}
    assert all(r["ratio"] > 1 for r in s["ratios"])  # the whole model + gradients outweigh one layer
    assert all(e["estimate_error"] == 0.0 for e in s["estimator"] if e["method"] == "structprune")


def test_log_slope_recovers_a_known_exponent():
    xs = [1e8, 3e8, 1.3e9, 6.7e9, 1.3e10]
    assert gcfg.log_slope([(x, 7.0 * x ** 0.61) for x in xs]) == pytest.approx(0.61, abs=1e-12)
    assert gcfg.log_slope([(x, 2.0 * x) for x in xs]) == pytest.approx(1.0, abs=1e-12)
    assert gcfg.log_slope([(1e9, 5.0)]) is None
    recs = [{"status": "ok", "config_name": f"c{i}", "method": m, "nsamples": 32, "seqlen": 2048, "family": "opt",
             "n_params": x, "layers_run": 4, "n_layers": 4, "peak_bytes": (3.0 * x ** 0.5 if m == "structprune" else 4 * x),
             "estimate_bytes": None, "estimate_error": None}
            for i, x in enumerate(xs) for m in ("structprune", "global-taylor")]
    s = gs.summarize(recs)
    assert s["slopes"]["structprune 32x2048"]["slope_all"] == pytest.approx(0.5, abs=1e-12)
    assert s["slopes"]["global-taylor 32x2048"]["slope_opt"] == pytest.approx(1.0, abs=1e-12)
    assert s["bars"]["structprune_slope_le_0.8"] is True
    assert s["ratios"][-1]["ratio"] == pytest.approx(4 * xs[-1] / (3.0 * math.sqrt(xs[-1])))


def test_spent_budget_skips_runs_and_still_writes_the_summary(tmp_path):
    assert gs.main(["--cpu-smoke", "--out", str(tmp_path), "--budget-s", "0",
                    "--steps", "scaling,correctness,speed"]) == 0
    recs = _records(tmp_path)
    runs = [r for n, r in recs.items() if n != "gpu-summary.json"]
    assert len(runs) == 9
    assert all(r["status"] == "skipped" and "budget" in r["message"] for r in runs)
    assert recs["gpu-summary.json"]["status_counts"]["skipped"] == 7


def test_budget_running_out_mid_run_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gs.Deadline, "is_set", lambda self: True)  # expires at the first layer boundary
    gs.main(["--cpu-smoke", "--out", str(tmp_path), "--steps", "scaling", "--configs", "smoke-opt-s",
             "--methods", "structprune"])
    rec = _records(tmp_path)["gpu-smoke-opt-s-structprune-4x32.json"]
    assert rec["status"] == "skipped" and "aborted mid-run" in rec["message"]


def test_out_of_memory_is_a_result_not_a_crash(tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gs.PruneEngine, "pass1", oom)
    monkeypatch.setattr(gs, "global_taylor_fallback", oom)
    monkeypatch.setattr(gs, "prune_core", lambda pc, *a, _real=gs.prune_core, **k: (
        oom() if pc.method == "global-taylor" else _real(pc, *a, **k)))
    assert gs.main(["--cpu-smoke", "--out", str(tmp_path), "--steps", "scaling",
                    "--configs", "smoke-opt-s"]) == 0
    recs = _records(tmp_path)
    runs = [r for n, r in recs.items() if n != "gpu-summary.json"]
    assert {r["method"] for r in runs} == {"structprune", "global-taylor"}
    assert all(r["status"] == "oom" and "out of memory" in r["message"] for r in runs)
    assert recs["gpu-summary.json"]["status_counts"]["oom"] == 2


def test_extrapolated_pass_times_grow_with_depth_even_after_a_slow_first_layer():
    # the H200 run's llama-2-13b record: a slow first layer made the fitted slope negative and the
    # extrapolated pass 1 of 40 layers negative (-14 s)
    events = [("embed", -1, 0.9), ("pass1", 0, 6.0), ("pass1", 1, 8.0), ("pass1", 2, 9.5), ("pass1", 3, 10.8)]
    full = gs._extrapolate({"events": events, "pass1_s": 12.3, "pass2_s": 6.1}, 4, 40, sensitivity=True)
    assert full["pass1_s_full"] >= 12.3 * 40 / 4
    assert full["pass2_s_full"] == pytest.approx(6.1 * 10)
    # per-layer times 1, 1.5, 2, 2.5 s: the fit continues the line to 8 layers (22 s), more than
    # linear scaling of the measured 7 s (14 s)
    rising = [("embed", -1, 0.0), ("pass1", 0, 1.0), ("pass1", 1, 2.5), ("pass1", 2, 4.5), ("pass1", 3, 7.0)]
    full = gs._extrapolate({"events": rising, "pass1_s": 7.0, "pass2_s": 1.0}, 4, 8, sensitivity=True)
    assert full["pass1_s_full"] == pytest.approx(22.0)
