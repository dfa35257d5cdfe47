"""Where the scale benchmark's excess resident memory came from: glibc's heap (issue 20).

    PYTHONPATH=. .venv/bin/python -m benchmarks.scale_allocator     # ~10 min on 2 cores

A 4-layer model of the 1B shape (benchmarks/scale.py's writer; written once under --models),
pruned with the weights on disk as the scale benchmark does (8 x 128 calibration), twice: as the
library runs it, and with MALLOC_MMAP_THRESHOLD_ fixed by the environment before the process starts.
Before the library fixed the threshold itself (memory.return_freed_host_memory, after commit
476e164) the two differed: peak resident 1.28 vs 1.00 GiB (benchmarks/results/scale/allocator.json,
"before"); now they should agree. Each run in its own process, peak = VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks import scale

VARIANTS = {"library": {}, "env-mmap-threshold-128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=str(scale.OUT / "models"))
    p.add_argument("--out", default=str(scale.OUT / "allocator-now.json"))
    args = p.parse_args(argv)
    folder = Path(args.models) / "1b-4l"
    scale.write_model("1b-4l", folder)
    work = Path(args.out).parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, env in VARIANTS.items():
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            r = scale.run_child(folder, "disk", work, 8, 128)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        out[name] = {"ok": r["ok"], "env": env, "peak_rss_bytes": r.get("peak_rss_bytes"), "wall_s": r.get("wall_s"),
                     "rss_by_stage": r.get("rss_by_stage"), "loadavg_before": r["loadavg_before"]}
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "rss_by_stage"}), flush=True)
    from structprune.jsonio import write_json
    from structprune.run import environment

    write_json(args.out, {"schema": "structprune.scale-allocator/1", "shape": scale.SHAPES["1b-4l"],
                          "calibration": "8 x 128 random tokens", "variants": out, "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
