"""Tables and plots from the comparison records in a results folder (see compare.py).

- SUMMARY.md: perplexity per method x sparsity for each eval set (with protocol, machine, date,
  commit), StructPrune's ratios against the issue's bar (seed 0, then the worst of the calibration
  seeds, ratios between runs of the same seed), calibration losses, and device memory
  (measured on CUDA / accounted on CPU, labelled) and pruning time over the forward floor.
- ppl_vs_sparsity.html: plotly, ppl vs sparsity per method (log y, Okabe-Ito colours plus distinct
  markers and dashes, so it reads without colour), then memory and time per method.
- ALLOCATION_SWEEP.md + allocation_sweep.json (with --sweep-temperature): held-out calibration loss
  per candidate allocation (softmax per energy and T, threshold, uniform); the default (energy, T)
  is the one with the lowest mean held-out loss, never test ppl.

Records are matched to variants by their configuration, not by the label they were written under
(in one folder, a run written for the sweep is the grid's run with the same configuration).
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

from structprune.config import PruneConfig

from .variants import GRID, SWEEP_ENERGIES, SWEEP_TEMPERATURES, Variant, ignored_fields, sweep_variants

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star", "hexagon",
           "pentagon", "star-square", "hourglass")
_STRUCTPRUNE_FIELDS = ("allocation", "temperature", "energy", "selector", "saliency", "target", "refit", "bias",
                      "relative_error", "damp", "refine_epochs", "refine_lr", "refine_schedule")
# fields added after records were written, with the value those records ran with
_FIELD_BEFORE_IT_EXISTED = {"relative_error": False, "damp": 0.01, "refine_epochs": 0, "refine_lr": 1e-4,
                            "refine_schedule": "constant"}


def load_records(folder: Path) -> list[dict]:
    recs = []
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("schema", "").startswith("structprune.run") and "benchmark" in rec:
            recs.append(rec)
    return recs


def matches(rec: dict, v: Variant) -> bool:
    if rec["method"] != v.method:
        return False
    if v.method != "structprune":
        return True
    want = v.config().to_dict()
    fields = set(_STRUCTPRUNE_FIELDS) - ignored_fields(want)  # as in compare.run_key
    return all(rec["config"].get(k, _FIELD_BEFORE_IT_EXISTED.get(k)) == want[k] for k in fields)


def pruned_ppl(rec: dict, name: str) -> float | None:
    """The pruned model's perplexity on eval set `name` (inf if it diverged; None if not evaluated)."""
    r = rec["ppl"]["pruned"].get(name)
    if r is None:
        return None
    return r["value"] if r["value"] is not None else math.inf


def format_value(x: float | None, digits: int = 4) -> str:
    """A table cell: `digits` significant digits (trailing zeros kept), "–" for None, "inf"."""
    if x is None:
        return "–"
    if math.isinf(x):
        return "inf"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:#.{digits}g}".removesuffix(".")  # "#" keeps trailing zeros (29.20, not 29.2), not "187."


def _grid(recs: list[dict], variants) -> dict[str, dict[float, list[dict]]]:
    """label -> sparsity -> records (all seeds)."""
    out: dict[str, dict[float, list[dict]]] = {}
    for v in variants:
        by_s = defaultdict(list)
        for rec in recs:
            if matches(rec, v):
                by_s[round(rec["sparsity"]["target"], 4)].append(rec)
        if by_s:
            out[v.label] = dict(by_s)
    return out


def _seed0(runs: list[dict]) -> dict | None:
    return next((r for r in runs if r["config"]["seed"] == 0), runs[0] if runs else None)


def _eval_sets(recs: list[dict]) -> list[str]:
    names = []
    for rec in recs:
        for n in rec["ppl"]["pruned"]:
            if n not in names:
                names.append(n)
    return names


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------- SUMMARY.md


def summary_markdown(recs: list[dict], variants=GRID) -> str:
    grid = _grid(recs, variants)
    if not grid:
        return "# Comparison benchmark\n\nNo records yet.\n"
    sparsities = sorted({s for by_s in grid.values() for s in by_s})
    any_rec = recs[0]
    env = any_rec["environment"]
    commits = sorted({r["environment"].get("git_commit") or "?" for r in recs})
    seeds = sorted({r["config"]["seed"] for r in recs})
    threads = sorted({r["environment"].get("cpus") for r in recs} - {None})
    lines = [
        f"# Comparison benchmark: {any_rec['model']['name']}",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `benchmarks/compare.py` "
        f"(report at commit {_git_commit() or '?'}; records from commit(s) {', '.join(commits)}).",
        f"Machine: {platform.machine()}, {'/'.join(map(str, threads))} torch threads, device {any_rec['device']}, "
        f"{any_rec['dtype']}; torch {env.get('torch')}, transformers {env.get('transformers')}. "
        f"Model: {any_rec['model']['description']}.",
        f"{len(recs)} runs; seeds {', '.join(map(str, seeds))} (extra seeds for the main methods only). "
        "Sparsity = fraction of prunable parameters (attention heads + MLP channels) removed.",
        "",
    ]
    for name in _eval_sets(recs):
        protos = _protocols_over_seeds(r["ppl"]["pruned"][name]["protocol"] for r in recs if name in r["ppl"]["pruned"])
        label = next(r["ppl"]["pruned"][name].get("label", name) for r in recs if name in r["ppl"]["pruned"])
        dense = next((r["ppl"]["dense"].get(name, {}).get("value") for r in recs if r["ppl"]["dense"].get(name)), None)
        lines += [f"## Perplexity: {label} (dense {format_value(dense)})", "", "Protocol: " + "; ".join(f"`{p}`" for p in protos),
                  "", "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|" + "---:|" * len(sparsities)]
        best = {s: min((pruned_ppl(_seed0(by_s[s]), name) or math.inf) for by_s in grid.values() if s in by_s)
                for s in sparsities}
        for label_v, by_s in grid.items():
            cells = []
            for s in sparsities:
                runs = by_s.get(s, [])
                if not runs:
                    cells.append("–")
                    continue
                v0 = pruned_ppl(_seed0(runs), name)
                cell = format_value(v0)
                if v0 is not None and v0 == best[s]:
                    cell = f"**{cell}**"
                vals = [pruned_ppl(r, name) for r in runs if pruned_ppl(r, name) is not None]
                if len(vals) > 1:
                    cell += f" ({format_value(min(vals))}–{format_value(max(vals))}, {len(vals)} seeds)"
                cells.append(cell)
            lines.append(f"| {label_v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _bar_section(grid, sparsities, _eval_sets(recs))
    lines += _seed_section(grid, sparsities, _eval_sets(recs))
    lines += _calib_section(grid, sparsities, recs)
    lines += _cost_section(grid)
    return "\n".join(lines) + "\n"


def _protocols_over_seeds(protocols) -> list[str]:
    """'... calib sotu-calib 64x512 seed 1' for seeds 0-2 -> one '... 64x512 seeds 0, 1, 2'."""
    seeds = defaultdict(set)
    for proto in protocols:
        head, sep, seed = proto.rpartition(" seed ")
        if sep and seed.isdigit():
            seeds[head].add(int(seed))
        else:  # a protocol without a seed stays as it is
            seeds.setdefault(proto, set())
    return [head + (f" seed{'s' if len(k) > 1 else ''} " + ", ".join(map(str, sorted(k))) if k else "")
            for head, k in sorted(seeds.items())]


def _ratio(grid, a: str, b: str, s: float, name: str) -> float | None:
    ra, rb = grid.get(a, {}).get(s), grid.get(b, {}).get(s)
    if not ra or not rb:
        return None
    pa, pb = pruned_ppl(_seed0(ra), name), pruned_ppl(_seed0(rb), name)
    if pa is None or pb is None or pb == 0 or math.isinf(pb):
        return None
    return pa / pb


def _heldout_delta(a: list[dict] | None, b: list[dict] | None) -> str:
    """Seed 0's held-out calibration loss of runs a minus that of runs b, or a dash."""
    held = [_seed0(r)["calib_loss"].get("heldout") if r else None for r in (a, b)]
    return "–" if None in held else f"{held[0] - held[1]:+.4f}"


def _bar_section(grid, sparsities, names) -> list[str]:
    if "structprune" not in grid:
        return []
    lines = ["## StructPrune against the bar (seed 0; ratio of perplexities, lower is better)", "",
             "Bar (issue 4): lowest ppl of all methods from 20% to 50%; <= 0.7x FLAP at 30% and <= 0.5x at 50%; "
             "no worse than global-taylor; default allocation beats uniform by >= 5% at 50%.", "",
             "| sparsity | eval | / flap | / global-taylor | / alloc=uniform | lowest of all | held-out loss - uniform's |",
             "|---|---|---:|---:|---:|---|---:|"]
    for s in sparsities:
        for name in names:
            sp = grid["structprune"].get(s)
            if not sp:
                continue
            mine = pruned_ppl(_seed0(sp), name)
            others = [pruned_ppl(_seed0(by_s[s]), name) for label, by_s in grid.items()
                      if s in by_s and label != "structprune" and not label.startswith("structprune ")]
            lowest = "yes" if mine is not None and all(o is None or mine <= o for o in others) else "no"
            cells = [format_value(_ratio(grid, "structprune", b, s, name), 3)
                     for b in ("flap", "global-taylor", "structprune alloc=uniform")]
            delta = _heldout_delta(sp, grid.get("structprune alloc=uniform", {}).get(s))
            lines.append(f"| {s:.0%} | {name} | " + " | ".join(cells) + f" | {lowest} | {delta} |")
    refits = [label for label in grid if label.startswith("structprune block refit")]
    rows = [(label, s, name) for label in refits for s in sparsities if s in grid[label] for name in names]
    if rows:
        lines += ["", "With the block refit (an option, not the default; see the time table):", "",
                  "| variant | sparsity | eval | / flap | / global-taylor | held-out loss - the default's |",
                  "|---|---|---|---:|---:|---:|"]
        for label, s, name in rows:
            cells = [format_value(_ratio(grid, label, b, s, name), 3) for b in ("flap", "global-taylor")]
            delta = _heldout_delta(grid[label][s], grid["structprune"].get(s))
            lines.append(f"| {label} | {s:.0%} | {name} | " + " | ".join(cells) + f" | {delta} |")
    return lines + [""]


def _by_seed(runs: list[dict] | None, name: str) -> dict[int, float]:
    return {r["config"]["seed"]: v for r in runs or [] if (v := pruned_ppl(r, name)) is not None}


def _seed_section(grid, sparsities, names) -> list[str]:
    """The bar over calibration draws: each seed picks other calibration windows, so a ratio is taken
    between runs of the same seed (same data), and the worst seed is what the bar has to survive."""
    mains = [label for label in grid if label == "structprune" or label.startswith("structprune block refit")]
    rows = [(label, s) for label in mains for s in sparsities
            if len({r["config"]["seed"] for r in grid[label].get(s, [])}) > 1]
    if not rows:
        return []
    others = [label for label in grid if not label.startswith("structprune")]
    lines = ["## Over calibration seeds (ratios between runs of the same seed)", "",
             "Each seed draws other calibration windows; the eval windows stay the same. Worst = the largest "
             "ratio over the seeds both methods ran; lowest = below every other method at every seed they share.",
             "", "| variant | sparsity | eval | seeds | ppl mean (range) | / flap per seed | worst / flap "
             "| worst / wanda-sp | lowest at every seed |", "|---|---|---|---|---|---|---:|---:|---|"]
    for label, s in rows:
        for name in names:
            mine = _by_seed(grid[label][s], name)
            if not mine:
                continue
            vals = list(mine.values())
            spread = f"{format_value(mean(vals))} ({format_value(min(vals))}–{format_value(max(vals))})"

            def paired(other: str) -> dict[int, float]:
                theirs = _by_seed(grid.get(other, {}).get(s), name)
                return {k: mine[k] / theirs[k] for k in sorted(mine.keys() & theirs.keys()) if theirs[k]}

            ratios = [paired(o) for o in ("flap", "wanda-sp")]
            worst = [format_value(max(r.values()), 3) if r else "–" for r in ratios]
            beaten = [mine[k] > v for o in others for k, v in _by_seed(grid[o].get(s), name).items() if k in mine]
            lowest = "–" if not beaten else ("no" if any(beaten) else "yes")
            lines.append(f"| {label} | {s:.0%} | {name} | {', '.join(map(str, sorted(mine)))} | {spread} | "
                         + (", ".join(format_value(r, 3) for r in ratios[0].values()) or "–")
                         + f" | {worst[0]} | {worst[1]} | {lowest} |")
    return lines + [""]


def _calib_section(grid, sparsities, recs) -> list[str]:
    dense_held = next((r["benchmark"].get("dense_heldout_nll") for r in recs
                       if r["benchmark"].get("dense_heldout_nll") is not None), None)
    held_n = next((r["calib_loss"].get("heldout_windows") for r in recs if r["calib_loss"].get("heldout_windows")), None)
    dense = next((r["benchmark"].get("dense_calib_nll") for r in recs), None)
    windows = next((r["calib_loss"].get("pruned_windows") for r in recs), None)
    lines = ["## Calibration loss (nats/token, seed 0)", "",
             f"Held out: {held_n} windows of the calibration split disjoint from the calibration windows (dense "
             f"{format_value(dense_held, 5)}), the loss allocations are chosen by. In-sample: the first {windows} "
             f"calibration windows (dense {format_value(dense, 5)}), which the refit was fitted to.", "",
             "| method | " + " | ".join(f"{s:.0%} held out / in-sample" for s in sparsities) + " |",
             "|---|" + "---:|" * len(sparsities)]
    for label, by_s in grid.items():
        cells = []
        for s in sparsities:
            if s not in by_s:
                cells.append("–")
                continue
            cl = _seed0(by_s[s])["calib_loss"]
            cells.append(f"{format_value(cl.get('heldout'), 5)} / {format_value(cl.get('pruned'), 5)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def cost_rows(grid) -> list[dict]:
    """Per variant: peak device bytes (max over its seed-0 runs), estimate, time ratios (mean)."""
    rows = []
    for label, by_s in grid.items():
        runs = [_seed0(r) for r in by_s.values()]
        timed = [r for r in runs
                 if not r["benchmark"].get("pass1_shared") and not r["benchmark"].get("timing_contended")]
        rows.append({
            "label": label,
            "peak_bytes": max(r["memory"]["peak_bytes"] for r in runs),
            "kind": "/".join(sorted({r["memory"]["kind"] for r in runs})),
            "estimated_bytes": max(r["benchmark"]["estimated_peak_bytes"] for r in runs),
            "prune_over_floor": mean(r["benchmark"]["prune_over_floor"] for r in timed) if timed else None,
            "pass1_s": mean(r["timing"].get("pass1_s", 0.0) for r in timed) if timed else None,
            "pass2_s": mean(r["timing"].get("pass2_s", 0.0) for r in timed) if timed else None,
            "floor_s": mean(r["benchmark"]["forward_floor_s"] for r in runs),
        })
    return rows


def _cost_section(grid) -> list[str]:
    lines = ["## Device memory and pruning time (seed 0)", "",
             "Peak bytes on the compute device while pruning: `measured-cuda` = torch.cuda.max_memory_allocated, "
             "`accounted-cpu` = the pipeline's own accounting of what it would hold on a device (weights-only "
             "magnitude holds nothing). Time as a ratio: (pass 1 + pass 2) / one plain forward pass over the "
             "calibration set, measured on the same machine; runs that reused pass-1 statistics or shared the CPU with other work are left out.", "",
             "| method | peak MiB | kind | estimate MiB | prune / forward floor | pass 1 s | pass 2 s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in cost_rows(grid):
        lines.append(f"| {r['label']} | {r['peak_bytes'] / 2**20:.1f} | {r['kind']} | "
                     f"{r['estimated_bytes'] / 2**20:.1f} | {format_value(r['prune_over_floor'], 3)} | "
                     f"{format_value(r['pass1_s'], 3)} | {format_value(r['pass2_s'], 3)} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------- plots


def _style(i: int, label: str) -> dict:
    ablation = label.startswith("structprune ")
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "symbol": SYMBOLS[i % len(SYMBOLS)],
            "dash": "dash" if ablation else "solid", "width": 3 if label == "structprune" else 1.8}


def plot_html(recs: list[dict], variants=GRID) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    grid = _grid(recs, variants)
    names = _eval_sets(recs)
    titles = []
    for n in names:
        proto = next(r["ppl"]["pruned"][n]["protocol"] for r in recs if n in r["ppl"]["pruned"])
        titles.append(proto)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles, shared_yaxes=False)
    for i, (label, by_s) in enumerate(grid.items()):
        st = _style(i, label)
        for c, name in enumerate(names, start=1):
            xs = sorted(by_s)
            ys, lo, hi = [], [], []
            for s in xs:
                v0 = pruned_ppl(_seed0(by_s[s]), name)
                vals = [v for v in (pruned_ppl(r, name) for r in by_s[s]) if v is not None and math.isfinite(v)]
                ys.append(v0 if v0 is not None and math.isfinite(v0) else None)
                lo.append((v0 - min(vals)) if vals and ys[-1] else 0)
                hi.append((max(vals) - v0) if vals and ys[-1] else 0)
            fig.add_trace(go.Scatter(
                x=[100 * s for s in xs], y=ys, name=label, legendgroup=label, showlegend=c == 1,
                mode="lines+markers", line={"color": st["color"], "dash": st["dash"], "width": st["width"]},
                marker={"symbol": st["symbol"], "size": 8},
                error_y={"type": "data", "array": hi, "arrayminus": lo, "visible": any(hi) or any(lo)},
                hovertemplate=f"{label}<br>sparsity %{{x}}%<br>ppl %{{y:.4g}}<extra></extra>"), row=1, col=c)
    for c, name in enumerate(names, start=1):
        dense = next((r["ppl"]["dense"][name]["value"] for r in recs if r["ppl"]["dense"].get(name)), None)
        if dense:
            fig.add_hline(y=dense, line={"color": "#777777", "dash": "dot"}, annotation_text="dense", row=1, col=c)
        fig.update_yaxes(type="log", title_text="perplexity (log)", row=1, col=c)
        fig.update_xaxes(title_text="prunable sparsity (%)", row=1, col=c)
    fig.update_layout(title="Perplexity vs sparsity (error bars: range over seeds)", template="simple_white",
                      height=560, legend={"orientation": "v"})

    rows = cost_rows(grid)
    labels = [r["label"] for r in rows]
    mem = make_subplots(rows=1, cols=2, subplot_titles=(
        "Peak compute-device memory while pruning (MiB; " + "/".join(sorted({r["kind"] for r in rows})) + ")",
        "Pruning time / one forward pass over the calibration set"))
    mem.add_trace(go.Bar(x=labels, y=[r["peak_bytes"] / 2**20 for r in rows], name="peak",
                         marker_color=OKABE_ITO[5]), row=1, col=1)
    mem.add_trace(go.Bar(x=labels, y=[r["estimated_bytes"] / 2**20 for r in rows], name="estimate",
                         marker_color=OKABE_ITO[1], marker_pattern_shape="/"), row=1, col=1)
    mem.add_trace(go.Bar(x=labels, y=[r["prune_over_floor"] for r in rows], name="prune / floor",
                         marker_color=OKABE_ITO[3], showlegend=True), row=1, col=2)
    mem.update_yaxes(type="log", row=1, col=1)
    mem.update_layout(template="simple_white", height=480, barmode="group")
    return ("<html><head><meta charset='utf-8'><title>StructPrune comparison</title></head><body>"
            + fig.to_html(full_html=False, include_plotlyjs="cdn")
            + mem.to_html(full_html=False, include_plotlyjs=False) + "</body></html>")


# --------------------------------------------------------------------------------------------- sweep


def _choice_loss(rec: dict) -> tuple[float, str]:
    """The loss a choice is made by: held-out calibration loss, else (older records) in-sample."""
    cl = rec["calib_loss"]
    return (cl["heldout"], "heldout") if cl.get("heldout") is not None else (cl["pruned"], "pruned")


def sweep_summary(recs: list[dict], temperatures=None, energies=None) -> dict:
    """Per sparsity: every candidate's calibration loss (and test ppl, for information only); the
    chosen candidate is the lowest held-out calibration loss. The recommended default is the
    softmax (energy, T) with the lowest mean loss over the swept sparsities."""
    variants = sweep_variants(temperatures or SWEEP_TEMPERATURES, energies or SWEEP_ENERGIES)
    grid = _grid(recs, variants)
    sparsities = sorted({s for by_s in grid.values() for s in by_s})
    out = {"sparsities": sparsities, "rows": [], "chosen": {}, "criterion": None}
    kinds = set()
    for s in sparsities:
        cands = []
        for v in variants:
            runs = grid.get(v.label, {}).get(s)
            if not runs:
                continue
            r = _seed0(runs)
            cfg = r["config"]
            loss, kind = _choice_loss(r)
            kinds.add(kind)
            cands.append({"sparsity": s, "label": v.label, "allocation": cfg["allocation"],
                          "energy": cfg["energy"] if cfg["allocation"] in ("softmax", "threshold") else None,
                          "temperature": cfg["temperature"] if cfg["allocation"] == "softmax" else None,
                          "calib_loss": loss, "calib_loss_in_sample": r["calib_loss"]["pruned"],
                          "ppl": {n: pruned_ppl(r, n) for n in r["ppl"]["pruned"]}})
        if not cands:
            continue
        best = min(cands, key=lambda c: c["calib_loss"])
        uni = next((c for c in cands if c["allocation"] == "uniform"), None)
        out["rows"] += cands
        out["chosen"][str(s)] = {"label": best["label"], "calib_loss": best["calib_loss"],
                                 "uniform_calib_loss": uni["calib_loss"] if uni else None}
    out["criterion"] = ("calib_loss.heldout (nats/token, held-out calibration windows)" if kinds == {"heldout"}
                        else f"calib_loss.{'/'.join(sorted(kinds))} (nats/token)")
    pairs = defaultdict(list)
    for c in out["rows"]:
        if c["allocation"] == "softmax":
            pairs[(c["energy"], c["temperature"])].append(c["calib_loss"])
    complete = {p: mean(v) for p, v in pairs.items() if len(v) == len(out["chosen"])}
    if complete:
        energy, t_best = min(complete, key=complete.get)
        out["recommended_energy"], out["recommended_temperature"] = energy, t_best
        out["recommended_beats_uniform"] = {
            s: next(c["calib_loss"] for c in out["rows"] if c["sparsity"] == float(s)
                    and (c["energy"], c["temperature"]) == (energy, t_best))
            <= (ch["uniform_calib_loss"] if ch["uniform_calib_loss"] is not None else math.inf)
            for s, ch in out["chosen"].items()}
    out["config_default"] = {"energy": PruneConfig().energy, "temperature": PruneConfig().temperature}
    return out


def sweep_markdown(summary: dict, recs: list[dict]) -> str:
    if not summary["rows"]:
        return "# Allocation sweep\n\nNo sweep records yet.\n"
    r0 = recs[0]
    dense = next((r["benchmark"].get("dense_heldout_nll") for r in recs
                  if r["benchmark"].get("dense_heldout_nll") is not None), None)
    held = next((r["calib_loss"].get("heldout_windows") for r in recs if r["calib_loss"].get("heldout_windows")), None)
    names = sorted({n for c in summary["rows"] for n in c["ppl"]})
    lines = ["# Allocation sweep: structprune softmax(energy, T) vs threshold vs uniform", "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; model {r0['model']['name']}; "
             f"calibration {r0['config']['nsamples']}x{r0['config']['seqlen']} seed 0; machine "
             f"{platform.machine()}; commit {_git_commit() or '?'}.", "",
             f"Choice by **held-out calibration loss**: mean NLL of the pruned model on {held} windows of the "
             f"calibration split that share no token with the calibration windows (dense {format_value(dense, 5)}); "
             "criterion: " + summary["criterion"] + ". Never by test perplexity: the test perplexities "
             "are shown for information only. The in-sample loss (first "
             f"{r0['calib_loss'].get('pruned_windows')} calibration windows) is shown beside it.", "",
             "Test perplexity protocols: " + "; ".join(
                 f"`{r0['ppl']['pruned'][n].get('protocol') or n}`" for n in names if n in r0["ppl"]["pruned"]) + ".", ""]
    for s in summary["sparsities"]:
        if str(s) not in summary["chosen"]:
            continue
        lines += [f"## {s:.0%}", "", "| candidate | held-out loss | in-sample loss | "
                  + " | ".join(f"ppl {n}" for n in names) + " |", "|---|---:|---:|" + "---:|" * len(names)]
        for c in summary["rows"]:
            if c["sparsity"] != s:
                continue
            mark = " (chosen)" if c["label"] == summary["chosen"][str(s)]["label"] else ""
            lines.append(f"| {c['label']}{mark} | {c['calib_loss']:.5f} | {c['calib_loss_in_sample']:.5f} | "
                         + " | ".join(format_value(c["ppl"].get(n)) for n in names) + " |")
        lines.append("")
    if "recommended_temperature" in summary:
        t, e = summary["recommended_temperature"], summary["recommended_energy"]
        beats = summary["recommended_beats_uniform"]
        d = summary["config_default"]
        lines += [f"**Recommended default: energy `{e}`, T = {t:g}** (lowest mean held-out loss over "
                  f"{', '.join(f'{float(s):.0%}' for s in summary['chosen'])}; PruneConfig's default is "
                  f"`{d['energy']}`, T = {d['temperature']:g}). Not worse than uniform on held-out calibration "
                  "loss at: " + ", ".join(f"{float(s):.0%} {'yes' if ok else 'NO'}" for s, ok in beats.items()) + ".", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- all


def write_all(folder: Path, sweep: bool = False, temperatures=None, energies=None) -> list[Path]:
    recs = load_records(folder)
    written = []
    if sweep:
        summary = sweep_summary(recs, temperatures, energies)
        (folder / "allocation_sweep.json").write_text(json.dumps(summary, indent=1))
        (folder / "ALLOCATION_SWEEP.md").write_text(sweep_markdown(summary, recs))
        written += [folder / "allocation_sweep.json", folder / "ALLOCATION_SWEEP.md"]
        return written
    (folder / "SUMMARY.md").write_text(summary_markdown(recs))
    written.append(folder / "SUMMARY.md")
    if _grid(recs, GRID):
        (folder / "ppl_vs_sparsity.html").write_text(plot_html(recs))
        written.append(folder / "ppl_vs_sparsity.html")
    return written


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    for p in write_all(folder, sweep="--sweep" in sys.argv):
        print(p)
