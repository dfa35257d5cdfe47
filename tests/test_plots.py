"""Each plot function on a hand-made frame: the traces carry the frame's numbers, log axes are log,
labelled lines on log axes sit at log10(value), and perplexity figures carry their protocol."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from structprune import plots

PROTO = "sotu-test · seqlen 128 · 2 windows · calib sotu-calib 2x128 seed 0"


def _alloc() -> pd.DataFrame:
    return pd.DataFrame({"layer": [0, 0, 1, 1], "module": ["attn", "mlp", "attn", "mlp"],
                         "sparsity": [0.5, 0.25, 0.0, 0.4], "units_kept": [2, 6, 4, 3], "units_total": [4, 8, 4, 5],
                         "params_pruned": [256, 192, 0, 310], "energy": [0.1, 1.0, 10.0, 0.5],
                         "continuous": [0.45, 0.26, 0.01, 0.41]})


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def _annotation(fig, text):
    return next(a for a in fig.layout.annotations if text in a.text)


def test_allocation_figure_bars_and_target_line():
    fig = plots.allocation_figure(_alloc(), 0.3)
    attn, mlp = _trace(fig, "attention heads"), _trace(fig, "MLP channels")
    assert list(attn.y) == [0.5, 0.0] and list(mlp.y) == [0.25, 0.4] and list(attn.x) == [0, 1]
    assert fig.layout.shapes[0].y0 == 0.3 and _annotation(fig, "target 30%").y == 0.3  # linear axis: y itself
    assert fig.layout.yaxis.tickformat == ".0%"
    assert attn.marker.color != mlp.marker.color and attn.marker.color in plots.OKABE_ITO


def test_energy_figure_log_energies_and_allocation():
    fig = plots.energy_figure(_alloc(), 1.5, "sensitivity")
    assert list(_trace(fig, "attention heads energy").y) == [0.1, 10.0]
    assert list(_trace(fig, "MLP channels sparsity").y) == [0.25, 0.4]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type != "log"
    assert "T = 1.5" in fig.layout.annotations[1].text


def test_ppl_figure_log_axis_protocol_caption_and_infinite_values():
    df = pd.DataFrame({"corpus": ["sotu", "sotu", "brown", "brown"],
                       "label": ["SOTU 2002-2026", "SOTU 2002-2026", "Brown Corpus (test half)", "Brown Corpus (test half)"],
                       "model": ["dense", "pruned", "dense", "pruned"], "value": [26.5, 41.2, 80.0, math.inf],
                       "protocol": [PROTO, PROTO, "brown-test · seqlen 128 · 2 windows", "brown-test · seqlen 128 · 2 windows"]})
    fig = plots.ppl_figure(df)
    assert fig.layout.yaxis.type != "log" and fig.layout.yaxis.rangemode == "tozero"  # a bar's length is its value
    pruned = _trace(fig, "pruned")
    assert pruned.y[0] == 41.2 and np.isnan(pruned.y[1]) and list(pruned.text) == ["41.2", "inf"]
    cap = fig.layout.meta["caption"]
    assert PROTO in cap and "brown-test" in cap and "WikiText" not in cap
    assert PROTO in _annotation(fig, "protocol:").text


def test_params_figure_in_millions():
    df = pd.DataFrame({"count": ["all parameters", "prunable (heads + channels)"] * 2,
                       "model": ["dense", "dense", "pruned", "pruned"], "params": [134.5e6, 106e6, 102.7e6, 74.2e6]})
    fig = plots.params_figure(df)
    assert list(_trace(fig, "pruned").y) == pytest.approx([102.7, 74.2])


def test_memory_timeline_with_estimate_line_and_kind_caption():
    df = pd.DataFrame({"t": [0.0, 1.0, 2.0], "mib": [10.0, 250.0, 30.0], "peak_mib": [10.0, 250.0, 250.0],
                       "label": ["embedding", "pass1 layer 1", "release"]})
    fig = plots.memory_timeline_figure(df, "accounted-cpu", estimate_bytes=300 * 2**20)
    assert list(_trace(fig, "held on the device").y) == [10.0, 250.0, 30.0]
    assert _trace(fig, "held on the device").line.shape == "hv"
    assert fig.layout.shapes[0].y0 == pytest.approx(300.0)
    assert "accounted by the pipeline" in fig.layout.meta["caption"]


def test_refit_and_admm_figures():
    refit = pd.DataFrame({"layer": [0, 0], "module": ["attn", "mlp"], "err_no_refit": [2.0, 5.0],
                          "err_after_refit": [0.1, 0.4]})
    fig = plots.refit_error_figure(refit)
    assert fig.layout.yaxis.type == "log" and list(fig.data[0].x) == ["L0 attn", "L0 mlp"]
    assert list(_trace(fig, "after least-squares refit (+ bias)").y) == [0.1, 0.4]
    trace = pd.DataFrame({"layer": [0, 0, 1, 1], "module": ["attn"] * 4, "iteration": [1, 2, 1, 2],
                          "primal_residual": [0.1, 0.01, 0.2, 0.02], "dual_residual": [0.5, 0.0, 0.3, 0.0],
                          "support_changes": [2, 0, 1, 0]})
    fig = plots.admm_trace_figure(trace)
    assert fig.layout.yaxis.type == "log" and len(fig.data) == 2
    assert list(_trace(fig, "L1 attn").y) == [0.2, 0.02]


def test_explorer_figures():
    grid = pd.DataFrame({"temperature": [0.5, 0.5, 2.0, 2.0], "layer": [0, 1, 0, 1], "module": ["mlp"] * 4,
                         "sparsity": [0.6, 0.0, 0.35, 0.25]})
    fig = plots.temperature_heatmap(grid)
    assert np.asarray(fig.data[0].z).tolist() == [[0.6, 0.35], [0.0, 0.25]]  # rows = layers, columns = T
    assert list(fig.data[0].x) == [0.5, 2.0] and fig.layout.xaxis.type == "log"
    schemes = pd.DataFrame({"scheme": ["uniform"] * 2 + ["softmax (T=1)"] * 2, "layer": [0, 1, 0, 1],
                            "module": ["mlp"] * 4, "sparsity": [0.3, 0.3, 0.5, 0.1]})
    fig = plots.schemes_figure(schemes, 0.3)
    assert list(_trace(fig, "softmax (T=1)").y) == [0.5, 0.1] and "30% of the prunable" in fig.layout.meta["caption"]
    ent = pd.DataFrame({"temperature": [0.1, 1.0, 10.0], "entropy": [1.0, 2.0, 2.9], "uniform": 3.0})
    fig = plots.entropy_figure(ent, temperature=1.0)
    assert fig.layout.xaxis.type == "log" and list(fig.data[0].y) == [1.0, 2.0, 2.9]
    assert _trace(fig, "T = 1").y[0] == pytest.approx(2.0)
    assert _annotation(fig, "uniform").y == 3.0


def _runs() -> pd.DataFrame:
    return pd.DataFrame({
        "run_id": ["a", "b", "c", "d", "e"], "method_allocation": ["structprune · uniform"] * 2 + ["wanda-sp · uniform"] * 3,
        "sparsity_target": [0.2, 0.3, 0.2, 0.3, 0.3], "ppl_pruned": [30.0, 40.0, 100.0, 200.0, 300.0],
        "ppl_dense": [26.5] * 5, "seed": [0, 0, 0, 0, 1], "temperature": [math.inf, 1.0, 0.5, 2.0, math.nan],
        "energy": ["sensitivity"] * 5})


def test_ppl_vs_sparsity_means_over_seeds_log_y_and_dense_line_in_log10():
    fig = plots.ppl_vs_sparsity_figure(_runs(), PROTO)
    assert fig.layout.yaxis.type == "log"
    lines = [t for t in fig.data if t.mode == "lines"]
    wanda = next(t for t in lines if t.name == "wanda-sp · uniform")
    assert list(wanda.y) == [100.0, 250.0]  # seeds 0 and 1 at s=0.3 averaged
    assert _annotation(fig, "dense").y == pytest.approx(math.log10(26.5))  # log axis: log10 coordinates
    assert PROTO in fig.layout.meta["caption"]


def test_ppl_vs_temperature_and_allocation_overlay():
    df = _runs().assign(sparsity_target=0.3)
    fig = plots.ppl_vs_temperature_figure(df, PROTO)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == [0.5, 1.0, 2.0]  # finite temperatures only, sorted
    # as Compare builds it: records store T = inf as "inf", and a concat with an empty frame is object dtype
    raw = pd.concat([pd.DataFrame(columns=df.columns), df.assign(temperature=["inf", 1.0, 0.5, 2.0, None])])
    assert raw["temperature"].dtype == object
    fig = plots.ppl_vs_temperature_figure(raw, PROTO)
    assert list(fig.data[0].x) == [0.5, 1.0, 2.0] and _annotation(fig, "uniform").y == pytest.approx(math.log10(30.0))
    assert _annotation(fig, "uniform").y == pytest.approx(math.log10(30.0))
    over = pd.DataFrame({"run": ["r1", "r1", "r2", "r2"], "layer": [0, 1, 0, 1], "module": ["attn"] * 4,
                         "sparsity": [0.1, 0.2, 0.3, 0.4]})
    fig = plots.allocation_overlay_figure(over)
    assert list(_trace(fig, "r2").y) == [0.3, 0.4]


def test_memory_scaling_log_log_gpu_lines_and_measured_points():
    est = pd.DataFrame({"preset": ["a", "b", "a", "b"], "n_params": [1e8, 1e10] * 2,
                        "method": ["global-taylor"] * 2 + ["structprune"] * 2, "peak_gib": [2.0, 200.0, 0.1, 1.5]})
    measured = pd.DataFrame({"config_name": ["a", "b"], "n_params": [1e8, 1e10], "method": ["structprune", "global-taylor"],
                             "peak_gib": [0.12, math.nan], "estimate_gib": [0.1, 200.0], "oom": [False, True]})
    fig = plots.memory_scaling_figure(est, measured, [("80 GB GPU", 74.5)])
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(_trace(fig, "global-taylor (estimate)").y) == [2.0, 200.0]
    assert list(_trace(fig, "structprune (measured)").y) == [0.12]
    assert _trace(fig, "global-taylor (out of memory)").marker.symbol == "x"
    assert _annotation(fig, "80 GB").y == pytest.approx(math.log10(74.5))


def test_depth_width_reference_lines():
    df = pd.DataFrame({"preset": ["s", "m", "l"], "family": ["OPT"] * 3, "n_params": [1e8, 1e9, 1e10],
                       "layer_params": [1e7, 3e7, 1e8], "n_layers": [12, 24, 48], "hidden": [768, 2048, 5120]})
    fig = plots.depth_width_figure(df, {"OPT": 0.5})
    whole = _trace(fig, "N (the whole model: global methods)")
    assert np.allclose(whole.x, whole.y)
    ref = _trace(fig, "c * sqrt(N)")
    assert np.allclose(np.asarray(ref.y) / np.sqrt(ref.x), np.asarray(ref.y)[0] / np.sqrt(ref.x[0]))
    assert list(_trace(fig, "OPT (slope 0.50)").y) == [1e7, 3e7, 1e8]


def test_method_figures():
    sup = pd.DataFrame({"iteration": [0, 0, 1, 1], "unit": [0, 1, 0, 1], "kept": [1, 0, 0, 1]})
    fig = plots.support_figure(sup)
    assert np.asarray(fig.data[0].z).tolist() == [[1, 0], [0, 1]]
    res = pd.DataFrame({"iteration": [1, 2], "primal_residual": [0.1, 0.001], "dual_residual": [0.2, 0.0],
                        "support_changes": [2, 0]})
    fig = plots.residuals_figure(res)
    assert fig.layout.yaxis.type == "log" and list(fig.data[2].y) == [2, 0]
    err = pd.DataFrame({"selector": ["saliency", "greedy"], "err_no_refit": [20.0, 18.0],
                        "err_after_refit": [2.0, 1.5], "energy": [100.0, 100.0]})
    fig = plots.refit_selectors_figure(err)
    assert list(_trace(fig, "least-squares refit").y) == pytest.approx([0.02, 0.015])
    assert fig.layout.yaxis.tickformat == ".0%"


def _every_figure() -> dict:
    """One of each chart of the app, from the frames above."""
    refit = pd.DataFrame({"layer": [0, 0], "module": ["attn", "mlp"], "err_no_refit": [2.0, 5.0],
                          "err_after_refit": [0.1, 0.4]})
    trace = pd.DataFrame({"layer": [0, 0], "module": ["attn"] * 2, "iteration": [1, 2], "primal_residual": [0.1, 0.01],
                          "dual_residual": [0.5, 0.0], "support_changes": [2, 0]})
    grid = pd.DataFrame({"temperature": [0.5, 0.5, 2.0, 2.0], "layer": [0, 1, 0, 1], "module": ["mlp"] * 4,
                         "sparsity": [0.6, 0.0, 0.35, 0.25]})
    schemes = pd.DataFrame({"scheme": ["uniform"] * 2 + ["softmax (T=1)"] * 2, "layer": [0, 1, 0, 1],
                            "module": ["attn"] * 4, "sparsity": [0.3, 0.3, 0.5, 0.1]})
    ppl = pd.DataFrame({"corpus": ["sotu"] * 2, "label": ["SOTU"] * 2, "model": ["dense", "pruned"],
                        "value": [26.5, 41.2], "protocol": [PROTO] * 2})
    params = pd.DataFrame({"count": ["all parameters"] * 2, "model": ["dense", "pruned"], "params": [134e6, 100e6]})
    mem = pd.DataFrame({"t": [0.0, 1.0], "mib": [10.0, 20.0], "peak_mib": [10.0, 20.0]})
    over = pd.DataFrame({"run": ["r1", "r1"], "layer": [0, 1], "module": ["attn", "attn"], "sparsity": [0.1, 0.2]})
    est = pd.DataFrame({"preset": ["a", "b"], "n_params": [1e8, 1e10], "method": ["structprune"] * 2,
                        "peak_gib": [0.1, 1.5]})
    dw = pd.DataFrame({"preset": ["s", "m"], "family": ["OPT"] * 2, "n_params": [1e8, 1e9], "layer_params": [1e7, 3e7],
                       "n_layers": [12, 24], "hidden": [768, 2048]})
    sup = pd.DataFrame({"iteration": [0, 0, 1, 1], "unit": [0, 1, 0, 1], "kept": [1, 0, 0, 1]})
    res = pd.DataFrame({"iteration": [1, 2], "primal_residual": [0.1, 0.001], "dual_residual": [0.2, 0.0],
                        "support_changes": [2, 0]})
    err = pd.DataFrame({"selector": ["saliency"], "err_no_refit": [20.0], "err_after_refit": [2.0], "energy": [100.0]})
    ent = pd.DataFrame({"temperature": [0.1, 1.0], "entropy": [1.0, 2.0], "uniform": 3.0})
    figs = [plots.allocation_figure(_alloc(), 0.3), plots.energy_figure(_alloc(), 1.0, "relative"),
            plots.ppl_figure(ppl), plots.params_figure(params), plots.memory_timeline_figure(mem),
            plots.refit_error_figure(refit), plots.admm_trace_figure(trace), plots.temperature_heatmap(grid),
            plots.schemes_figure(schemes, 0.3), plots.entropy_figure(ent, 1.0),
            plots.ppl_vs_sparsity_figure(_runs(), PROTO), plots.allocation_overlay_figure(over),
            plots.ppl_vs_temperature_figure(_runs().assign(sparsity_target=0.3), PROTO),
            plots.memory_scaling_figure(est), plots.depth_width_figure(dw), plots.support_figure(sup),
            plots.residuals_figure(res), plots.refit_selectors_figure(err)]
    return {f.layout.title.text: f for f in figs}


def _bare_titles(obj, path="") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() if k != "template"
                for p in ([f"{path}.{k}"] if k == "title" and isinstance(v, str) else _bare_titles(v, f"{path}.{k}"))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _bare_titles(v, f"{path}[{i}]")]
    return []


def test_every_figure_sends_its_titles_as_text_dicts():
    """plotly.js 3 (Streamlit 1.67's bundle) draws no title given as a bare string; these figures skip
    plotly.py's validation, which used to turn xaxis_title="..." into {"text": ...}. What is sent to
    the browser (the JSON) must carry every title as a dict, and every visible axis a title."""
    import json

    figs = _every_figure()
    assert len(figs) == 18
    for name, fig in figs.items():
        sent = json.loads(fig.to_json())
        assert _bare_titles(sent) == [], name
        assert sent["layout"]["title"]["text"] == name
        lay = sent["layout"]
        for ax in [k for k in lay if k.startswith(("xaxis", "yaxis"))]:
            if lay[ax].get("showticklabels") is False:
                continue  # the upper panel of a shared x axis: the lower panel carries the title
            assert (lay[ax].get("title") or {}).get("text"), (name, ax)


def test_one_colour_per_method_and_scheme_in_every_chart():
    colours = {m: plots.series_color(m) for m in ("wanda-sp", "flap", "magnitude")}
    assert len(set(colours.values())) == 3  # FLAP and wanda-sp used to share one
    assert plots.series_color("structprune", "softmax") == plots.SCHEME_COLORS["softmax"]
    assert plots.series_color("owl") == plots.series_color("structprune", "owl")
    runs = _runs().assign(method=["structprune"] * 2 + ["wanda-sp"] * 3, allocation="uniform")
    runs.loc[runs["run_id"] == "c", ["method", "method_allocation"]] = ["flap", "flap · uniform"]
    fig = plots.ppl_vs_sparsity_figure(runs, PROTO)
    by_name = {t.name: t.line.color for t in fig.data if t.mode == "lines"}
    assert by_name == {"structprune · uniform": plots.SCHEME_COLORS["uniform"],
                       "wanda-sp · uniform": plots.METHOD_COLORS["wanda-sp"], "flap · uniform": plots.METHOD_COLORS["flap"]}
    schemes = pd.DataFrame({"scheme": ["uniform", "softmax (T=1)"], "layer": [0, 0], "module": ["attn"] * 2,
                            "sparsity": [0.3, 0.5]})
    fig = plots.schemes_figure(schemes, 0.3)
    assert _trace(fig, "softmax (T=1)").line.color == plots.SCHEME_COLORS["softmax"]
    over = pd.DataFrame({"run": ["a", "b", "c"], "method": ["structprune", "structprune", "flap"],
                         "scheme": ["softmax", "softmax", "uniform"], "layer": [0] * 3, "module": ["attn"] * 3,
                         "sparsity": [0.1, 0.2, 0.3]})
    fig = plots.allocation_overlay_figure(over)
    a, b, c = (_trace(fig, n) for n in "abc")
    assert a.line.color == b.line.color == plots.SCHEME_COLORS["softmax"] and a.line.dash != b.line.dash
    assert c.line.color == plots.METHOD_COLORS["flap"]


def test_long_legends_sit_beside_the_plot_not_under_the_title():
    figs = _every_figure()
    for name in ("Perplexity vs sparsity", "Perplexity vs temperature", "Allocation schemes, same budget",
                 "Allocations of the chosen runs"):
        assert figs[name].layout.legend.orientation == "v" and figs[name].layout.legend.x > 1, name
