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
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
gs = importlib.import_module("gpu_scaling")
gcfg = importlib.import_module("gpu_configs")
ga = importlib.import_module("gpu_archive")

FIELDS = ("kind", "config_name", "family", "n_params", "n_layers", "hidden", "method", "nsamples", "seqlen",
          "dtype", "peak_bytes", "estimate_bytes", "estimate_error", "pass1_s", "pass2_s", "total_s", "status",
          "message", "device", "torch", "transformers", "git_commit", "git_dirty", "commit_source")
TAG = "smoke"


def _records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("gpu-*.json"))}


# Packages the GPU machine's image may lack or that this project does not pin there: they look not
# installed to the smoke run (a sitecustomize on PYTHONPATH, so every python3 the script starts has it).
BLOCKER = """
import atexit, sys, importlib.machinery
BLOCKED = ("datasets", "pandas", "plotly", "streamlit", "pyarrow", "gguf", "accelerate", "psutil", "ray")
_find = importlib.machinery.PathFinder.find_spec
def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in BLOCKED else _find(name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
atexit.register(lambda: print("LEAKED", sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in BLOCKED})))
"""


def _device_copy(dest: Path) -> Path:
    """What travels to the GPU machine, without .git: the library, the benchmark scripts, the one
    record the speed step reads, and the commit stamp written here."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "structprune", dest / "structprune", ignore=ignore)
    (dest / "benchmarks").mkdir(parents=True)
    for f in list(BENCH.glob("*.py")) + [BENCH / "run_gpu.sh"]:
        shutil.copy2(f, dest / "benchmarks" / f.name)
    energy = importlib.import_module("benchmarks.speed").ENERGY_RECORD
    (dest / energy.relative_to(ROOT)).parent.mkdir(parents=True)
    shutil.copy2(energy, dest / energy.relative_to(ROOT))
    ga.write_stamp(ROOT, dest / ga.STAMP_NAME)
    return dest


def _run_gpu_sh(repo: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    blocker = tmp / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    full = {**os.environ, "SMOKE": "1", "TAG": TAG, "OUT": str(tmp / "out"), "WORK": str(tmp / "work"),
            "PYTHON": sys.executable, "PYTHONPATH": str(blocker), **env}
    full.pop(ga.ENV_COMMIT, None)
    return subprocess.run(["bash", str(repo / "benchmarks" / "run_gpu.sh")], capture_output=True, text=True,
                          timeout=600, cwd=tmp, env=full)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole GPU run rehearsed on the CPU: benchmarks/run_gpu.sh with SMOKE=1 in a copy of the
    tree without .git (as the GPU machine gets it, the stamp carried), where packages the GPU path
    must not need cannot be imported; the records are read back from the one archive."""
    tmp = tmp_path_factory.mktemp("gpu-run")
    repo = _device_copy(tmp / "repo")
    res = _run_gpu_sh(repo, tmp)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "LEAKED []" in res.stdout and "LEAKED [" not in res.stdout.replace("LEAKED []", "")
    unpacked = tmp / "unpacked"
    ga.unpack(tmp / "out" / f"structprune-gpu-{TAG}.tar.gz", unpacked)
    return tmp, _records(unpacked)


def test_the_run_brings_back_one_archive_and_three_plain_files(smoke):
    tmp, recs = smoke
    back = sorted(p.name for p in (tmp / "out").iterdir())
    assert back == [f"gpu-run-{TAG}.log", f"gpu-summary-{TAG}.json", f"gpu-summary-{TAG}.txt",
                    f"structprune-gpu-{TAG}.tar.gz"]
    with tarfile.open(tmp / "out" / f"structprune-gpu-{TAG}.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    # everything the run wrote is in the archive, the console log (versions, the final line) included
    assert names == {p.name for p in (tmp / "work").iterdir() if not p.name.startswith(".")}
    log = (tmp / "unpacked" / "gpu-run.log").read_text()
    assert "structprune GPU run smoke" in log and "gpu_scaling.py exit 0" in log
    assert recs["gpu-summary.json"] == json.loads((tmp / "out" / f"gpu-summary-{TAG}.json").read_text())


def test_smoke_writes_every_planned_record(smoke):
    _, recs = smoke
    stamp = ga.git_state(ROOT)
    plan = gs.plan_runs(gs.SMOKE, list(gs.STEPS))
    names = []
    for item in plan:
        if item == "speed":
            names += [gs.speed_filename(gs.SMOKE.speed_config, s) for s in gs.SMOKE.speed_sparsities]
        else:
            names.append("gpu-correctness.json" if item == "correctness" else item.filename)
    assert set(names) | {"gpu-summary.json"} == set(recs)
    for name in names:
        rec = recs[name]
        assert rec["status"] == "ok", (name, rec.get("message"))
        assert "invalid_fields" not in rec, (name, rec["invalid_fields"])
        # the copy has no .git: the commit comes from the stamp written before the copy
        assert rec["git_commit"] == stamp["git_commit"] and re.fullmatch(r"[0-9a-f]{40}", rec["git_commit"])
        assert rec["commit_source"].startswith("stamp") and rec["git_dirty"] == stamp["git_dirty"]
    assert recs["gpu-summary.json"]["status_counts"] == {"ok": len(names) - 4, "oom": 0, "error": 0, "skipped": 0}


def test_plan_runs_the_must_have_pair_first_then_speed():
    plan = gs.plan_runs(gs.GPU, list(gs.STEPS))
    first = [(r.config_name, r.method, r.nsamples, r.seqlen) for r in plan[:4]]
    assert first == [("llama-2-7b", "structprune", 32, 2048), ("llama-2-7b", "global-taylor", 32, 2048),
                     ("opt-6.7b", "structprune", 32, 2048), ("opt-6.7b", "global-taylor", 32, 2048)]
    assert plan[4] == "speed" and plan[5].config_name == "llama-2-13b"
    assert plan.index("correctness") < min(i for i, r in enumerate(plan) if not isinstance(r, str) and r.step == "small")
    assert gs.GPU.speed_aligns == (64, 1) and gs.GPU.speed_sparsities == (0.2, 0.3, 0.5)
    assert [s.label.split(" (")[0] for s in gs.GPU.speed_shapes] == ["prefill 16x2048", "prefill 1x2048",
                                                                      "decode b1", "decode b16"]
    # every layer-wise run on the GPU is cut to 4 layers: its peak is the whole model's
    assert all(r.layers_run == 4 for r in plan if not isinstance(r, str) and r.method == "structprune"
               and r.step != "long")
    assert gs.plan_runs(gs.GPU, ["scaling"]) == [r for r in plan if not isinstance(r, str) and r.step in gs.SCALING]


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


def test_correctness_record(smoke):
    _, recs = smoke
    corr = recs["gpu-correctness.json"]
    assert corr["status"] == "ok" and corr["fp32_pass"] is True
    fp32 = [c for c in corr["cases"] if c["dtype"] == "float32"]
    assert fp32 and all(c["agreement"] == 1.0 and c["max_rel_err_diff"] <= 1e-2 for c in fp32)
    bf16 = [c for c in corr["cases"] if c["dtype"] == "bfloat16"]
    # bf16 rounding may flip a near-tie, never most of a tiny model's choices (measured: 1.0, 0.006)
    assert bf16 and all(c["agreement"] >= 0.9 and c["max_rel_err_diff"] <= 0.05 for c in bf16)


def test_speed_records_time_aligned_and_unaligned_models_against_dense(smoke):
    _, recs = smoke
    prof = gs.SMOKE
    for sp in prof.speed_sparsities:
        rec = recs[gs.speed_filename(prof.speed_config, sp)]
        assert rec["status"] == "ok" and rec["schema"] == "structprune.speed/1" and rec["interleaved"]
        models = ["dense"] + [f"align{a}" for a in prof.speed_aligns]
        labels = [s.label for s in prof.speed_shapes]
        # every model at every shape, median of the repeats, in one process
        assert [(t["label"], t["model"]) for t in rec["timings"]] == [(lb, m) for lb in labels for m in models]
        assert all(len(t["seconds"]) == prof.speed_repeats and t["median_s"] > 0 for t in rec["timings"])
        med = {(t["model"], t["label"]): t["median_s"] for t in rec["timings"]}
        for m in models[1:]:
            for lb in labels:
                ratio = med[("dense", lb)] / med[(m, lb)]
                assert rec["speedup"][f"{m} | {lb}"] == pytest.approx(ratio, rel=1e-3, abs=5e-5)  # stored to 4 decimals
            alloc = rec["allocations"][m]
            assert abs(alloc["achieved_sparsity"] - sp) < 0.06
            assert all(k["mlp"] % alloc["align_channels"] == 0 for k in alloc["kept"])
            assert rec["params"][m] < rec["params"]["dense"]
    rows = recs["gpu-summary.json"]["speed"]
    assert len(rows) == len(prof.speed_sparsities) * len(prof.speed_aligns) * len(prof.speed_shapes)


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
    assert len(runs) == 7 + 1 + 3  # the scaling runs, correctness, one speed record per sparsity
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
    # whatever the per-layer times, the whole depth never costs less than linear scaling, never < 0
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        dts = (torch.rand(4, generator=g) ** 4 * 20).tolist()
        t, events = 0.0, [("embed", -1, 0.0)]
        for i, dt in enumerate(dts):
            t += dt
            events.append(("pass1", i, t))
        p1 = t + float(torch.rand(1, generator=g))
        full = gs._extrapolate({"events": events, "pass1_s": p1, "pass2_s": 1.0}, 4, 40, sensitivity=True)
        assert full["pass1_s_full"] >= p1 * 10 - 1e-9 and full["total_s_full"] > 0


def test_invalid_fields_names_nulls_and_negative_times():
    ok = {"kind": "gpu-scaling", "status": "ok", "git_commit": "abc1234", "n_params": 10, "peak_bytes": 5,
          "estimate_bytes": 4, "estimate_error": -0.2, "pass1_s": 1.0, "pass2_s": 0.5, "total_s": 1.5,
          "pass1_s_full": 10.0}
    assert gs.invalid_fields(ok) == []  # a negative estimator error is a finding, not an invalid field
    bad = {**ok, "git_commit": None, "pass1_s_full": -14.39, "estimate_error": None, "peak_bytes": float("nan")}
    assert gs.invalid_fields(bad) == ["estimate_error", "git_commit", "pass1_s_full", "peak_bytes"]
    assert gs.invalid_fields({**bad, "status": "skipped"}) == []  # a skipped run has no numbers to give


def test_records_name_their_commit_from_env_git_or_stamp(tmp_path, monkeypatch):
    monkeypatch.delenv(ga.ENV_COMMIT, raising=False)
    here = ga.commit_info(ROOT)
    assert here["commit_source"] == "git" and here["git_commit"] == ga.git_state(ROOT)["git_commit"]
    bare = tmp_path / "copy"  # a copy of the tree without .git, as the GPU machine gets it
    bare.mkdir()
    assert ga.commit_info(bare) == {"git_commit": None, "git_dirty": None, "commit_source": "unknown"}
    ga.write_stamp(ROOT, bare / ga.STAMP_NAME)
    info = ga.commit_info(bare)
    assert info["git_commit"] == here["git_commit"] and info["commit_source"].startswith("stamp")
    monkeypatch.setenv(ga.ENV_COMMIT, "0123abc")
    assert ga.commit_info(bare)["git_commit"] == "0123abc"  # a launcher that knows better wins
    assert ga.main(["stamp", "--root", str(bare)]) == 2  # no git there: one line, exit 2


def test_archive_round_trip_and_unsafe_members(tmp_path):
    src = tmp_path / "work"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text('{"x": 1}')
    (src / "sub" / "b.log").write_text("line\n")
    (src / ".a.json.tmp").write_text("half")  # a record being written: never packed
    arch = tmp_path / "out" / "structprune-gpu-t.tar.gz"
    assert ga.pack(src, arch, prefix="structprune-gpu-t") == 2
    dest = tmp_path / "back"
    got = ga.unpack(arch, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in got) == ["a.json", "sub/b.log"]
    assert (dest / "a.json").read_text() == '{"x": 1}'
    assert ga.main(["unpack", str(arch), "--dest", str(dest)]) == 2  # exists: no overwrite without --force
    assert ga.main(["unpack", str(arch), "--dest", str(dest), "--force"]) == 0
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("run/../../escape.txt")
        info.size = 1
        import io
        tar.addfile(info, io.BytesIO(b"x"))
    assert ga.main(["unpack", str(evil), "--dest", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "e").exists()


def test_a_killed_run_leaves_every_finished_record_in_the_archive(tmp_path):
    """SIGKILL (the device tool's own time limit) at an arbitrary moment: the archive on disk is
    whole and holds every record written before the kill."""
    arch = tmp_path / "out" / "structprune-gpu-k.tar.gz"
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import gpu_scaling; " \
           f"gpu_scaling.main(['--cpu-smoke', '--out', {str(tmp_path / 'work')!r}, '--archive', {str(arch)!r}, " \
           f"'--steps', 'pair,speed,big'])"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300 and proc.poll() is None:
            if arch.exists() and len(list((tmp_path / "work").glob("gpu-speed-*.json"))) >= 1:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = {p.name for p in (tmp_path / "work").glob("gpu-*.json")}
    ga.unpack(arch, tmp_path / "back")
    packed = {p.name for p in (tmp_path / "back").glob("gpu-*.json")}
    # the archive is rewritten after every record: only the record written last can be missing
    assert len(written - packed - {"gpu-summary.json"}) <= 1, (written, packed)
    assert {"gpu-smoke-opt-m-structprune-4x32.json", "gpu-smoke-opt-m-global-taylor-4x32.json"} <= packed


def test_the_hard_time_limit_still_brings_back_the_archive(tmp_path):
    """run_gpu.sh's hard limit (SIGINT from `timeout`) mid-plan: the run under way is recorded as
    interrupted, the summary written, and the archive packed with the log."""
    repo = _device_copy(tmp_path / "repo")
    res = _run_gpu_sh(repo, tmp_path, HARD_S="6", STEPS="pair,big,small")
    if res.returncode == 0 and "runs 7:" in res.stdout:  # a quiet machine ran the whole smoke plan in 6 s
        pytest.skip("the smoke plan finished inside the hard limit on this machine: nothing was cut")
    assert res.returncode == 124, res.stdout[-2000:]
    ga.unpack(tmp_path / "out" / f"structprune-gpu-{TAG}.tar.gz", tmp_path / "back")
    recs = _records(tmp_path / "back")
    assert "gpu-summary.json" in recs and "gpu_scaling.py exit 124" in (tmp_path / "back" / "gpu-run.log").read_text()
    statuses = [r["status"] for n, r in recs.items() if n != "gpu-summary.json"]
    # how far the plan got in 6 s depends on the machine; every record that exists is whole
    assert statuses and set(statuses) <= {"ok", "skipped", "interrupted"}, statuses
