"""Does more calibration data close structprune's gap to the 0.7x-FLAP bar at 30%?

    .venv/bin/python -m benchmarks.calibration_size                  # runs what is missing, then the table
    .venv/bin/python -m benchmarks.calibration_size --sizes 32 128   # a subset
    .venv/bin/python -m benchmarks.calibration_size --report-only

Structprune (default settings) and FLAP with 32, 64, 128 and 256 calibration windows of 512 tokens,
seed 0, on the comparison grid's eval windows (all 340 `sotu` test windows, 64 `brown`). The 64-window
point is the grid's own records (`benchmarks/results/`); the others run through `benchmarks.compare`
into `benchmarks/results/calibration-size/n<N>/` (resumable: finished records are skipped). Writes
CALIBRATION_SIZE.md in that folder.

With `--dense-targets` (default: at 64 and 256 windows) structprune with `--target dense` runs too:
fitting each module to the dense model's output loses on held-out windows with 64 windows while it
ties in-sample (ABLATIONS.md), which reads as over-fitting; the second table asks whether it pays
with 4x the data.

The held-out calibration windows depend on the calibration draw (they avoid its tokens), so the
table gives each run's held-out loss *over the dense model's on the same windows*: the damage
pruning did, comparable across sizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import compare
from benchmarks.report import format_value, load_records, matches, pruned_ppl

RESULTS = compare.RESULTS / "calibration-size"
SIZES = (32, 64, 128, 256)
GRID_SIZE = 64  # the comparison grid's calibration: its records are reused, not rerun
METHODS = ("structprune", "flap")
DENSE_TARGETS = "structprune target=dense"  # run at the sizes --dense-targets names
EVALS = ("sotu", "brown")


def folder(n: int) -> Path:
    return compare.RESULTS if n == GRID_SIZE else RESULTS / f"n{n}"


def run_missing(sizes, sparsities, dense_target_sizes=()) -> None:
    """Runs the records not there yet (the grid's own 64-window runs for structprune and FLAP are
    not rerun here: `benchmarks.compare` owns them)."""
    for n in sorted(set(sizes) | set(dense_target_sizes)):
        labels = [*(METHODS if n in sizes and n != GRID_SIZE else ()),
                  *((DENSE_TARGETS,) if n in dense_target_sizes else ())]
        if labels:
            compare.main(["--methods", *labels, "--sparsities", *map(str, sparsities), "--nsamples", str(n),
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


def _ppls(rec: dict | None) -> str:
    return " / ".join(format_value(pruned_ppl(rec, e)) if rec else "–" for e in EVALS)


def _ratios(a: dict | None, b: dict | None) -> str:
    return " / ".join(f"{pruned_ppl(a, e) / pruned_ppl(b, e):.3f}" for e in EVALS) if a and b else "–"


def _damages(*recs) -> str:
    return " / ".join("–" if d is None else f"{d:.4f}" for d in map(damage, recs))


def _prune_time(rec: dict | None) -> str:
    if rec is None:
        return "–"
    seconds = rec["timing"].get("pass1_s", 0) + rec["timing"].get("pass2_s", 0)
    floor = rec["benchmark"].get("prune_over_floor")
    return f"{seconds:.0f}" + ("" if floor is None else f" ({floor:.1f}x)")


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
    dense_rows = []
    for s in sparsities:
        for n in sizes:
            sp, fl, dt = (find(recs[n], label, s, n) for label in (*METHODS, DENSE_TARGETS))
            size = f"{n} x 512 ({n * 512:,} tokens)"
            if sp or fl:
                lines.append(f"| {s:.0%} | {size} | {_ppls(sp)} | {_ppls(fl)} | {_ratios(sp, fl)} "
                             f"| {_damages(sp, fl)} | {_prune_time(sp)} / {_prune_time(fl)} |")
            if dt:
                dense_rows.append(f"| {s:.0%} | {size} | {_ppls(dt)} | {_ppls(sp)} | {_ratios(dt, sp)} "
                                  f"| {_damages(dt, sp)} | {_prune_time(dt)} |")
    if dense_rows:
        lines += ["", "## Dense targets as the calibration grows", "",
                  "`--target dense` fits each module to the dense model's output (cross-Gram: it compensates the "
                  "errors of the layers pruned before it) instead of to its own input's local reconstruction; "
                  "with 64 windows it ties in-sample and loses held out (ABLATIONS.md). Does it pay with more "
                  "data?", "",
                  "| sparsity | calibration | dense targets sotu / brown | local (default) sotu / brown "
                  "| dense / local | held-out damage dense / local | prune time dense (s) |",
                  "|---|---|---|---|---|---|---|"] + dense_rows
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="calibration windows of 512 tokens")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3])
    p.add_argument("--dense-targets", type=int, nargs="*", default=[64, 256], metavar="SIZE",
                   help="sizes at which structprune with --target dense runs too (none: omit)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if not args.report_only:
        run_missing(args.sizes, args.sparsities, args.dense_targets)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "CALIBRATION_SIZE.md"
    out.write_text(table(sorted(set(args.sizes) | set(args.dense_targets)), args.sparsities))  # all that ran
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
