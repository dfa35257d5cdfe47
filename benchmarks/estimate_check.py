"""The app's time estimate against the measured time of one run, phase by phase.

    nice -n 19 .venv/bin/python -m benchmarks.estimate_check            # SmolLM2 at the Quick preview settings
    nice -n 19 .venv/bin/python -m benchmarks.estimate_check --parts stepthrough   # only the Method page's

One run of SmolLM2-135M through the app's own path: the estimate the Prune page shows
(planning.estimate_run, with this process's matmul speed measured as the page measures it), then the
run as a background job of a fresh process, as the app's first Run (jobs.JobRunner.submit_prune:
loading the model, copying it, the data, the dense and pruned evaluations, both passes). Measured per stage: from the first progress event of a stage to the
first of the next (the stages of planning.RUN_STAGES); in total: from the submission to the job's
end. The job's "time left" is sampled every 2 s, as the page polls it, and compared afterwards with
the time that really was left. Writes benchmarks/results/app/estimate_check.json (or --out) with the
load average around the run: the machine is shared, and a busy machine (or nice 19) makes every
phase slower than the matmul speed measured at the start predicts. The Method page's step-through
(layer 3, attention and MLP, 8 x 256) is checked the same way (planning.stepthrough_stages against
the job's measured stages); each part replaces its own keys in an existing record.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .compare import RESULTS, write_json

OUT = RESULTS / "app" / "estimate_check.json"
QUICK = {"nsamples": 8, "seqlen": 256, "eval_windows": 8, "sensitivity_windows": 4}  # pages/_prune_form.py QUICK


def stage_times(job) -> dict[str, float]:
    """Seconds per stage from the job's event arrival times (a stage ends where the next begins)."""
    from structprune.jobs import STAGE_ALIASES

    starts: dict[str, float] = {}
    for i, (ev, t) in enumerate(zip(job.events, job.event_times)):
        stage = STAGE_ALIASES.get(ev.stage, ev.stage)
        starts.setdefault(stage, job.started if i == 0 else t)  # the first stage began with the job
    order = sorted(starts.items(), key=lambda kv: kv[1])
    ends = [t for _, t in order[1:]] + [job.ended]
    return {stage: end - t for (stage, t), end in zip(order, ends) if stage != "done"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=QUICK["nsamples"])
    ap.add_argument("--seqlen", type=int, default=QUICK["seqlen"])
    ap.add_argument("--eval-windows", type=int, default=QUICK["eval_windows"])
    ap.add_argument("--sensitivity-windows", type=int, default=QUICK["sensitivity_windows"])
    ap.add_argument("--energy", default="relative")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--parts", nargs="+", choices=("prune", "stepthrough"), default=("prune", "stepthrough"))
    a = ap.parse_args(argv)
    out = json.loads(a.out.read_text()) if a.out.exists() else {}
    if "prune" in a.parts:
        out.update(check_prune(a))
        write_json(a.out, out)
    if "stepthrough" in a.parts:
        out["stepthrough"] = [check_stepthrough(a.model, kind) for kind in ("attn", "mlp")]
        write_json(a.out, out)
    return out


def check_stepthrough(model: str, kind: str, layer: int = 3) -> dict:
    """The Method page's estimate of one step-through vs its measured stages, through a job."""
    from structprune.jobs import JobRunner
    from structprune.models import load_model
    from structprune.planning import matmul_flops, stepthrough_stages
    from structprune.stepthrough import MAX_STEPS, admm_stepthrough

    loaded = load_model(model)
    load0 = os.getloadavg()
    stages = stepthrough_stages(loaded.model.config, layer, kind, 8, 256, MAX_STEPS)
    runner = JobRunner()
    t0 = time.time()
    job = runner.submit_call("stepthrough", f"L{layer} {kind}", {}, lambda ev, c: admm_stepthrough(
        loaded, layer, kind, 0.3, nsamples=8, seqlen=256, on_event=ev, cancel=c), stages=stages)
    while job.ended is None:
        time.sleep(0.5)
    if job.status != "finished":
        raise SystemExit(f"error: the step-through ended {job.status}: {job.error}")
    total = job.ended - t0
    est = sum(stages.values())
    print(f"step-through L{layer} {kind}: estimate {est:.0f} s, measured {total:.0f} s", flush=True)
    return {"layer": layer, "module": kind,
            "estimate": {"total_s": round(est, 1), "stages": {k: round(v, 2) for k, v in stages.items()}},
            "measured": {"total_s": round(total, 1), "stages": {k: round(v, 2) for k, v in stage_times(job).items()}},
            "ratio_measured_over_estimate": round(total / est, 3),
            "fp32_gflops": round(matmul_flops("cpu", "float32") / 1e9, 2),  # what the estimate used
            "fp64_gflops": round(matmul_flops("cpu", "float64") / 1e9, 2),
            "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def check_prune(a) -> dict:
    """The Prune page's estimate of one run vs the measured run, through a job."""

    from structprune.config import PruneConfig
    from structprune.estimate import load_config
    from structprune.jobs import JobRunner
    from structprune.planning import estimate_run

    cfg = PruneConfig(model=a.model, nsamples=a.nsamples, seqlen=a.seqlen, eval_windows=a.eval_windows,
                      sensitivity_windows=a.sensitivity_windows, energy=a.energy, device="cpu")
    load0 = os.getloadavg()
    runner = JobRunner()  # a fresh app process: its first Run's job loads the model
    est = estimate_run(load_config(a.model), cfg, loads_model=not runner.models.cached(a.model))["seconds"]
    t0 = time.time()
    job = runner.submit_prune(cfg)
    samples = []
    while job.ended is None:
        frac, where = job.progress()
        left = job.remaining_s()
        samples.append({"t": round(time.time() - t0, 1), "fraction": round(frac, 4), "left_s": left, "where": where})
        time.sleep(2.0)
    if job.status != "finished":
        raise SystemExit(f"error: the run ended {job.status}: {job.error}")
    total = job.ended - t0
    for s in samples:
        s["actual_left_s"] = round(total - s["t"], 1)
        s["left_s"] = None if s["left_s"] is None else round(s["left_s"], 1)
    measured = stage_times(job)
    phases = {k: round(v, 2) for k, v in est["phases"].items()}
    out = {
        "what": "planning.estimate_run's time (the Prune page's) vs one measured run through jobs.JobRunner",
        "model": a.model, "config": cfg.to_dict(),
        "estimate": {"total_s": round(est["total_s"], 1), "phases": phases,
                     "fp32_gflops": round(est["fp32_flops"] / 1e9, 2), "fp64_gflops": round(est["fp64_flops"] / 1e9, 2)},
        "measured": {"total_s": round(total, 1), "stages": {k: round(v, 2) for k, v in measured.items()},
                     "record_timing": {k: round(v, 2) for k, v in job.record["timing"].items()}},
        "ratio_measured_over_estimate": round(total / est["total_s"], 3),
        "time_left_samples": samples,
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "niceness": os.nice(0),
        "note": "one run; a shared machine: compare the load averages. Stages: first event of a stage to the "
                "first of the next; the total from submission to the job's end",
    }
    print(f"estimate {est['total_s']:.0f} s, measured {total:.0f} s (x{total / est['total_s']:.2f}); "
          f"load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()
