"""Does more calibration data close structprune's gap to the 0.7x-FLAP bar at 30%?

    .venv/bin/python -m benchmarks.calibration_size                  # runs what is missing, then the table
    .venv/bin/python -m benchmarks.calibration_size --sizes 32 128   # a subset
    .venv/bin/python -m benchmarks.calibration_size --report-only

Structprune (default settings) and FLAP with 32, 64, 128 and 256 calibration windows of 512 tokens,
seed 0, on the comparison grid's eval windows (all 340 `sotu` test windows, 64 `brown`). The 64-window
point is the grid's own records (`benchmarks/results/`); the others run through `benchmarks.compare`
into `benchmarks/results/calibration-size/n<N>/` (resumable: finished records are skipped). Writes
CALIBRATION_SIZE.md in that folder.

The held-out calibration windows depend on the calibration draw (they avoid its tokens), so the
table gives each run's held-out loss *over the dense model's on the same windows*: the damage
pruning did, comparable across sizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import compare
from benchmarks.report import _fmt, _ppl, load_records, matches

RESULTS = compare.RESULTS / "calibration-size"
SIZES = (32, 64, 128, 256)
GRID_SIZE = 64  # the comparison grid's calibration: its records are reused, not rerun
METHODS = ("structprune", "flap")
EVALS = ("sotu", "brown")


def folder(n: int) -> Path:
    return compare.RESULTS if n == GRID_SIZE else RESULTS / f"n{n}"


def run_missing(sizes, sparsities) -> None:
    for n in sizes:
        if n == GRID_SIZE:
            continue
        compare.main(["--methods", *METHODS, "--sparsities", *map(str, sparsities), "--nsamples", str(n),
                      "--seeds", "0", "--extra-seeds", "--results", str(folder(n))])


def find(recs: list[dict], label: str, sparsity: float, n: int) -> dict | None:
    """The seed-0 record of a grid variant at one sparsity and calibration size."""
    variant = next(v for v in compare.GRID if v.label == label)
    return next((rec for rec in recs if matches(rec, variant) and rec["config"]["nsamples"] == n
                 and rec["config"]["seed"] == 0 and round(rec["sparsity"]["target"], 4) == sparsity), None)


def damage(rec: dict | None) -> float | None:
    """Held-out calibration loss over the dense model's on the same windows (nats/token)."""
    if rec is None:
        return None
    held, dense = rec["calib_loss"].get("heldout"), rec["benchmark"].get("dense_heldout_nll")
    return None if held is None or dense is None else held - dense


def table(sizes, sparsities) -> str:
    recs = {n: load_records(folder(n)) for n in sizes}
    lines = ["# Calibration size: structprune and FLAP (smollm2-135m, seed 0)", "",
             "Perplexity on `sotu-test · seqlen 512 · 340 windows` / `brown-test · seqlen 512 · 64 windows` "
             "with `calib sotu-calib Nx512 seed 0`. Held-out damage: the pruned model's loss on 16 held-out "
             "calibration windows minus the dense model's on the same windows (nats/token). Prune time: "
             "pass 1 + pass 2 on this machine's CPU, one run each (records of different days: compare the "
             "ratio to one plain forward pass over that run's calibration set, in brackets). Written by "
             "`benchmarks/calibration_size.py`.",
             "",
             "| sparsity | calibration | structprune sotu / brown | FLAP sotu / brown | structprune / FLAP "
             "| held-out damage structprune / FLAP | prune time structprune / FLAP (s) |",
             "|---|---|---|---|---|---|---|"]
    for s in sparsities:
        for n in sizes:
            sp, fl = (find(recs[n], label, s, n) for label in METHODS)
            if sp is None and fl is None:
                continue

            def ppl(rec):
                return " / ".join(_fmt(_ppl(rec, e)) if rec else "–" for e in EVALS)

            def secs(rec):
                if rec is None:
                    return "–"
                s = rec["timing"].get("pass1_s", 0) + rec["timing"].get("pass2_s", 0)
                floor = rec["benchmark"].get("prune_over_floor")
                return f"{s:.0f}" + ("" if floor is None else f" ({floor:.1f}x)")

            ratio = " / ".join(f"{_ppl(sp, e) / _ppl(fl, e):.3f}" for e in EVALS) if sp and fl else "–"
            dmg = " / ".join("–" if d is None else f"{d:.4f}" for d in (damage(sp), damage(fl)))
            lines.append(f"| {s:.0%} | {n} x 512 ({n * 512:,} tokens) | {ppl(sp)} | {ppl(fl)} | {ratio} | {dmg} "
                         f"| {secs(sp)} / {secs(fl)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="calibration windows of 512 tokens")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3])
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if not args.report_only:
        run_missing(args.sizes, args.sparsities)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "CALIBRATION_SIZE.md"
    out.write_text(table(args.sizes, args.sparsities))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
