"""Progress the app shows: the time estimate covers every stage a run goes through (planning.py), and
the job's line (jobs.py) says which stage runs now, with the time left from the estimate at the pace
measured so far."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from conftest import wait_until
from structprune.config import PruneConfig
from structprune.jobs import STAGE_ALIASES, STAGE_LABELS, Job, JobRunner
from structprune.models import load_model, tiny_config
from structprune.pipeline import ProgressEvent
from structprune.planning import PHASE_STAGE, RUN_STAGES, estimate_seconds, load_seconds, stepthrough_stages
from structprune.stepthrough import MAX_STEPS

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "results" / "app" / "estimate_check.json"
TINY = dict(model="tiny-llama", nsamples=4, seqlen=32, eval_windows=3, device="cpu", sparsity=0.4)


def _replay(job: Job) -> list[tuple[str, str, float]]:
    """(stage, line, bar value) after each of the job's events, as the page would have polled them."""
    seen, replay = [], Job(job.kind, job.label, job.config, stages=dict(job.stages))
    for ev in job.events:
        replay.add(ev)
        frac, where = replay.progress()
        seen.append((STAGE_ALIASES.get(ev.stage, ev.stage), where, frac))
    return seen


@pytest.mark.parametrize("settings", [{}, {"energy": "sensitivity", "sensitivity_windows": 2}])
def test_job_line_changes_with_every_stage_and_the_estimate_covers_them(settings):
    runner = JobRunner()
    cfg = PruneConfig(**{**TINY, **settings})
    job = runner.submit_prune(cfg, load_model("tiny-llama"))
    wait_until(lambda: not job.active, timeout=300)
    assert job.status == "finished", job.error
    seen = _replay(job)
    order = list(dict.fromkeys(stage for stage, _, _ in seen if stage != "done"))
    # the run goes through exactly the stages the estimate has, in RUN_STAGES order
    assert order == list(job.stages) == [s for s in RUN_STAGES if s in job.stages]
    assert ("sensitivity" in order) == ("energy" in settings)
    for stage, where, _ in seen:  # every line names the stage that runs now
        if stage != "done":
            assert where.startswith(STAGE_LABELS[stage][0]), (stage, where)
    # the line changes when the stage does: after the dense perplexity is known, the next event says so
    i = max(j for j, (stage, _, _) in enumerate(seen) if stage == "eval-dense")
    assert seen[i + 1][1].startswith(STAGE_LABELS["heldout-dense"][0])
    last_pass2 = max(j for j, (stage, _, _) in enumerate(seen) if stage == "pass2")
    assert seen[last_pass2 + 1][1].startswith(STAGE_LABELS["losses-pruned"][0])
    values = [frac for _, _, frac in seen]
    assert values == sorted(values) and values[-1] == 1.0 and 0 < values[len(values) // 2] < 1
    # the record times the same stages (prepare, both evaluations, the held-out and pruned losses)
    timed = {k[:-2].replace("_", "-") for k in job.record["timing"] if k != "total_s"}
    assert timed <= set(RUN_STAGES) and {"prepare", "eval-dense", "heldout-dense", "pass1", "pass2",
                                         "losses-pruned", "eval-pruned"} <= timed


def test_layer_and_window_lines_count_what_runs_now():
    job = Job("prune", "x", {}, stages={"eval-dense": 10.0, "pass1": 30.0})
    job.add(ProgressEvent("eval-dense", -1, 4, 0.0, 0, 0, "", 0, 8))
    assert job.where() == "evaluating the dense model, window 1/8"
    job.add(ProgressEvent("eval-dense", -1, 4, 1.0, 0, 0, "sotu: ppl 26.6", 8, 8))
    assert job.where() == "evaluating the dense model, 8/8 windows done (sotu: ppl 26.6)"
    job.add(ProgressEvent("pass1", 1, 4, 2.0, 0, 0))
    assert job.where() == "pass 1: statistics of the dense model, layer 3/4"
    assert job.progress_value() == pytest.approx((10 + 30 * 2 / 4) / 40)


def test_time_left_follows_the_measured_pace():
    """Before TRUST_AFTER of the work, the estimate's own pace; after it, the pace measured so far."""
    now = time.time()
    job = Job("prune", "x", {}, stages={"prepare": 10.0, "pass1": 30.0})
    job.started = now - 5
    job.add(ProgressEvent("prepare", -1, 6, 0.0, 0, 0))
    job.event_times[-1] = now - 5
    assert job.remaining_s() == pytest.approx(40 - 5, abs=0.1)  # nothing measured yet: the estimate, less the time spent
    job.started = now - 40  # half the work (2 of 6 layers of pass 1) done in 40 s instead of 20: twice as slow
    job.add(ProgressEvent("pass1", 1, 6, 0.0, 0, 0))
    job.event_times[-1] = now
    assert job.remaining_s() == pytest.approx(20 * 2, abs=0.1)
    job.cancel_event.set()
    job.cancel_asked = now
    assert job.progress()[1].startswith("cancelling")


def _folded(phases: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in phases.items():
        out[PHASE_STAGE.get(k, k)] = out.get(PHASE_STAGE.get(k, k), 0.0) + v
    return out


def _check_run(rec: dict) -> None:
    cfg = PruneConfig.from_dict(rec["config"])
    est = estimate_seconds(_config(rec["model"]), cfg, "cpu", fp32_flops=rec["estimate"]["fp32_gflops"] * 1e9,
                           fp64_flops=rec["estimate"]["fp64_gflops"] * 1e9,
                           measure_speed="speed" in rec["measured"]["stages"])  # the app's runs time the result
    if "load" in rec["estimate"]["phases"]:  # a fresh process's first Run: its job loaded the model
        est["phases"] = {"load": load_seconds(_config(rec["model"])), **est["phases"]}
        est["total_s"] += est["phases"]["load"]
    stages = _folded(est["phases"])
    assert set(rec["measured"]["stages"]) == set(stages)  # every measured stage is estimated, and only those
    ratio = rec["measured"]["total_s"] / est["total_s"]
    assert 1 / 1.5 <= ratio <= 1.5, ratio
    for stage, secs in rec["measured"]["stages"].items():  # and no stage is off by more than 2x
        assert 1 / 2 <= secs / stages[stage] <= 2, (stage, secs, stages[stage])
    return est


def test_estimate_against_the_measured_smollm2_runs():
    """benchmarks/estimate_check.py's records: the estimate, recomputed with the matmul speed measured
    then, covers every stage that was timed and lands within 1.5x of the measured total: for the
    Quick preview run that checks it, and for the runs its coefficients were fitted to."""
    rec = json.loads(CHECK.read_text())
    est = _check_run(rec)
    assert est["total_s"] == pytest.approx(rec["estimate"]["total_s"], rel=0.01)  # the model that was checked
    for run in json.loads((CHECK.parent / "estimate_calibration.json").read_text())["runs"]:
        _check_run(run)
    for st in rec["stepthrough"]:  # the Method page's step-through: every stage estimated, within 2x
        stages = stepthrough_stages(_config(rec["model"]), st["layer"], st["module"], 8, 256, MAX_STEPS,
                                    fp32_flops=st["fp32_gflops"] * 1e9, fp64_flops=st["fp64_gflops"] * 1e9)
        assert set(stages) == set(st["measured"]["stages"])
        assert 1 / 2 <= st["measured"]["total_s"] / sum(stages.values()) <= 2


def _config(model: str):
    from structprune.estimate import load_config

    return load_config(model)


def test_repository_records_time_only_estimated_phases():
    """Every per-phase timing the benchmark records hold is a phase the estimate models."""
    keys = set()
    for path in (ROOT / "benchmarks" / "results").rglob("*.json"):
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and isinstance(rec.get("timing"), dict):
            keys |= {k for k in rec["timing"] if k.endswith("_s") and k != "total_s"}
    assert keys, "no timed records found"
    stages = {k[:-2].replace("_", "-") for k in keys}
    assert stages <= set(RUN_STAGES), stages - set(RUN_STAGES)
    est = estimate_seconds(tiny_config("tiny-llama"), PruneConfig(energy="sensitivity"), "cpu", fp32_flops=1e10,
                           fp64_flops=1e9, measure_speed=True)
    assert set(_folded(est["phases"])) == set(RUN_STAGES)  # and the estimate models all of them
    assert all(v > 0 and math.isfinite(v) for v in est["phases"].values())


def test_the_probe_speed_is_damped_on_the_cpu_only():
    from structprune.planning import PROBE_EXPONENT, PROBE_REF_FLOPS, effective_flops

    assert effective_flops(PROBE_REF_FLOPS, "cpu") == pytest.approx(PROBE_REF_FLOPS)
    quiet = effective_flops(193e9, "cpu")  # the quiet calibration run's probe: 2.9x the loaded runs' speed
    assert quiet / PROBE_REF_FLOPS == pytest.approx((193e9 / PROBE_REF_FLOPS) ** PROBE_EXPONENT)
    assert 2.7 < quiet / PROBE_REF_FLOPS < 3.1
    assert effective_flops(5e13, "cuda:0") == 5e13
