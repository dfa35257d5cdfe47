"""The quality benchmark of docs/PROTOCOL.md: every method on one model, one JSON record per run.

    .venv/bin/python -m benchmarks.compare                      # the full grid (hours on 2 CPU cores)
    .venv/bin/python -m benchmarks.compare --quick              # smoke run: minutes
    .venv/bin/python -m benchmarks.compare --sweep-temperature  # structprune's T, chosen by calibration loss
    .venv/bin/python -m benchmarks.compare --report-only        # tables and plots from existing records
    .venv/bin/python -m benchmarks.compare --executor ray       # every cell a Ray task (local Ray, or --address)

Grid: `smollm2-135m`; the baselines, structprune with its default config and its ablations
(allocation uniform / threshold, selector admm / saliency, target dense, saliency diag); prunable
sparsity 0.1..0.5; eval on the `sotu` test split (all windows unless --eval-windows) and the first
64 windows of `brown`; seqlen 512; calibration 64 x 512 seed 0, and seeds 1 and 2 for structprune,
flap and wanda-sp. The tiny models (no tokenizer) calibrate and evaluate on random tokens, as
`run_prune` does: a smoke grid in seconds.

Resumable: each run is written to `<results>/<key>.json`, the key naming everything the run depends
on (model, method, allocation, temperature, energy, selector, saliency, target, sparsity, seed,
calibration size, eval windows, any other non-default setting); finished keys are skipped. The dense
perplexities, the dense calibration loss and the forward floor (one plain forward pass over the
calibration set, the yardstick for CPU speed) are computed once and cached in `<results>/dense.json`.
Executors (benchmarks/sweep.py): `sequential` runs the cells one after another in this process; `ray`
runs each as a Ray task (one GPU when the cluster has GPUs, else --cpus-per-task CPUs) that returns
its record (and any dense reference it computed) to this process, which writes them. A cell that
raises is written to `<results>/failed/<key>.json` with its error, and retried by the next run.
Afterwards `benchmarks.report` writes SUMMARY.md and ppl_vs_sparsity.html (and, for the sweep,
ALLOCATION_SWEEP.md) next to the records.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python benchmarks/compare.py`: run the module by its name,
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so Ray workers import it, not a __main__
    from benchmarks.compare import main as _main

    sys.exit(_main())

import argparse
import importlib.util
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch

from structprune.config import PruneConfig
from structprune.data.corpora import corpus_id, corpus_label
from structprune.data.calibration import calibration_ids, random_token_data
from structprune.data.windows import CalibrationSpec, corpus_token_ids, eval_windows, protocol_string
from structprune.estimate import estimate_memory
from structprune.evaluation import perplexity, resolve_device
from structprune.methods import get_method
from structprune.models import TINY_MODELS, LoadedModel, load_model
from structprune.run import (calibration_nll, forward_floor_seconds, heldout_ids, heldout_nll,
                             run_prune)

from . import report
from .sweep import EXECUTORS, Cell, CellProgress, cluster_gpus, ray_init, run_ray, run_sequential
from .variants import GRID, QUICK, SWEEP_ENERGIES, SWEEP_TEMPERATURES, Variant, ignored_fields, sweep_variants

RESULTS = Path(__file__).parent / "results"
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)
SWEEP_SPARSITIES = (0.3, 0.5)
BROWN_WINDOWS = 64
TIMELINE_POINTS = 200  # memory timeline points kept per benchmark record
FAILED_DIR = "failed"  # <results>/failed/<key>.json: the error of a cell that raised (retried next run)
FAILURE_SCHEMA = "structprune.sweep-failure/1"  # not a run record: loaders skip it


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation corpora and how many windows of each (None = all)."""

    windows: tuple[tuple[str, int | None], ...]

    @property
    def tag(self) -> str:
        return "_".join(f"{name}-{'all' if n is None else n}" for name, n in self.windows)


_KEYED = {"model", "method", "allocation", "temperature", "energy", "selector", "saliency", "target", "sparsity",
          "seed", "nsamples", "seqlen"}
_NOT_KEYED = {"eval_data", "eval_windows", "device", "batch_size"}  # do not change the pruned model


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def run_key(cfg: PruneConfig, ev: EvalSpec) -> str:
    """A stable file name for one run. Settings a method ignores are left out (baselines fix their
    own allocation); other settings appear only when they differ from PruneConfig's defaults, so
    adding a config field does not rename finished runs."""
    parts = [cfg.model, cfg.method]
    if cfg.method == "structprune":
        alloc = cfg.allocation
        if alloc == "softmax":
            alloc += f"-T{_num(cfg.temperature)}"
        if cfg.allocation in ("softmax", "threshold"):
            alloc += f"-{cfg.energy}"
        parts += [alloc, f"{cfg.selector}-{cfg.saliency}", cfg.target]
    defaults = PruneConfig()
    ignored = ignored_fields(cfg.to_dict())
    for f in fields(PruneConfig):
        if f.name in _KEYED | _NOT_KEYED | ignored:
            continue
        value = getattr(cfg, f.name)
        if value != getattr(defaults, f.name):
            parts.append(f"{f.name}={value}")
    parts += [f"s{cfg.sparsity:.2f}", f"seed{cfg.seed}", f"calib{cfg.nsamples}x{cfg.seqlen}", ev.tag]
    return "__".join(str(p).replace("/", "-").replace(" ", "") for p in parts)


# --------------------------------------------------------------------------------------------- cache


class DenseCache:
    """Dense perplexities, dense calibration losses and forward floors, in one JSON file the driver
    owns; workers compute what is missing and return it (`merge`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def merge(self, entries: dict) -> None:
        new = {k: v for k, v in entries.items() if k not in self.data}
        if new:
            self.data.update(new)
            write_json(self.path, self.data)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def eval_spec(args) -> EvalSpec:
    """sotu and brown; the tiny models (no tokenizer) are evaluated on random tokens, as run_prune does."""
    if args.model in TINY_MODELS:
        return EvalSpec((("random", args.eval_windows or 4),))
    return EvalSpec((("sotu", args.eval_windows), ("brown", args.brown_windows)))


# --------------------------------------------------------------------------------------------- runs


class Bench:
    """Runs cells on one loaded model (in a worker, or in the driver for the sequential executor)
    and returns their records; dense references come from and go to a cache dict."""

    def __init__(self, settings: dict) -> None:
        self.args = a = SimpleNamespace(**settings)
        self.device = resolve_device(a.device)
        self.loaded: LoadedModel = load_model(a.model)
        self.known: dict = {}  # dense references this process has computed or been given
        self.stats_cache: dict | None = {} if a.share_pass1 else None
        self.ev = eval_spec(a)
        tok = self.loaded.tokenizer
        if tok is None and a.model not in TINY_MODELS:
            raise SystemExit(f"{a.model} has no tokenizer; the benchmark needs a real model or a tiny one")
        if tok is None:
            n = self.ev.windows[0][1]
            cfg = PruneConfig(model=a.model, nsamples=a.nsamples, seqlen=a.seqlen, eval_windows=n)
            self.windows = {"random": random_token_data(cfg, self.loaded.model.config.vocab_size)[1]["random"]}
        else:
            self.windows = {name: eval_windows(corpus_token_ids(tok, name, "test"), a.seqlen, n)
                            for name, n in self.ev.windows}

    def _config(self, seed: int) -> PruneConfig:
        return PruneConfig(model=self.args.model, nsamples=self.args.nsamples, seqlen=self.args.seqlen, seed=seed)

    def protocol(self, name: str, seed: int) -> str:
        a = self.args
        if name == "random":
            return protocol_string("random-tokens", a.seqlen, self.windows[name].shape[0],
                                   ("random-tokens", a.nsamples, a.seqlen, seed))
        calib = CalibrationSpec(corpus_id("sotu", "calib"), a.nsamples, a.seqlen, seed)
        return protocol_string(corpus_id(name, "test"), a.seqlen, self.windows[name].shape[0], calib)

    @staticmethod
    def _get(cache: dict, key: str, compute):
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def dense_ppl(self, name: str, cache: dict) -> dict:
        a, win = self.args, self.windows[name]
        key = f"ppl|{a.model}|{name}|seqlen{a.seqlen}|windows{win.shape[0]}"
        return self._get(cache, key, lambda: perplexity(self.loaded.model, win, device=self.device,
                                                        batch_size=a.eval_batch_size).to_dict())

    def calib_reference(self, seed: int, cache: dict) -> dict:
        """Dense calibration loss on the windows calib_loss["pruned"] uses, and the forward floor."""
        a = self.args
        key = f"calib|{a.model}|sotu|{a.nsamples}x{a.seqlen}|seed{seed}|{self.device.type}|heldout"

        def compute():
            vocab = self.loaded.model.config.vocab_size
            ids = calibration_ids(self._config(seed), self.loaded.tokenizer, vocab)
            nll, n = calibration_nll(self.loaded.model, ids, self.device)
            held = heldout_ids(self._config(seed), self.loaded.tokenizer, vocab)
            held_nll = heldout_nll(self.loaded.model, held, self.device)[0] if held is not None else None
            floor = forward_floor_seconds(self.loaded.model, ids, self.device)
            return {"dense_calib_nll": nll, "calib_nll_windows": n, "dense_heldout_nll": held_nll,
                    "heldout_windows": None if held is None else int(held.shape[0]), "forward_floor_s": floor,
                    "threads": torch.get_num_threads(), "measured": time.strftime("%Y-%m-%d %H:%M")}

        return self._get(cache, key, compute)

    def run(self, cell: Cell, cache: dict) -> dict:
        """The cell's record (dense references from `cache`, computed into it when missing)."""
        a, variant, seed = self.args, cell.variant, cell.seed
        cfg = variant.config(model=a.model, sparsity=cell.sparsity, seed=seed, nsamples=a.nsamples, seqlen=a.seqlen,
                             eval_data=(), device=a.device)
        ref = self.calib_reference(seed, cache)
        dense = {name: self.dense_ppl(name, cache) for name in self.windows}
        n_cached = len(self.stats_cache) if self.stats_cache is not None else 0
        res = run_prune(cfg, self.loaded, evaluate_dense=False, stats_cache=self.stats_cache,
                        on_event=_progress if a.progress else None)
        shared = self.stats_cache is not None and cfg.method not in ("magnitude", "global-taylor") \
            and len(self.stats_cache) == n_cached
        rec = res.record
        t = time.perf_counter()
        for name, win in self.windows.items():
            proto = self.protocol(name, seed)
            r = perplexity(res.model, win, device=self.device, batch_size=a.eval_batch_size, protocol=proto)
            label = "random tokens" if name == "random" else corpus_label(name, "test")
            rec["ppl"]["pruned"][name] = {**r.to_dict(), "label": label}
            rec["ppl"]["dense"][name] = {**dense[name], "protocol": proto, "label": label}
        rec["timing"]["eval_pruned_s"] = time.perf_counter() - t
        rec["config"]["eval_data"] = [name for name, _ in self.ev.windows]
        tl = rec["memory"]["timeline"]
        rec["memory"]["timeline"] = tl[:: max(1, len(tl) // TIMELINE_POINTS)]
        est = estimate_memory(self.loaded.model.config, cfg.method, cfg.nsamples,
                              cfg.seqlen, cfg.dtype, cfg.batch_size,
                              sensitivity=get_method(cfg.method)(cfg).wants_sensitivity(),
                              target=cfg.target, relative=cfg.relative_error,
                              host_grams=self.device.type == "cuda", refine=cfg.refine_epochs > 0)
        prune_s = rec["timing"].get("pass1_s", 0.0) + rec["timing"].get("pass2_s", 0.0)
        rec["benchmark"] = {
            "key": cell.key, "variant": variant.label, "main": variant.main,
            "eval_windows": {name: n for name, n in self.ev.windows},
            "estimated_peak_bytes": est["peak_bytes"],
            "forward_floor_s": ref["forward_floor_s"],
            "prune_over_floor": prune_s / ref["forward_floor_s"] if ref["forward_floor_s"] > 0 else None,
            "pass1_shared": shared,
            "dense_calib_nll": ref["dense_calib_nll"],
            "dense_heldout_nll": ref.get("dense_heldout_nll"),
            "threads": torch.get_num_threads(),
            "timing_contended": bool(a.busy),
            "executor": a.executor, "host": socket.gethostname(),
        }
        return rec


_BENCHES: dict[tuple, Bench] = {}  # per process: a worker loads its model once for all its cells


def run_cell(settings: dict, cell: Cell, cache: dict) -> dict:
    """The task both executors run: {"record", "cache": dense references computed here}."""
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    _quiet_transformers()
    ident = tuple(settings[k] for k in ("model", "device", "nsamples", "seqlen", "eval_windows", "brown_windows",
                                        "eval_batch_size", "share_pass1"))
    bench = _BENCHES.get(ident)
    if bench is None:
        bench = _BENCHES[ident] = Bench(settings)
    local = {**bench.known, **cache}
    rec = bench.run(cell, local)
    bench.known.update(local)
    return {"record": rec, "cache": {k: v for k, v in local.items() if k not in cache}}


def _progress(event) -> None:
    where = f"layer {event.layer + 1}/{event.n_layers}" if event.layer >= 0 else event.message
    sys.stderr.write(f"\r  {event.stage:<12} {where:<40} {event.elapsed_s:7.1f} s")
    if event.layer < 0 or event.layer + 1 == event.n_layers:
        sys.stderr.write("\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: sparsity 0.3 and 0.5, {', '.join(QUICK)}, 16 calibration and 16 eval windows, "
                        "results in <results>/quick")
    p.add_argument("--sweep-temperature", action="store_true",
                   help="structprune softmax over a log grid of T plus uniform and threshold at 30%% and 50%%; "
                        "the default T is chosen by calibration loss")
    p.add_argument("--report-only", action="store_true", help="only regenerate the tables and plots")
    p.add_argument("--dry-run", action="store_true", help="list the runs (todo / skip) without running")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=None, metavar="LABEL",
                   help="variant labels to run (default: all of the grid); e.g. flap 'structprune alloc=uniform'")
    p.add_argument("--sparsities", nargs="+", type=float, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds for every variant")
    p.add_argument("--extra-seeds", nargs="*", type=int, default=None,
                   help="seeds for the main variants only (default 1 2; none with --quick / --sweep-temperature)")
    p.add_argument("--temperatures", nargs="+", type=float, default=list(SWEEP_TEMPERATURES))
    p.add_argument("--energies", nargs="+", default=list(SWEEP_ENERGIES), help="energies the sweep tries")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 64; 16 with --quick)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None, help="sotu test windows (default all; 16 with --quick)")
    p.add_argument("--brown-windows", type=int, default=None, help=f"brown windows (default {BROWN_WINDOWS}; 16 with --quick)")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"),
                   help="cpu or cuda (default: cpu; with --executor ray, cuda when the cluster has GPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--share-pass1", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse pass-1 statistics across runs that share them (default: on for the sweep only, "
                        "so the grid's pass-1 times stay honest; with --executor ray, within each worker)")
    p.add_argument("--results", default=None, help="results folder (default benchmarks/results[/quick])")
    p.add_argument("--progress", action="store_true", help="per-layer progress on stderr")
    p.add_argument("--executor", choices=EXECUTORS, default="sequential",
                   help="sequential: one cell after another in this process; ray: every cell a Ray task "
                        "(a local Ray started on demand, or the cluster at --address)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (e.g. auto, or ray://head:10001); default: start a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--cpus-per-task", type=int, default=1,
                   help="CPUs each Ray task asks for, and its torch threads (each also asks for one GPU when "
                        "the cluster has GPUs)")
    p.add_argument("--busy", action="store_true",
                   help="other work shares the CPU: record the runs' times but keep them out of the time table")
    return p


def resolve_args(args) -> argparse.Namespace:
    q = args.quick
    args.nsamples = args.nsamples or (16 if q else 64)
    if args.eval_windows is None and q:
        args.eval_windows = 16
    args.brown_windows = args.brown_windows or (16 if q else BROWN_WINDOWS)
    if args.sweep_temperature:
        args.sparsities = args.sparsities or list(SWEEP_SPARSITIES)
    else:
        args.sparsities = args.sparsities or ([0.3, 0.5] if q else list(SPARSITIES))
    if args.extra_seeds is None:
        args.extra_seeds = [] if (q or args.sweep_temperature) else [1, 2]
    if args.share_pass1 is None:
        args.share_pass1 = args.sweep_temperature
    args.results = args.results or str(RESULTS / "quick" if q else RESULTS)
    if args.executor == "sequential":
        args.device = args.device or "cpu"
    return args


def plan(args) -> list[tuple[Variant, float, int]]:
    if args.sweep_temperature:
        variants = sweep_variants(args.temperatures, args.energies)
    else:
        variants = GRID if not args.quick else tuple(v for v in GRID if v.label in QUICK)
    if args.methods:
        known = {v.label for v in variants}
        unknown = set(args.methods) - known
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {sorted(known)}")
        variants = tuple(v for v in variants if v.label in args.methods)
    runs = []
    for seed in list(args.seeds) + [s for s in args.extra_seeds if s not in args.seeds]:
        for s in args.sparsities:
            for v in variants:
                if seed in args.seeds or v.main:
                    runs.append((v, s, seed))
    return runs


def cells(args, runs: list[tuple[Variant, float, int]]) -> list[Cell]:
    ev = eval_spec(args)
    out = []
    for v, s, seed in runs:
        cfg = v.config(model=args.model, sparsity=s, seed=seed, nsamples=args.nsamples, seqlen=args.seqlen,
                       eval_data=(), device=args.device or "auto")  # the device does not name a run
        out.append(Cell(run_key(cfg, ev), v, s, seed))
    return out


def failure_path(out: Path, key: str) -> Path:
    return out / FAILED_DIR / f"{key}.json"


def sweep(args, grid: list[Cell]) -> dict:
    """Runs the cells without a record in `args.results` with `args.executor`; the driver writes
    each record (and each failure, under failed/) as it arrives. Returns the counts."""
    out = Path(args.results)
    todo = [c for c in grid if not (out / f"{c.key}.json").exists()]
    for c in grid:
        if c not in todo:
            print(f"skip   {c.key}", file=sys.stderr)
    counts = {"cells": len(grid), "skipped": len(grid) - len(todo), "finished": 0, "failed": 0}
    if args.dry_run or not todo:
        for c in todo:
            print(f"todo   {c.key}", file=sys.stderr)
        return counts
    dense = DenseCache(out / "dense.json")
    bar = CellProgress(len(grid), skipped=counts["skipped"])

    def on_outcome(cell: Cell, res: dict) -> None:
        dense.merge(res.get("cache", {}))
        if "record" in res:
            rec = res["record"]
            write_json(out / f"{cell.key}.json", rec)
            failure_path(out, cell.key).unlink(missing_ok=True)  # an earlier failure of this cell is over
            counts["finished"] += 1
            ppl = "  ".join(f"{n} {v['value']:.4g}" for n, v in rec["ppl"]["pruned"].items() if v["value"] is not None)
            bar.log(f"done   {cell.key}: {ppl}  calib {rec['calib_loss']['pruned']:.4f}  "
                    f"({rec['timing']['total_s'] + rec['timing']['eval_pruned_s']:.0f} s)")
        else:
            err = res["error"]
            write_json(failure_path(out, cell.key), {
                "schema": FAILURE_SCHEMA, "status": "failed", "key": cell.key, "variant": cell.variant.label,
                "sparsity": cell.sparsity, "seed": cell.seed, "executor": args.executor, "error": err,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            counts["failed"] += 1
            bar.log(f"FAILED {cell.key}: {err['type']}: {err['message']}")
        bar.advance(failed="record" not in res)

    settings = dict(vars(args))
    bar.draw()
    try:
        if args.executor == "sequential":
            run_sequential(run_cell, settings, todo, dense.data, on_outcome)
        else:
            started = ray_init(args.address, args.num_cpus)
            try:
                gpus = 1 if cluster_gpus() and args.device != "cpu" else 0
                if args.device == "cuda" and not gpus:
                    _fail("--device cuda: the Ray cluster has no GPU")
                settings["device"] = args.device or ("cuda" if gpus else "cpu")
                settings["threads"] = args.cpus_per_task
                run_ray(run_cell, settings, todo, dense.data, on_outcome, args.cpus_per_task, gpus)
            finally:
                if started:
                    import ray

                    ray.shutdown()
    finally:
        bar.close()
    if counts["failed"]:
        print(f"{counts['failed']} cell(s) failed: their errors are in {out / FAILED_DIR}; "
              "a second run retries them and skips the finished ones", file=sys.stderr)
    return counts


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args) -> None:
    """Every bad executor setting is one line before any work."""
    if args.executor == "sequential":
        for name in ("address", "num_cpus"):
            if getattr(args, name) is not None:
                _fail(f"--{name.replace('_', '-')} needs --executor ray")
        return
    if importlib.util.find_spec("ray") is None:
        _fail("--executor ray needs Ray: pip install -r requirements.txt -c requirements.lock")
    if args.progress:
        _fail("--progress (per-layer lines) needs --executor sequential; the Ray executor shows a bar over cells")
    if args.cpus_per_task < 1:
        _fail(f"--cpus-per-task must be at least 1 (got {args.cpus_per_task})")
    if args.address and args.num_cpus is not None:
        _fail("--num-cpus sizes a local Ray; a cluster joined with --address has its own")
    if args.num_cpus is not None and not 1 <= args.num_cpus:
        _fail(f"--num-cpus must be at least 1 (got {args.num_cpus})")


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_transformers()
    if not args.report_only:
        runs = plan(args)
        print(f"{len(runs)} runs in {args.results} ({args.executor})", file=sys.stderr)
        counts = sweep(args, cells(args, runs))
        if args.dry_run:
            return 0
    written = report.write_all(Path(args.results), sweep=args.sweep_temperature, temperatures=args.temperatures,
                               energies=args.energies)
    for path in written:
        print(f"wrote  {path}", file=sys.stderr)
    return 1 if not args.report_only and counts["failed"] else 0  # a script sees that a cell failed


if __name__ == "__main__":
    sys.exit(main())
