"""Memory: the estimator for real configs, global vs layer-wise peaks as models grow, measured points."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages import _ui as ui
from structprune import plots, reports
from structprune.estimate import config_from_json
from structprune.presets import PRESET_SOURCES, PRESETS, estimate_rows, family, loglog_slope, preset_config, scaling_rows

METHODS = ("global-taylor", "wanda-sp", "structprune")
GPUS = {"24 GB": 24, "40 GB": 40, "80 GB (A100 / H100)": 80, "141 GB (H200)": 141}


@st.cache_data(show_spinner=False)
def estimates(names: tuple[str, ...], nsamples: int, seqlen: int, dtype: str, batch: int) -> pd.DataFrame:
    return pd.DataFrame(estimate_rows({n: preset_config(n) for n in names}, METHODS, nsamples, seqlen, dtype, batch))


@st.cache_data(show_spinner=False)
def scaling() -> pd.DataFrame:
    return pd.DataFrame(scaling_rows())


st.title("Memory")
st.caption("Peak compute-device memory of a pruning run, predicted from a config's shapes alone "
           "(`estimate_memory`: the same byte formulas the pipeline accounts with). Global methods (global-taylor) "
           "hold the whole model, its gradients and activations; layer-wise ones one decoder layer, its Grams and "
           "one batch; structprune adds the solver's state and, as on CUDA, keeps its Grams in host memory "
           "while it solves.")

c1, c2, c3, c4, c5 = st.columns(5)
ui.init({"mem_nsamples": 128, "mem_seqlen": 2048, "mem_dtype": "bfloat16", "mem_batch": 1,
         "mem_gpus": ["80 GB (A100 / H100)", "141 GB (H200)"]})
nsamples = ui.number(c1, "Calibration windows", "nsamples", "mem_nsamples")
seqlen = ui.number(c2, "Tokens per window", "seqlen", "mem_seqlen")
dtype = ui.setting(c3, "dtype", "dtype", "mem_dtype")
batch = ui.number(c4, "Batch size", "batch_size", "mem_batch")
gpus = c5.multiselect("GPU sizes", list(GPUS), key="mem_gpus")
names = st.multiselect("Presets", list(PRESETS), default=list(PRESETS), key="mem_presets",
                       format_func=lambda n: f"{n} ({PRESET_SOURCES[n]})")
if not names:
    st.info("Choose at least one preset.")
    st.stop()

est = estimates(tuple(names), nsamples, seqlen, dtype, batch)
_, gpu_records = reports.load_result_records(ui.RESULTS_DIR)
measured = reports.gpu_frame(gpu_records)
fig = plots.memory_scaling_figure(est, measured, [(g, GPUS[g] * 1e9 / 2**30) for g in gpus])
st.plotly_chart(fig, key="mem_scaling")
if measured.empty:
    st.caption("No measured GPU points yet: `benchmarks/gpu_scaling.py` writes them to `benchmarks/results/gpu-*.json`.")
else:
    st.caption(f"Measured points: {len(measured)} records from benchmarks/results ({', '.join(sorted(set(measured['file'])))}).")

wide = est.pivot_table(index=["preset", "n_params"], columns="method", values="peak_gib").reset_index()
wide = wide.sort_values("n_params").rename(columns={m: f"{m} (GiB)" for m in METHODS})
st.dataframe(wide, hide_index=True, key="mem_table",
             column_config={"n_params": st.column_config.NumberColumn("parameters", format="compact")})

st.subheader("Host memory")
st.caption("The host's peak for a structprune run on a GPU, with the weights in host memory (the loaded model and "
           "the run's copy) or streamed from disk a layer at a time (`weights = disk`): the calibration activations, "
           "what is read at once, and one layer's Grams while they are solved. The process itself (Python, torch) "
           "adds ~0.4 GB on the CPU build, more with CUDA. Measured on this project's CPU runs: "
           "docs/RESULTS.md \"Models larger than host memory\".")
host = est[est["method"] == "structprune"].sort_values("n_params")
st.dataframe(host[["preset", "n_params", "model_gib", "host_memory_gib", "host_disk_gib"]], hide_index=True,
             key="mem_host_table",
             column_config={"n_params": st.column_config.NumberColumn("parameters", format="compact"),
                            "model_gib": st.column_config.NumberColumn("weights (GiB)", format="%.3g"),
                            "host_memory_gib": st.column_config.NumberColumn("host peak, weights in memory (GiB)",
                                                                             format="%.3g"),
                            "host_disk_gib": st.column_config.NumberColumn("host peak, weights on disk (GiB)",
                                                                           format="%.3g")})

st.subheader("Your config")
text = st.text_area("Paste a config.json", height=140, key="mem_json",
                    placeholder='{"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, ...}')
if text.strip():
    try:
        rows = pd.DataFrame(estimate_rows({"pasted": config_from_json(text)}, METHODS, nsamples, seqlen, dtype, batch))
        cols = st.columns(len(METHODS))
        for col, (_, r) in zip(cols, rows.iterrows()):
            col.metric(f"{r['method']} peak", f"{r['peak_gib']:.3g} GiB", help=f"peak phase: {r['peak_phase']}")
        sp = rows[rows["method"] == "structprune"].iloc[0]
        h1, h2 = st.columns(2)
        h1.metric("structprune host peak, weights in memory", f"{sp['host_memory_gib']:.3g} GiB")
        h2.metric("structprune host peak, weights on disk", f"{sp['host_disk_gib']:.3g} GiB")
        st.caption(f"{rows['n_params'].iloc[0] / 1e9:.3g} B parameters; one layer {rows['layer_gib'].iloc[0]:.3g} GiB; "
                   f"host memory for activations {rows['host_activation_gib'].iloc[0]:.3g} GiB.")
    except Exception as exc:  # noqa: BLE001 - bad JSON, unknown model_type, unsupported architecture
        ui.show_error(exc, "cannot estimate this config")

st.subheader("Why one layer is about sqrt(N)")
sc = scaling()
slopes = {fam: loglog_slope(d["n_params"], d["layer_params"]) for fam, d in sc.groupby("family") if len(d) > 2}
st.plotly_chart(plots.depth_width_figure(sc, slopes), key="mem_depth_width")
st.caption("Fitted exponents a of (one layer) ~ N^a: " + ", ".join(f"{f} {a:.2f}" for f, a in slopes.items())
           + ". a = 0.5 when depth and width grow together; real families widen faster than they deepen, so a > 0.5, "
           "still far below the a = 1 of holding the whole model.")
st.dataframe(sc.assign(family=[family(n) for n in sc["preset"]])[
    ["preset", "family", "n_params", "n_layers", "hidden", "layer_params", "layer_fraction"]], hide_index=True,
    column_config={"layer_fraction": st.column_config.NumberColumn("one layer / N", format="percent"),
                   "n_params": st.column_config.NumberColumn(format="compact"),
                   "layer_params": st.column_config.NumberColumn(format="compact")})
