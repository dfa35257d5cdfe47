"""Compare runs: every stored run and the benchmark records, side by side under one protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from pages import _ui as ui
from structprune import plots, reports

st.title("Compare runs")
st.caption("Every finished run of the app's run store and the repository's own benchmark records, under one "
           "evaluation protocol at a time.")
n1, n2 = st.columns(2)
n1.page_link("pages/prune.py", label="Prune a model to add a run", icon=":material/content_cut:")
n2.page_link("pages/explorer.py", label="See each scheme's allocation before any run", icon=":material/tune:")
store = ui.store()
bench_runs, _ = reports.load_result_records(ui.RESULTS_DIR)
records = {r["run_id"]: r for r in store.records()}
frames = [reports.runs_frame(list(records.values()), "app")]
if bench_runs:
    frames.append(reports.runs_frame(bench_runs, "benchmark"))
    records.update({r["run_id"]: r for r in bench_runs if r.get("run_id")})
runs = pd.concat(frames, ignore_index=True)
if runs.empty:
    st.info("No finished run yet: prune one on the Prune page.")
    st.stop()
st.caption(f"{reports.plural(runs['run_id'].nunique(), 'finished run')}: {len(store.records())} from the app's run "
           f"store (`{store.path}`), {reports.plural(len(bench_runs), 'benchmark record')} from `benchmarks/results/`.")

f1, f2, f3, f4 = st.columns(4)


def pick(col, label: str, column: str, key: str, **kw) -> list:
    values = sorted(runs[column].dropna().astype(str).unique())
    return col.multiselect(label, values, default=values, key=key, **kw)


models = pick(f1, "Models", "model", "cmp_models")
methods = pick(f2, "Methods", "method", "cmp_methods")
allocs = pick(f3, "Allocations", "allocation", "cmp_allocs", format_func=reports.scheme_label)
sources = pick(f4, "Source", "source", "cmp_sources")
view = runs[runs["model"].astype(str).isin(models) & runs["method"].astype(str).isin(methods)
            & runs["allocation"].astype(str).isin(allocs) & runs["source"].isin(sources)]
protocols = view["eval_protocol"].dropna().value_counts()
if protocols.empty:
    st.info("No run matches the filters.")
    st.stop()
# first: the protocol of the newest app run (what the user just did), else the one with the most runs
# (the benchmark grid), so that adding a few records elsewhere does not change what a newcomer sees
mine = view[view["source"] == "app"].sort_values("created", ascending=False)["eval_protocol"].dropna()
order = list(dict.fromkeys(list(mine.iloc[:1]) + list(protocols.index)))
protocol = st.selectbox("Evaluation protocol (perplexities are comparable only under one)", order,
                        format_func=lambda p: f"{p} ({reports.plural(int(protocols[p]), 'run')})", key="cmp_protocol")
same = view[view["eval_protocol"] == protocol]

st.plotly_chart(plots.ppl_vs_sparsity_figure(same, protocol), key="cmp_ppl_sparsity")
soft = same[same["allocation"] == "softmax"]
if soft.loc[np.isfinite(soft["temperature"]), "temperature"].nunique() >= 2:
    st.plotly_chart(plots.ppl_vs_temperature_figure(soft, protocol), key="cmp_ppl_temperature")
else:
    st.caption("Fewer than two softmax temperatures under this protocol: the temperature sweep (ppl vs T) appears "
               "once there are runs at two or more temperatures.")

if np.isfinite(same["speedup_prefill"]).any():
    st.plotly_chart(plots.ppl_vs_speedup_figure(same, protocol), key="cmp_ppl_speed")
else:
    st.caption("No run under this protocol has a measured speed yet: runs started in the app measure it "
               "(`structprune prune --speed` on the command line); then perplexity vs speed-up appears here.")

st.subheader("Allocations side by side")
st.caption("Pick runs by what they are (method, allocation scheme and temperature, sparsity); the colour is the "
           "scheme's (a baseline's: its method's), the same in every chart of the app.")
first = same.drop_duplicates("run_id").sort_values(["sparsity_target", "method", "allocation", "temperature", "created"])
choices = {reports.run_choice_label(row): row["run_id"] for row in first.to_dict("records")}
common = first[first["sparsity_target"] == first["sparsity_target"].mode().iloc[0]] if len(first) else first
# one run per method / scheme / temperature at the most common sparsity: what the schemes do with one budget
# the project's own method first, then the baselines it is compared with
default = (common.drop_duplicates(["method", "allocation", "temperature"])
           .sort_values("method", key=lambda m: m != "structprune", kind="stable").head(4).to_dict("records"))
chosen = st.multiselect("Runs to overlay", list(choices), default=[reports.run_choice_label(r) for r in default],
                        key=f"cmp_overlay|{protocol}")
if chosen:
    labels = {label: records[choices[label]] for label in chosen}
    st.plotly_chart(plots.allocation_overlay_figure(reports.allocation_overlay_frame(labels)), key="cmp_overlay_chart")

st.subheader("Table")
cols = ["run_id", "source", "created", "model", "method_allocation", "energy", "temperature", "selector", "seed",
        "sparsity_target", "sparsity_achieved", "corpus_label", "ppl_dense", "ppl_pruned", "calib_loss_heldout",
        "calib_loss_pruned", "speedup_prefill", "speedup_decode", "size_ratio", "peak_mib", "memory_kind", "total_s",
        "protocol"]
st.caption(f"The runs under the protocol chosen above, one row each; the CSV holds every protocol's rows "
           f"({len(view)}).")
st.dataframe(same[cols], hide_index=True, key="cmp_table",
             column_config={"calib_loss_heldout": st.column_config.NumberColumn(
                                "held-out calib loss", help="nats/token on calibration-split windows the run did "
                                                           "not calibrate on: what allocations are chosen by"),
                            "calib_loss_pruned": st.column_config.NumberColumn(
                                "in-sample calib loss", help="nats/token on the first calibration windows"),
                            "method_allocation": st.column_config.TextColumn("method · allocation"),
                            "sparsity_target": st.column_config.NumberColumn(format="percent"),
                            "sparsity_achieved": st.column_config.NumberColumn(format="percent")})
st.download_button("Export the table (CSV)", view[cols].to_csv(index=False), "structprune-runs.csv", "text/csv",
                   key="cmp_csv")

failed = [r for r in store.runs() if r["status"] in ("failed", "cancelled")]
if failed:
    with st.expander(f"{reports.plural(len(failed), 'run')} that did not finish"):
        st.dataframe(pd.DataFrame(failed)[["run_id", "created", "status", "model", "method", "error"]],
                     hide_index=True)
