"""Compare runs: every stored run and the benchmark records, side by side under one protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from pages import _ui as ui
from structprune import plots, reports

st.title("Compare runs")
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
st.caption(f"{runs['run_id'].nunique()} finished runs: {len(store.records())} from the app's run store "
           f"(`{store.path}`), {len(bench_runs)} benchmark records from `benchmarks/results/`.")

f1, f2, f3, f4 = st.columns(4)


def pick(col, label: str, column: str, key: str) -> list:
    values = sorted(runs[column].dropna().astype(str).unique())
    return col.multiselect(label, values, default=values, key=key)


models = pick(f1, "Models", "model", "cmp_models")
methods = pick(f2, "Methods", "method", "cmp_methods")
allocs = pick(f3, "Allocations", "allocation", "cmp_allocs")
sources = pick(f4, "Source", "source", "cmp_sources")
view = runs[runs["model"].astype(str).isin(models) & runs["method"].astype(str).isin(methods)
            & runs["allocation"].astype(str).isin(allocs) & runs["source"].isin(sources)]
protocols = view["eval_protocol"].dropna().value_counts()
if protocols.empty:
    st.info("No run matches the filters.")
    st.stop()
newest = view.sort_values("created", ascending=False)["eval_protocol"].dropna()
order = list(dict.fromkeys([newest.iloc[0]] + list(protocols.index)))  # the latest run's protocol first
protocol = st.selectbox("Evaluation protocol (perplexities are comparable only under one)", order,
                        format_func=lambda p: f"{p} ({protocols[p]} runs)", key="cmp_protocol")
same = view[view["eval_protocol"] == protocol]

st.plotly_chart(plots.ppl_vs_sparsity_figure(same, protocol), key="cmp_ppl_sparsity")
soft = same[same["allocation"] == "softmax"]
if soft.loc[np.isfinite(soft["temperature"].astype(float)), "temperature"].nunique() >= 2:
    st.plotly_chart(plots.ppl_vs_temperature_figure(soft, protocol), key="cmp_ppl_temperature")
else:
    st.caption("Fewer than two softmax temperatures under this protocol: the temperature sweep (ppl vs T) appears "
               "once there are runs at two or more temperatures.")

ids = list(dict.fromkeys(same["run_id"]))
chosen = st.multiselect("Runs to overlay", ids, default=ids[:3], key=f"cmp_overlay|{protocol}",
                        format_func=lambda i: f"{i} · {records[i]['method']} · "
                                              f"{records[i].get('allocation_scheme')} · s={records[i]['sparsity']['target']:g}")
if chosen:
    labels = {f"{i} ({records[i].get('allocation_scheme')}, s={records[i]['sparsity']['target']:g})": records[i]
              for i in chosen}
    st.plotly_chart(plots.allocation_overlay_figure(reports.allocation_overlay_frame(labels)), key="cmp_overlay_chart")

st.subheader("Table")
cols = ["run_id", "source", "created", "model", "method", "allocation", "energy", "temperature", "selector", "seed",
        "sparsity_target", "sparsity_achieved", "corpus_label", "ppl_dense", "ppl_pruned", "calib_loss_heldout",
        "calib_loss_pruned", "peak_mib", "memory_kind", "total_s", "protocol"]
st.dataframe(view[cols], hide_index=True, key="cmp_table",
             column_config={"calib_loss_heldout": st.column_config.NumberColumn(
                                "held-out calib loss", help="nats/token on calibration-split windows the run did "
                                                           "not calibrate on: what allocations are chosen by"),
                            "calib_loss_pruned": st.column_config.NumberColumn(
                                "in-sample calib loss", help="nats/token on the first calibration windows"),
                            "sparsity_target": st.column_config.NumberColumn(format="percent"),
                            "sparsity_achieved": st.column_config.NumberColumn(format="percent")})
st.download_button("Export the table (CSV)", view[cols].to_csv(index=False), "structprune-runs.csv", "text/csv",
                   key="cmp_csv")

failed = [r for r in store.runs() if r["status"] in ("failed", "cancelled")]
if failed:
    with st.expander(f"{len(failed)} runs that did not finish"):
        st.dataframe(pd.DataFrame(failed)[["run_id", "created", "status", "model", "method", "error"]],
                     hide_index=True)
