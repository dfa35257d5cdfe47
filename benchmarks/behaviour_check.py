"""Behaviour check for refactors: the kept units and perplexities of fixed configurations.

    python benchmarks/behaviour_check.py --out before.json            # on the old tree
    python benchmarks/behaviour_check.py --out after.json --compare before.json

`--compare` exits 1 when a case's kept units differ or a perplexity / calibration loss differs
by more than `--rtol` (relative). The cases: every method and the main structprune variants on a
tiny model of each family (random tokens), and, unless `--tiny-only`, SmolLM2-135M at 30% with
16 x 512 calibration windows, seed 0 and 16 State of the Union evaluation windows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from structprune.config import PruneConfig
from structprune.models import TINY_MODELS
from structprune.run import run_prune

TINY = dict(sparsity=0.3, nsamples=4, seqlen=32, eval_windows=2, sensitivity_windows=2)
VARIANTS = {  # name -> settings on top of TINY (structprune unless a method is named)
    "structprune": {},
    "admm": {"selector": "admm"},
    "dense-target": {"target": "dense"},
    "dense-target-damp": {"target": "dense", "damp": 0.05},
    "sensitivity": {"energy": "sensitivity"},
    "threshold": {"allocation": "threshold"},
    "refine": {"refine_epochs": 2},
    "magnitude": {"method": "magnitude"},
    "wanda-sp": {"method": "wanda-sp"},
    "flap": {"method": "flap"},
    "owl": {"method": "owl"},
    "global-taylor": {"method": "global-taylor"},
}
SMOLLM2 = dict(model="smollm2-135m", sparsity=0.3, nsamples=16, seqlen=512, seed=0, eval_windows=16)


def cases(tiny_only: bool) -> dict[str, dict]:
    out = {f"{model}/{name}": {"model": model, **TINY, **v} for model in TINY_MODELS for name, v in VARIANTS.items()}
    if not tiny_only:
        out["smollm2-135m/structprune-30"] = dict(SMOLLM2)
    return out


def outcome(settings: dict) -> dict:
    torch.manual_seed(0)
    t = time.perf_counter()
    rec = run_prune(PruneConfig(**settings)).record
    kept = {f"{m['layer']}/{m['module']}": m["kept"] for m in rec["modules"]}
    ppl = {f"{tag}/{name}": r["value"] for tag in ("dense", "pruned") for name, r in rec["ppl"][tag].items()}
    losses = {k: v for k, v in rec["calib_loss"].items() if isinstance(v, float)}
    return {"kept": kept, "ppl": ppl, "calib_loss": losses, "seconds": round(time.perf_counter() - t, 1)}


def differences(before: dict, after: dict, rtol: float) -> list[str]:
    out = []
    for case, b in before.items():
        a = after.get(case)
        if a is None:
            out.append(f"{case}: missing")
            continue
        if a["kept"] != b["kept"]:
            out.append(f"{case}: kept units differ")
        for group in ("ppl", "calib_loss"):
            for k, v in b[group].items():
                w = a[group].get(k)
                same = (w is not None and v is not None
                        and (v == w or (math.isfinite(v) and abs(w - v) <= rtol * abs(v))))
                if not same and not (v is None and w is None):
                    out.append(f"{case}: {group} {k} {v!r} -> {w!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compare", type=Path)
    p.add_argument("--tiny-only", action="store_true")
    p.add_argument("--rtol", type=float, default=1e-6)
    args = p.parse_args(argv)
    results = {}
    for case, settings in cases(args.tiny_only).items():
        results[case] = outcome(settings)
        print(f"{case}: {results[case]['ppl']} ({results[case]['seconds']} s)", flush=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        diffs = differences({k: v for k, v in before.items() if k in results}, results, args.rtol)
        print("\n".join(diffs) or f"identical: {len(results)} cases (kept units, ppl and losses within {args.rtol})")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
