"""Sequential vs Ray executor on one grid, in one run: wall time ratio and record equality.

    .venv/bin/python -m benchmarks.sweep_ray            # SmolLM2, 16 x 512 calibration, 16 + 16 eval windows

The grid: structprune, flap and wanda-sp at 20/30/50%, seed 0. The sequential executor runs it in
this process with torch's default threads (all cores); the Ray executor on a local Ray of
`--workers` CPUs, one single-threaded task per CPU. Both start from an empty results folder (each
pays for loading the model and its dense references). The Ray records are kept under
`results/sweep-ray/records/` (the app's Compare page reads them); the JSON record
`results/sweep-ray/sweep_ray.json` holds both wall times, their ratio, the load average around
each phase (the machine is shared) and how far the two executors' records differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import compare
from .compare import write_json

OUT = compare.RESULTS / "sweep-ray"


def grid_args(results: Path, model: str, nsamples: int, seqlen: int, windows: int) -> list[str]:
    return ["--model", model, "--methods", "structprune", "flap", "wanda-sp", "--sparsities", "0.2", "0.3", "0.5",
            "--extra-seeds", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--eval-windows", str(windows),
            "--brown-windows", str(windows), "--results", str(results), "--busy"]


def timed(argv: list[str]) -> dict:
    load0, t = os.getloadavg(), time.perf_counter()
    compare.main(argv)
    return {"wall_s": time.perf_counter() - t, "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def kept_units(rec: dict) -> list:
    return sorted((m["layer"], m["module"], m.get("kept")) for m in rec["modules"])


def compare_records(a: Path, b: Path) -> dict:
    """Per cell: same kept units? largest relative perplexity difference between the executors."""
    cells, worst = {}, 0.0
    for pa in sorted(a.glob("*.json")):
        ra = json.loads(pa.read_text())
        if "benchmark" not in ra:
            continue
        pb = b / pa.name
        if not pb.exists():
            cells[pa.stem] = {"missing": True}
            continue
        rb = json.loads(pb.read_text())
        rel = max(abs(ra["ppl"]["pruned"][n]["value"] - rb["ppl"]["pruned"][n]["value"])
                  / ra["ppl"]["pruned"][n]["value"] for n in ra["ppl"]["pruned"])
        worst = max(worst, rel)
        cells[pa.stem] = {"kept_units_equal": kept_units(ra) == kept_units(rb), "ppl_max_rel_diff": rel,
                          "ppl": {n: [ra["ppl"]["pruned"][n]["value"], rb["ppl"]["pruned"][n]["value"]]
                                  for n in ra["ppl"]["pruned"]}}
    return {"cells": cells, "all_kept_units_equal": all(c.get("kept_units_equal") for c in cells.values()),
            "ppl_max_rel_diff": worst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16, help="sotu and brown evaluation windows each")
    p.add_argument("--workers", type=int, default=2, help="local Ray CPUs, one single-threaded task each")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    out = Path(a.out)
    work = Path(tempfile.mkdtemp(prefix="sweep-ray-"))  # both executors' records; kept if the run stops early
    seq_dir, ray_dir = work / "sequential", work / "ray"
    base = grid_args(seq_dir, a.model, a.nsamples, a.seqlen, a.windows)
    record = {
        "kind": "sweep-executor-benchmark",
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "grid": {"model": a.model, "methods": ["structprune", "flap", "wanda-sp"], "sparsities": [0.2, 0.3, 0.5],
                 "seed": 0, "calibration": f"{a.nsamples}x{a.seqlen} sotu-calib",
                 "eval_windows": {"sotu": a.windows, "brown": a.windows}},
        "machine": {"cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "note": "both executors start cold (model load, dense references); the machine is shared "
                "(load averages around each phase); timings are one run",
        "status": "sequential running",
    }
    write_json(out / "sweep_ray.json", record)  # each phase is kept as it ends: a long run may be stopped
    record["sequential"] = {**timed(base), "torch_threads": torch.get_num_threads()}
    record["status"] = "ray running"
    write_json(out / "sweep_ray.json", record)
    ray = timed(grid_args(ray_dir, a.model, a.nsamples, a.seqlen, a.windows)
                + ["--executor", "ray", "--num-cpus", str(a.workers), "--cpus-per-task", "1"])
    record.update({
        "status": "complete",
        "ray": {**ray, "workers": a.workers, "cpus_per_task": 1, "torch_threads_per_task": 1},
        "ray_over_sequential_wall": ray["wall_s"] / record["sequential"]["wall_s"],
        "records": compare_records(seq_dir, ray_dir),
    })
    record["grid"]["cells"] = len(list(ray_dir.glob("*__*.json")))
    records = out / "records"
    shutil.rmtree(records, ignore_errors=True)
    shutil.copytree(ray_dir, records, ignore=shutil.ignore_patterns("*.md", "*.html"))
    write_json(out / "sweep_ray.json", record)
    print(json.dumps({k: record[k] for k in ("sequential", "ray", "ray_over_sequential_wall")}, indent=1))
    print(f"kept units equal: {record['records']['all_kept_units_equal']}, "
          f"ppl max rel diff {record['records']['ppl_max_rel_diff']:.2e}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
