"""Every chart of the app: pure functions from a DataFrame to a plotly Figure.

No Streamlit here, so each figure is testable on a hand-made frame (tests/test_plots.py). Colours
are the Okabe-Ito palette (colour-blind safe), hover labels carry units, and a figure that shows
perplexity carries its protocol as a caption under the plot (also in ``fig.layout.meta``).

Titles are always ``{"text": ...}`` dicts (`_finish`): the figures skip plotly.py's validation,
which is what turned ``xaxis_title_text="..."`` into ``title.text``, and plotly.js 3 (Streamlit's
bundle) silently draws no title given as a bare string.

Colours: one per method and allocation scheme (`series_color`), the same in every chart.

Log axes: plotly places annotations on a log axis in log10 coordinates, so a labelled horizontal
line at v is ``add_hline(y=v)`` plus ``add_annotation(y=log10(v))`` (`_hline`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MODULE_NAMES = {"attn": "attention heads", "mlp": "MLP channels"}
MODULE_COLORS = {"attn": OKABE_ITO[0], "mlp": OKABE_ITO[1]}
SCHEME_COLORS = {"uniform": OKABE_ITO[7], "threshold": OKABE_ITO[3], "owl": OKABE_ITO[2], "softmax": OKABE_ITO[0]}
# The baselines: global-taylor allocates by one global threshold and owl is OWL's allocation, so they
# share those schemes' colours; the three uniform baselines get the remaining ones.
METHOD_COLORS = {"structprune": OKABE_ITO[0], "wanda-sp": OKABE_ITO[1], "flap": OKABE_ITO[4],
                 "magnitude": OKABE_ITO[5], "owl": OKABE_ITO[2], "global-taylor": OKABE_ITO[3]}
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
TEMPLATE = "plotly_white"


def series_color(method: str | None, scheme: str | None = None) -> str:
    """The one colour of a series in every chart: structprune runs by their allocation scheme (what
    the Compare and explorer charts contrast), a baseline by its method."""
    if method in (None, "", "structprune") and scheme:
        return SCHEME_COLORS.get(str(scheme).split(" ")[0], OKABE_ITO[6])
    return METHOD_COLORS.get(str(method), OKABE_ITO[6])


def _text_titles(obj) -> None:
    """Every ``title: "x"`` below obj becomes ``title: {"text": "x"}`` (in place; skips the template)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "title" and isinstance(v, str):
                obj[k] = {"text": v}
            elif k != "template":
                _text_titles(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _text_titles(v)


def _finish(fig: go.Figure) -> go.Figure:
    """Checks that no title is a bare string (see the module docstring); tests/test_plots.py walks
    every figure too."""
    lay = fig.layout.to_plotly_json()
    lay.pop("template", None)
    bare = []
    _find_bare_titles(lay, "layout", bare)
    assert not bare, f"titles given as bare strings are not drawn by plotly.js 3: {bare}"
    return fig


def _find_bare_titles(obj, path: str, out: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "title" and isinstance(v, str):
                out.append(path)
            else:
                _find_bare_titles(v, f"{path}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _find_bare_titles(v, f"{path}[{i}]", out)


def _figure() -> go.Figure:
    """An empty figure that skips plotly's per-property validation (the traces here are built from
    known-good values; validation was most of a redraw's time in the explorer)."""
    return go.Figure(_validate=False)


def _subplots(**kw) -> go.Figure:
    return make_subplots(figure=_figure(), **kw)


def _dict_figure(data: list[dict], layout: dict) -> go.Figure:
    """A figure from plain dicts without validation: about 1 ms instead of 100+ ms for the
    explorer's redraws (tests/test_plots.py checks what these figures contain)."""
    _text_titles(layout)
    _text_titles(data)
    return go.Figure({"data": data, "layout": layout}, _validate=False)


def _layout(title: str, height: int, legend_below: bool = False, **extra) -> dict:
    legend = (dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0) if legend_below else
              dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
    return {"template": TEMPLATE, "title": {"text": title}, "height": height, "legend": legend,
            "margin": dict(l=60, r=20, t=90 if not legend_below else 60, b=110 if legend_below else 60),
            "hoverlabel": dict(namelength=-1), **extra}


def _hline_parts(y: float, text: str, log_y: bool = False, dash: str = "dash", color_: str = "#444",
                 yref: str = "y") -> tuple[dict, dict]:
    """(shape, annotation) of a labelled horizontal line; on a log axis the label sits at log10(y)."""
    xref = "x domain" if yref == "y" else f"x{yref[1:]} domain"
    shape = dict(type="line", xref=xref, x0=0, x1=1, yref=yref, y0=y, y1=y,
                 line=dict(dash=dash, color=color_, width=1.5))
    ann = dict(x=1, xref=xref, y=math.log10(y) if log_y else y, yref=yref, text=text, showarrow=False,
               xanchor="right", yanchor="bottom", font=dict(size=11, color=color_), bgcolor="rgba(255,255,255,0.8)")
    return shape, ann


def _caption_parts(text: str) -> dict:
    return dict(text=text, xref="paper", yref="paper", x=0, y=-0.16, xanchor="left", yanchor="top", showarrow=False,
                font=dict(size=11, color="#444"), align="left")


def _subplot_title(text: str, y: float) -> dict:
    return dict(text=text, xref="paper", yref="paper", x=0.5, y=y, xanchor="center", yanchor="bottom",
                showarrow=False, font=dict(size=13))


LOG_T_TICKS = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]


def color(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


RIGHT_LEGEND = dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.02)


def _base(fig: go.Figure, title: str, height: int = 380, legend: dict | None = None) -> go.Figure:
    """Template, title and margins, and the titles made drawable (`_finish`). The legend sits in a
    row of its own between the title and the plot (`legend=RIGHT_LEGEND` for long legends, which
    would otherwise wrap into the title)."""
    right = legend is RIGHT_LEGEND
    b = max(fig.layout.margin.b or 0, 60)  # a caption under the plot has asked for more
    fig.update_layout(template=TEMPLATE, title=dict(text=title, y=0.98, yanchor="top", yref="container"),
                      height=height, margin=dict(l=60, r=20, t=90, b=b),
                      legend=legend or dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
                      hoverlabel=dict(namelength=-1))
    if right:
        fig.update_layout(margin=dict(t=60))
    return _finish(fig)


def caption(fig: go.Figure, text: str) -> go.Figure:
    """Puts `text` under the plot (and in layout.meta['caption'] for the page to repeat)."""
    if not text:
        return fig
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0, y=-0.28, xanchor="left", yanchor="top",
                       showarrow=False, font=dict(size=11, color="#444"), align="left")
    b = max(fig.layout.margin.b or 0, 100 + 16 * (text.count("<br>") + 1))
    fig.update_layout(margin=dict(b=b), meta={**(fig.layout.meta or {}), "caption": text})
    return fig


def _hline(fig: go.Figure, y: float, text: str, log_y: bool = False, dash: str = "dash", color_: str = "#444") -> None:
    """A labelled horizontal line; on a log axis the label goes at log10(y)."""
    fig.add_hline(y=y, line=dict(dash=dash, color=color_, width=1.5))
    fig.add_annotation(x=1, xref="x domain", y=math.log10(y) if log_y else y, yref="y", text=text, showarrow=False,
                       xanchor="right", yanchor="bottom", font=dict(size=11, color=color_), bgcolor="rgba(255,255,255,0.8)")


# --- Prune page ------------------------------------------------------------------------------

def allocation_figure(df: pd.DataFrame, target: float, title: str = "Sparsity per layer and module") -> go.Figure:
    """Bars: sparsity (fraction of the module's units pruned) per layer, attention and MLP side by
    side, with the target as a line. df: layer, module, sparsity, units_kept, units_total, params_pruned."""
    fig = _figure()
    for kind in ("attn", "mlp"):
        d = df[df["module"] == kind].sort_values("layer")
        if d.empty:
            continue
        fig.add_bar(x=d["layer"], y=d["sparsity"], name=MODULE_NAMES[kind], marker_color=MODULE_COLORS[kind],
                    customdata=np.stack([d["units_kept"], d["units_total"], d["params_pruned"]], axis=1),
                    hovertemplate="layer %{x}<br>sparsity %{y:.1%}<br>kept %{customdata[0]} of %{customdata[1]} units"
                                  "<br>%{customdata[2]:,} parameters pruned<extra>" + MODULE_NAMES[kind] + "</extra>")
    _hline(fig, target, f"target {target:.0%} of prunable parameters")
    fig.update_layout(barmode="group", xaxis_title_text="decoder layer", yaxis_title_text="sparsity (share of units pruned)",
                      yaxis_tickformat=".0%", yaxis_range=[0, 1])
    return _base(fig, title)


def energy_figure(df: pd.DataFrame, temperature: float, energy_kind: str,
                  title: str = "Module energies and the softmax allocation") -> go.Figure:
    """Top: each module's energy (log); bottom: the softmax allocation at T (whole units, with the
    continuous value as a tick when present). df: layer, module, energy, sparsity [, continuous]."""
    data = []
    for kind in ("attn", "mlp"):
        d = df[df["module"] == kind].sort_values("layer")
        if d.empty:
            continue
        c, x = MODULE_COLORS[kind], d["layer"].tolist()
        data.append(dict(type="scatter", x=x, y=d["energy"].tolist(), mode="lines+markers", xaxis="x", yaxis="y",
                         name=f"{MODULE_NAMES[kind]} energy", line=dict(color=c), legendgroup=kind,
                         hovertemplate="layer %{x}<br>energy %{y:.3g}<extra></extra>"))
        data.append(dict(type="bar", x=x, y=d["sparsity"].tolist(), xaxis="x2", yaxis="y2", marker=dict(color=c),
                         name=f"{MODULE_NAMES[kind]} sparsity", legendgroup=kind,
                         hovertemplate="layer %{x}<br>sparsity %{y:.1%}<extra></extra>"))
        if "continuous" in d:
            data.append(dict(type="scatter", x=x, y=d["continuous"].tolist(), mode="markers", xaxis="x2", yaxis="y2",
                             marker=dict(symbol="line-ew-open", size=12, color="#000"), legendgroup="cont",
                             name="before rounding to whole units", showlegend=kind == "attn",
                             hovertemplate="layer %{x}<br>continuous s %{y:.1%}<extra></extra>"))
    t = "inf (uniform)" if math.isinf(temperature) else f"{temperature:g}"
    layout = _layout(title, 560, legend_below=True, barmode="group",
                     xaxis=dict(anchor="y", matches="x2", showticklabels=False),
                     yaxis=dict(domain=[0.56, 1.0], type="log", title=dict(text="energy")),
                     xaxis2=dict(anchor="y2", title=dict(text="decoder layer")),
                     yaxis2=dict(domain=[0.0, 0.44], tickformat=".0%", title=dict(text="sparsity")),
                     annotations=[_subplot_title(f"energy ({energy_kind}), lower = pruned first", 1.0),
                                  _subplot_title(f"softmax allocation at T = {t}", 0.44)])
    return _dict_figure(data, layout)


def ppl_figure(df: pd.DataFrame, title: str = "Perplexity, dense vs pruned") -> go.Figure:
    """Bars per evaluation corpus (its honest label), dense and pruned, on a linear axis from zero (a
    bar's length is its value), protocol as caption.
    df: label, model (dense | pruned), value, protocol."""
    fig = _figure()
    for i, which in enumerate(("dense", "pruned")):
        d = df[df["model"] == which]
        if d.empty:
            continue
        vals = d["value"].astype(float)
        fig.add_bar(x=d["label"], y=vals.where(np.isfinite(vals)), name=which, marker_color=color(7 if i == 0 else 3),
                    text=[f"{v:.4g}" if math.isfinite(v) else "inf" for v in vals], textposition="outside",
                    customdata=d["protocol"],
                    hovertemplate="%{x}<br>" + which + " ppl %{y:.4g}<br>%{customdata}<extra></extra>")
    fig.update_layout(barmode="group", yaxis_rangemode="tozero", yaxis_title_text="perplexity",
                      xaxis_title_text="evaluation set")
    protocols = sorted(set(df["protocol"])) if not df.empty else []
    caption(fig, "<br>".join(f"protocol: {p}" for p in protocols))
    return _base(fig, title)


def params_figure(df: pd.DataFrame, title: str = "Parameters before and after") -> go.Figure:
    """Grouped bars (millions): all and prunable parameters, dense vs pruned. df: count, model, params."""
    fig = _figure()
    for i, which in enumerate(("dense", "pruned")):
        d = df[df["model"] == which]
        fig.add_bar(x=d["count"], y=d["params"] / 1e6, name=which, marker_color=color(7 if i == 0 else 3),
                    text=[f"{p / 1e6:.1f} M" for p in d["params"]], textposition="outside",
                    hovertemplate="%{x}<br>%{y:.2f} M parameters<extra>" + which + "</extra>")
    fig.update_layout(barmode="group", xaxis_title_text="parameters counted", yaxis_title_text="parameters (millions)")
    return _base(fig, title)


def memory_timeline_figure(df: pd.DataFrame, kind: str = "", estimate_bytes: float | None = None,
                           title: str = "Device memory over the run") -> go.Figure:
    """Step line of device memory (MiB) over time; the peak column too when present; the pre-run
    estimate as a line. df: t, mib [, peak_mib, label]. kind: "measured-cuda" | "accounted-cpu"."""
    fig = _figure()
    label = df["label"] if "label" in df else None
    fig.add_scatter(x=df["t"], y=df["mib"], mode="lines", line_shape="hv", name="held on the device",
                    line_color=color(0), customdata=label,
                    hovertemplate="%{x:.1f} s<br>%{y:.1f} MiB" + ("<br>%{customdata}" if label is not None else "")
                                  + "<extra></extra>")
    if "peak_mib" in df:
        fig.add_scatter(x=df["t"], y=df["peak_mib"], mode="lines", line_shape="hv", name="peak so far",
                        line=dict(color=color(3), dash="dot"), hovertemplate="%{x:.1f} s<br>peak %{y:.1f} MiB<extra></extra>")
    if estimate_bytes:
        _hline(fig, estimate_bytes / 2**20, f"estimated peak {estimate_bytes / 2**20:.0f} MiB", color_=color(2))
    what = {"measured-cuda": "measured (torch.cuda.memory_allocated)",
            "accounted-cpu": "accounted by the pipeline (CPU has no separate device)"}.get(kind, kind)
    fig.update_layout(xaxis_title_text="time since start (s)", yaxis_title_text="MiB on the compute device")
    caption(fig, f"memory: {what}" if what else "")
    return _base(fig, title)


def refit_error_figure(df: pd.DataFrame, title: str = "Reconstruction error per module: masked vs refit") -> go.Figure:
    """Mean squared output error per token of each pruned module, with the removed units simply
    zeroed (no refit) and after the least-squares refit; log y. df: layer, module, err_no_refit, err_after_refit."""
    x = [f"L{la} {m}" for la, m in zip(df["layer"], df["module"])]
    fig = _figure()
    fig.add_scatter(x=x, y=df["err_no_refit"], mode="markers", name="removed units zeroed (no refit)",
                    marker=dict(color=color(3), symbol="x", size=8), hovertemplate="%{x}<br>%{y:.3g}<extra></extra>")
    fig.add_scatter(x=x, y=df["err_after_refit"], mode="markers", name="after least-squares refit (+ bias)",
                    marker=dict(color=color(2), size=8), hovertemplate="%{x}<br>%{y:.3g}<extra></extra>")
    fig.update_layout(yaxis_type="log", yaxis_title_text="output error (mean squared, per token)", xaxis_title_text="module")
    return _base(fig, title)


def admm_trace_figure(df: pd.DataFrame, title: str = "ADMM convergence per module") -> go.Figure:
    """Primal residual ||W'-Z||/||W'|| per iteration for each module (log y); support changes on hover.
    df: layer, module, iteration, primal_residual, dual_residual, support_changes."""
    fig = _figure()
    for i, ((layer, kind), d) in enumerate(df.groupby(["layer", "module"], sort=True)):
        fig.add_scatter(x=d["iteration"], y=d["primal_residual"], mode="lines", name=f"L{layer} {kind}",
                        line=dict(color=MODULE_COLORS.get(kind, color(i)), width=1), opacity=0.7,
                        customdata=np.stack([d["dual_residual"], d["support_changes"]], axis=1),
                        hovertemplate=f"L{layer} {kind}<br>iteration %{{x}}<br>primal %{{y:.2e}}<br>"
                                      "dual %{customdata[0]:.2e}<br>support changes %{customdata[1]}<extra></extra>")
    fig.update_layout(yaxis_type="log", xaxis_title_text="ADMM iteration", yaxis_title_text="primal residual ||W'-Z|| / ||W'||",
                      showlegend=False)
    return _base(fig, title)


# --- Allocation explorer -----------------------------------------------------------------------

def temperature_heatmap(df: pd.DataFrame, title: str = "Softmax allocation over temperature") -> go.Figure:
    """Heatmaps (one per module kind) of sparsity over layer x temperature. df: temperature, layer, module, sparsity."""
    kinds = [k for k in ("attn", "mlp") if k in set(df["module"])]
    fig = _subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[MODULE_NAMES[k] for k in kinds])
    for c, kind in enumerate(kinds, start=1):
        piv = df[df["module"] == kind].pivot_table(index="layer", columns="temperature", values="sparsity")
        fig.add_heatmap(z=piv.values, x=list(piv.columns), y=piv.index, zmin=0, zmax=0.9,
                        colorscale="Viridis", showscale=c == len(kinds), colorbar=dict(title=dict(text="sparsity"), tickformat=".0%"),
                        hovertemplate="T %{x:.3g}<br>layer %{y}<br>sparsity %{z:.1%}<extra>" + MODULE_NAMES[kind]
                                      + "</extra>", row=1, col=c)
        fig.update_xaxes(title_text="temperature T (log)", type="log", tickvals=LOG_T_TICKS, row=1, col=c)
    fig.update_yaxes(title_text="decoder layer", row=1, col=1)
    return _base(fig, title, height=460)


def schemes_figure(df: pd.DataFrame, target: float, title: str = "Allocation schemes, same budget") -> go.Figure:
    """Sparsity per layer for each scheme (lines), attention and MLP in two panels.
    df: scheme, layer, module, sparsity."""
    kinds = [k for k in ("attn", "mlp") if k in set(df["module"])]
    rows = len(kinds)
    gap = 0.12
    h = (1 - gap * (rows - 1)) / rows
    domains = [[1 - (r + 1) * h - r * gap, 1 - r * h - r * gap] for r in range(rows)]
    data = []
    for i, (scheme, d0) in enumerate(df.groupby("scheme", sort=False)):
        base = scheme.split(" ")[0]
        for r, kind in enumerate(kinds):
            d = d0[d0["module"] == kind].sort_values("layer")
            ax = "" if r == 0 else str(r + 1)
            data.append(dict(type="scatter", x=d["layer"].tolist(), y=d["sparsity"].tolist(), mode="lines+markers",
                             xaxis=f"x{ax}", yaxis=f"y{ax}", name=scheme, legendgroup=scheme, showlegend=r == 0,
                             line=dict(color=series_color("structprune", base), dash="dot" if base == "uniform" else "solid"),
                             hovertemplate=f"{scheme}<br>layer %{{x}}<br>sparsity %{{y:.1%}}<extra></extra>"))
    text = f"same budget: {target:.0%} of the prunable parameters, in whole heads / channels"
    layout = _layout(title, 560, meta={"caption": text}, annotations=[_caption_parts(text)] + [
        _subplot_title(MODULE_NAMES[k], domains[r][1]) for r, k in enumerate(kinds)])
    for r in range(rows):
        ax = "" if r == 0 else str(r + 1)
        last = r == rows - 1
        layout[f"xaxis{ax}"] = dict(anchor=f"y{ax}", matches="x" if r else None, showticklabels=last,
                                    title=dict(text="decoder layer" if last else ""))
        layout[f"yaxis{ax}"] = dict(domain=domains[r], tickformat=".0%", range=[0, 0.95], title=dict(text="sparsity"))
    layout["legend"], layout["margin"]["t"], layout["margin"]["b"] = dict(RIGHT_LEGEND), 60, 90  # five entries: a row would wrap into the title
    return _dict_figure(data, layout)


def entropy_figure(df: pd.DataFrame, temperature: float | None = None,
                   title: str = "Entropy of the allocation vs temperature") -> go.Figure:
    """Entropy (nats) of where the pruned parameters sit vs T (log x), its maximum (uniform) as a
    line and the current T as a marker. df: temperature, entropy, uniform."""
    data = [dict(type="scatter", x=df["temperature"].tolist(), y=df["entropy"].tolist(), mode="lines",
                 name="softmax(T)", line=dict(color=color(0)),
                 hovertemplate="T %{x:.3g}<br>entropy %{y:.4f} nats<extra></extra>")]
    shapes, anns = [], []
    if len(df):
        shape, ann = _hline_parts(float(df["uniform"].iloc[0]), "uniform (T = inf): the maximum", color_=color(7),
                                  dash="dot")
        shapes, anns = [shape], [ann]
    if temperature is not None and len(df):
        y = float(np.interp(np.log(temperature), np.log(df["temperature"]), df["entropy"]))
        data.append(dict(type="scatter", x=[temperature], y=[y], mode="markers", name=f"T = {temperature:g}",
                         marker=dict(size=11, color=color(3)), hovertemplate="T %{x:.3g}<br>%{y:.4f} nats<extra></extra>"))
    layout = _layout(title, 380, shapes=shapes, annotations=anns,
                     xaxis=dict(type="log", title=dict(text="temperature T (log)"), tickvals=LOG_T_TICKS),
                     yaxis=dict(title=dict(text="entropy (nats)")))
    return _dict_figure(data, layout)


# --- Compare runs ------------------------------------------------------------------------------

def _styles(keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(colour, dash) per (method, scheme) series: the shared colour, and a dash of its own when
    several series share a colour (e.g. softmax at two energies)."""
    seen: dict[str, int] = {}
    out = []
    for method, scheme in keys:
        c = series_color(method, scheme)
        out.append((c, DASHES[seen.get(c, 0) % len(DASHES)]))
        seen[c] = seen.get(c, 0) + 1
    return out


def _numeric(col: pd.Series) -> pd.Series:
    """A column as floats: records store T = inf as the string "inf"; a frame concatenated with an
    empty one has object dtype, which numpy's isfinite refuses."""
    return pd.to_numeric(col.replace({"inf": math.inf, "-inf": -math.inf}), errors="coerce").astype(float)


def ppl_vs_sparsity_figure(df: pd.DataFrame, protocol: str, group: str = "method_allocation",
                           x: str = "sparsity_target", title: str = "Perplexity vs sparsity") -> go.Figure:
    """One line per method/allocation (mean over seeds, each run as a point), log y, coloured by
    `series_color`. df: runs_frame rows of one evaluation protocol."""
    fig = _figure()
    df = df.assign(**{x: _numeric(df[x]), "ppl_pruned": _numeric(df["ppl_pruned"])})
    groups = list(df.groupby(group, sort=True))
    keys = [(str(d["method"].iloc[0]) if "method" in d else "", str(d["allocation"].iloc[0]) if "allocation" in d else "")
            for _, d in groups]
    for (name, d), (c, dash) in zip(groups, _styles(keys)):
        d = d.sort_values(x)
        mean = d.groupby(x, as_index=False)["ppl_pruned"].mean()
        fig.add_scatter(x=mean[x], y=mean["ppl_pruned"], mode="lines", name=str(name), legendgroup=str(name),
                        line=dict(color=c, dash=dash), hoverinfo="skip")
        fig.add_scatter(x=d[x], y=d["ppl_pruned"], mode="markers", name=str(name), legendgroup=str(name),
                        showlegend=False, marker=dict(color=c, size=8), customdata=d[["run_id", "seed"]],
                        hovertemplate=f"{name}<br>sparsity %{{x:.0%}}<br>ppl %{{y:.4g}}<br>run %{{customdata[0]}}"
                                      " seed %{customdata[1]}<extra></extra>")
    dense = _numeric(df["ppl_dense"]).dropna().unique() if "ppl_dense" in df else []
    if len(dense) == 1:
        _hline(fig, float(dense[0]), f"dense {float(dense[0]):.4g}", log_y=True)
    fig.update_layout(yaxis_type="log", yaxis_title_text="perplexity (log)", xaxis_tickformat=".0%",
                      xaxis_range=[-0.02, 0.92], xaxis_title_text="sparsity target (share of prunable parameters)")
    caption(fig, f"protocol: {protocol}")
    return _base(fig, title, height=460, legend=RIGHT_LEGEND)


def ppl_vs_speedup_figure(df: pd.DataFrame, protocol: str, title: str = "Perplexity vs measured speed-up") -> go.Figure:
    """The trade-off users choose on: each run with a measured speed (runs_frame rows of one evaluation
    protocol with `speedup_prefill`) as a point, pruned perplexity against its prefill speed-up over
    dense, coloured like everywhere else; dense is the point (1, its perplexity)."""
    fig = _figure()
    df = df.assign(speedup_prefill=_numeric(df["speedup_prefill"]), ppl_pruned=_numeric(df["ppl_pruned"]))
    df = df[np.isfinite(df["speedup_prefill"]) & np.isfinite(df["ppl_pruned"])]
    groups = list(df.groupby("method_allocation", sort=True))
    keys = [(str(d["method"].iloc[0]), str(d["allocation"].iloc[0])) for _, d in groups]
    for (name, d), (c, _) in zip(groups, _styles(keys)):
        fig.add_scatter(x=d["speedup_prefill"], y=d["ppl_pruned"], mode="markers", name=str(name), marker=dict(color=c, size=9),
                        customdata=d[["run_id", "sparsity_target", "speed_shapes", "speed_device"]],
                        hovertemplate=f"{name}<br>speed-up %{{x:.2f}}x (%{{customdata[2]}}, %{{customdata[3]}})"
                                      "<br>ppl %{y:.4g}<br>sparsity %{customdata[1]:.0%}<br>run %{customdata[0]}"
                                      "<extra></extra>")
    dense = _numeric(df["ppl_dense"]).dropna().unique()
    if len(dense) == 1:
        fig.add_scatter(x=[1.0], y=[float(dense[0])], mode="markers", name="dense",
                        marker=dict(color="#444", symbol="diamond", size=11),
                        hovertemplate="dense<br>ppl %{y:.4g}<extra></extra>")
    fig.update_layout(yaxis_type="log", yaxis_title_text="perplexity (log)",
                      xaxis_title_text="prefill speed-up over dense at batch 1 (measured, x)")
    caption(fig, f"protocol: {protocol}; speed measured on each run's own device after the run")
    return _base(fig, title, height=460, legend=RIGHT_LEGEND)


def allocation_overlay_figure(df: pd.DataFrame, title: str = "Allocations of the chosen runs") -> go.Figure:
    """Sparsity per layer, one line per run, attention and MLP panels, coloured by the run's method
    and scheme. df: run, layer, module, sparsity [, method, scheme]."""
    kinds = [k for k in ("attn", "mlp") if k in set(df["module"])]
    fig = _subplots(rows=max(len(kinds), 1), cols=1, shared_xaxes=True, vertical_spacing=0.1,
                    subplot_titles=[MODULE_NAMES[k] for k in kinds])
    runs = list(df.groupby("run", sort=False))
    keys = [(str(d["method"].iloc[0]) if "method" in d else "", str(d["scheme"].iloc[0]) if "scheme" in d else "")
            for _, d in runs]
    for (run, d0), (c, dash) in zip(runs, _styles(keys)):
        for r, kind in enumerate(kinds, start=1):
            d = d0[d0["module"] == kind].sort_values("layer")
            fig.add_scatter(x=d["layer"], y=d["sparsity"], mode="lines+markers", name=str(run), legendgroup=str(run),
                            showlegend=r == 1, line=dict(color=c, dash=dash), row=r, col=1,
                            hovertemplate=f"{run}<br>layer %{{x}}<br>sparsity %{{y:.1%}}<extra></extra>")
            fig.update_yaxes(tickformat=".0%", title_text="sparsity", row=r, col=1)
    fig.update_xaxes(title_text="decoder layer", row=max(len(kinds), 1), col=1)
    return _base(fig, title, height=560, legend=RIGHT_LEGEND)


def ppl_vs_temperature_figure(df: pd.DataFrame, protocol: str, title: str = "Perplexity vs temperature") -> go.Figure:
    """Softmax runs: ppl vs T (log-log) per (sparsity, energy), in the softmax colour (a dash per
    series); T = inf (uniform) as a line. df: runs_frame rows with temperature, ppl_pruned,
    sparsity_target, energy (T may be the string "inf", as records store it)."""
    fig = _figure()
    df = df.assign(temperature=_numeric(df["temperature"]), ppl_pruned=_numeric(df["ppl_pruned"]))
    finite = df[np.isfinite(df["temperature"])]
    groups = list(finite.groupby(["sparsity_target", "energy"], sort=True))
    for (key, d), (c, dash) in zip(groups, _styles([("structprune", "softmax")] * len(groups))):
        d = d.sort_values("temperature")
        name = f"s={key[0]:.0%} · {key[1]}"
        fig.add_scatter(x=d["temperature"], y=d["ppl_pruned"], mode="lines+markers", name=name,
                        line=dict(color=c, dash=dash), customdata=d["run_id"],
                        hovertemplate=name + "<br>T %{x:.3g}<br>ppl %{y:.4g}<br>run %{customdata}<extra></extra>")
    for s, d in df[np.isinf(df["temperature"])].groupby("sparsity_target"):
        v = float(d["ppl_pruned"].mean())
        _hline(fig, v, f"uniform (T = inf), s={s:.0%}: {v:.4g}", log_y=True, color_=SCHEME_COLORS["uniform"], dash="dot")
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title_text="temperature T (log)",
                      yaxis_title_text="perplexity (log)")
    caption(fig, f"protocol: {protocol}")
    return _base(fig, title, height=440, legend=RIGHT_LEGEND)


# --- Memory ------------------------------------------------------------------------------------

def memory_scaling_figure(est: pd.DataFrame, measured: pd.DataFrame | None = None,
                          gpu_gib: Sequence[tuple[str, float]] = (("80 GB GPU", 80 * 1e9 / 2**30),
                                                                  ("141 GB GPU", 141 * 1e9 / 2**30)),
                          title: str = "Peak device memory vs model size") -> go.Figure:
    """Estimated peak (GiB) vs parameters, log-log, one line per method; GPU sizes as lines;
    measured GPU peaks as markers (x where the run ran out of memory).
    est: preset, n_params, method, peak_gib; measured: n_params, method, peak_gib, oom, config_name."""
    fig = _figure()
    methods = list(dict.fromkeys(est["method"]))
    fam = est["family"] if "family" in est else pd.Series("", index=est.index)
    for i, m in enumerate(methods):
        for j, f in enumerate(dict.fromkeys(fam[est["method"] == m])):  # lines join a family's sizes only
            d = est[(est["method"] == m) & (fam == f)].sort_values("n_params")
            fig.add_scatter(x=d["n_params"], y=d["peak_gib"], mode="lines+markers", name=f"{m} (estimate)",
                            legendgroup=m, showlegend=j == 0, line_color=color(i), customdata=d["preset"],
                            hovertemplate="%{customdata}<br>%{x:.3s} parameters<br>%{y:.3g} GiB<extra>" + m + "</extra>")
    if measured is not None and not measured.empty:
        for m, d in measured.groupby("method"):
            i = methods.index(m) if m in methods else len(methods)
            ok = d[~d["oom"] & d["peak_gib"].notna()]
            fig.add_scatter(x=ok["n_params"], y=ok["peak_gib"], mode="markers", name=f"{m} (measured)",
                            marker=dict(color=color(i), size=11, symbol="diamond", line=dict(color="#000", width=1)),
                            customdata=ok["config_name"],
                            hovertemplate="%{customdata}<br>measured %{y:.3g} GiB<extra>" + m + "</extra>")
            oom = d[d["oom"]]
            if not oom.empty:
                y = oom["estimate_gib"].where(oom["estimate_gib"].notna(), gpu_gib[-1][1] if gpu_gib else 1.0)
                fig.add_scatter(x=oom["n_params"], y=y, mode="markers", name=f"{m} (out of memory)",
                                marker=dict(color=color(i), size=12, symbol="x"), customdata=oom["config_name"],
                                hovertemplate="%{customdata}<br>out of memory<extra>" + m + "</extra>")
    for name, gib in gpu_gib:
        _hline(fig, gib, name, log_y=True)
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title_text="model parameters N (log)",
                      yaxis_title_text="peak device memory (GiB, log)")
    return _base(fig, title, height=480)


def depth_width_figure(df: pd.DataFrame, slopes: dict[str, float] | None = None,
                       title: str = "One decoder layer vs the whole model") -> go.Figure:
    """Parameters of one layer vs the model's N for real configs (log-log), with N itself (what a
    global method holds) and c * sqrt(N) for reference. df: preset, family, n_params, layer_params."""
    fig = _figure()
    n = np.geomspace(df["n_params"].min() / 1.5, df["n_params"].max() * 1.5, 50)
    c = float(np.exp(np.mean(np.log(df["layer_params"]) - 0.5 * np.log(df["n_params"]))))
    fig.add_scatter(x=n, y=n, mode="lines", name="N (the whole model: global methods)",
                    line=dict(color=color(7), dash="dash"), hoverinfo="skip")
    fig.add_scatter(x=n, y=c * np.sqrt(n), mode="lines", name="c * sqrt(N)", line=dict(color=color(7), dash="dot"),
                    hoverinfo="skip")
    for i, (fam, d) in enumerate(df.groupby("family", sort=False)):
        d = d.sort_values("n_params")
        name = fam + (f" (slope {slopes[fam]:.2f})" if slopes and fam in slopes and math.isfinite(slopes[fam]) else "")
        fig.add_scatter(x=d["n_params"], y=d["layer_params"], mode="lines+markers+text", name=name,
                        text=d["preset"], textposition="top left", textfont=dict(size=9), line_color=color(i),
                        customdata=np.stack([d["n_layers"], d["hidden"]], axis=1),
                        hovertemplate="%{text}<br>N %{x:.3s}<br>one layer %{y:.3s} parameters<br>"
                                      "%{customdata[0]} layers, hidden %{customdata[1]}<extra></extra>")
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title_text="model parameters N (log)",
                      yaxis_title_text="parameters held on the device (log)")
    caption(fig, "depth and width grow together, so one layer grows about as sqrt(N): a layer-wise method holds "
                 "one layer, a global one all N")
    return _base(fig, title, height=480)


# --- Method ------------------------------------------------------------------------------------

def support_figure(df: pd.DataFrame, title: str = "Which units ADMM keeps, iteration by iteration") -> go.Figure:
    """Heatmap of kept (1) / removed (0) per unit over iterations. df: iteration, unit, kept."""
    piv = df.pivot_table(index="unit", columns="iteration", values="kept").sort_index()
    fig = _figure()
    fig.add_heatmap(z=piv.values, x=piv.columns, y=piv.index, zmin=0, zmax=1, showscale=False,
                    colorscale=[[0, "#f2f2f2"], [1, OKABE_ITO[0]]],
                    hovertemplate="iteration %{x}<br>unit %{y}<br>kept %{z}<extra></extra>")
    fig.update_layout(xaxis_title_text="ADMM iteration (0 = one-shot saliency start)", yaxis_title_text="unit (head / channel)")
    return _base(fig, title, height=360)


def residuals_figure(df: pd.DataFrame, title: str = "Residuals and penalty") -> go.Figure:
    """Primal and dual residuals (log y) and support changes per iteration.
    df: iteration, primal_residual, dual_residual, support_changes."""
    fig = _subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=df["iteration"], y=df["primal_residual"], mode="lines+markers", name="primal ||W'-Z||/||W'||",
                    line_color=color(0), secondary_y=False)
    fig.add_scatter(x=df["iteration"], y=df["dual_residual"], mode="lines+markers", name="dual rho||Z-Z_prev||/||W'||",
                    line_color=color(1), secondary_y=False)
    fig.add_bar(x=df["iteration"], y=df["support_changes"], name="support changes (units in + out)",
                marker_color=color(4), opacity=0.5, secondary_y=True)
    fig.update_yaxes(type="log", title_text="residual (log)", secondary_y=False)
    fig.update_yaxes(title_text="support changes", secondary_y=True, rangemode="tozero", dtick=1)
    fig.update_xaxes(title_text="ADMM iteration")
    fig = _base(fig, title)
    fig.update_layout(legend=dict(y=-0.25, yanchor="top"), margin=dict(b=110, t=60))
    return fig


def refit_selectors_figure(df: pd.DataFrame, title: str = "Error of the kept units: zeroed vs refit") -> go.Figure:
    """Per selector, the module's output error with removed units zeroed and after the refit, as a
    share of the module's output energy. df: selector, err_no_refit, err_after_refit, energy."""
    fig = _figure()
    for i, (col, name) in enumerate((("err_no_refit", "removed units zeroed"), ("err_after_refit", "least-squares refit"))):
        rel = df[col] / df["energy"]
        fig.add_bar(x=df["selector"], y=rel, name=name, marker_color=color(3 if i == 0 else 2),
                    text=[f"{v:.2%}" for v in rel], textposition="outside",
                    hovertemplate="%{x}<br>%{y:.3%} of the output energy<extra>" + name + "</extra>")
    fig.update_layout(barmode="group", yaxis_tickformat=".0%", yaxis_title_text="error / output energy",
                      xaxis_title_text="unit selector")
    return _base(fig, title)


__all__ = [n for n in dir() if n.endswith("_figure") or n in ("temperature_heatmap", "caption", "OKABE_ITO")]
