"""How long Cancel takes to end a job in each of its phases, on SmolLM2-135M through the app's jobs.

    nice -n 19 .venv/bin/python -m benchmarks.cancel_latency

For every stage of a prune run (loading the model, as on the app's first Run; calibration 8 x 256,
the default method, 8 evaluation windows: the Quick preview settings), of the explorer's energy pass
(pass 1 with the module sensitivities) and of the Method page's step-through (an MLP, the slowest
module), one job is started as the app starts it (jobs.JobRunner), Cancel is clicked `--after`
seconds into the stage (runner.cancel(), as the button does) and the time until the worker has
stopped is measured. The line the progress bar
showed at the click is kept, so each number says where the job was. Writes
benchmarks/results/app/cancel_latency.json with the load average around each measurement: on a
shared machine, and under nice 19, every step between two checks takes longer than on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .compare import RESULTS, write_json
from .estimate_check import QUICK

OUT = RESULTS / "app" / "cancel_latency.json"
PRUNE_STAGES = ("prepare", "eval-dense", "heldout-dense", "pass1", "pass2", "losses-pruned", "eval-pruned")
PROFILE_STAGES = ("pass1", "sensitivity")
STEP_STAGES = ("gram", "admm", "solves")


def cancel_in(runner, submit, stage: str, after: float, timeout: float = 3600.0) -> dict:
    """Starts a job, clicks Cancel `after` seconds into `stage`, returns what it showed and the latency."""
    from structprune.jobs import STAGE_ALIASES

    load0 = os.getloadavg()
    job = submit()
    t_stage = None
    t0 = time.time()
    while job.active and time.time() - t0 < timeout:
        stages = {STAGE_ALIASES.get(e.stage, e.stage) for e in list(job.events)} | {"prepare"}
        if stage in stages:
            t_stage = t_stage or time.time()
            if time.time() - t_stage >= after:
                break
        time.sleep(0.05)
    if not job.active:
        return {"stage": stage, "error": f"the job ended ({job.status}) before Cancel: {job.error}"}
    where = job.where()
    clicked = time.time()
    runner.cancel()
    label = job.progress()[1]
    while job.ended is None:  # set after the status, when the worker has really stopped
        time.sleep(0.02)
    return {"stage": stage, "where_at_cancel": where, "label_while_cancelling": label,
            "seconds_into_stage": round(clicked - t_stage, 2), "latency_s": round(job.ended - clicked, 3),
            "status": job.status, "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--after", type=float, default=3.0, help="seconds into a stage before Cancel is clicked")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    from structprune.config import PruneConfig
    from structprune.jobs import JobRunner
    from structprune.models import load_model
    from structprune.planning import stepthrough_stages
    from structprune.stepthrough import MAX_STEPS, admm_stepthrough

    loaded = load_model(a.model)
    cfg = PruneConfig(model=a.model, device="cpu", **QUICK)
    runner = JobRunner()
    fresh = JobRunner()  # nothing loaded yet: the first run's job loads the model (the app's first Run)
    rows = [{"job": "prune", **cancel_in(fresh, lambda: fresh.submit_prune(cfg), "load", 0.1)}]
    print(rows[-1], flush=True)
    for stage in PRUNE_STAGES:
        after = 0.5 if stage == "prepare" else a.after  # the copy takes a few seconds: click during it
        rows.append({"job": "prune", **cancel_in(runner, lambda: runner.submit_prune(cfg, loaded), stage, after)})
        print(rows[-1], flush=True)
    for stage in PROFILE_STAGES:
        rows.append({"job": "energy pass", **cancel_in(runner, lambda: runner.submit_profile(cfg, loaded), stage,
                                                         a.after)})
        print(rows[-1], flush=True)
    layer, kind = 3, "mlp"
    stages = stepthrough_stages(loaded.model.config, layer, kind, 8, 256, MAX_STEPS)
    for stage in STEP_STAGES:
        def submit():
            return runner.submit_call("stepthrough", f"step-through L{layer} {kind}", {}, lambda ev, c: admm_stepthrough(
                loaded, layer, kind, 0.3, nsamples=8, seqlen=256, on_event=ev, cancel=c), stages=stages)
        rows.append({"job": "step-through", **cancel_in(runner, submit, stage, 0.2 if stage == "gram" else 1.0)})
        print(rows[-1], flush=True)
    lat = [r["latency_s"] for r in rows if "latency_s" in r]
    out = {
        "what": "seconds from runner.cancel() (the Cancel button) to the end of the job, per stage",
        "model": a.model, "prune_config": cfg.to_dict(), "stepthrough": {"layer": layer, "module": kind, "calibration": "8x256"},
        "after_s": a.after, "rows": rows, "max_latency_s": max(lat) if lat else None,
        "niceness": os.nice(0), "cpus": os.cpu_count(),
        "note": "one measurement per stage on a shared 2-core machine; the load averages say how busy it was",
    }
    write_json(a.out, out)
    print(f"max latency {out['max_latency_s']} s; {a.out}")
    return out


if __name__ == "__main__":
    main()
