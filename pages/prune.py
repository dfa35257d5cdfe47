"""Prune: choose a model and settings, see the predicted cost, run in the background, read the results."""

from __future__ import annotations

import json
import math

import pandas as pd
import streamlit as st

from pages import _ui as ui
from structprune import plots, reports
from structprune.config import MAX_SPARSITY, PruneConfig
from structprune.errors import StructPruneError
from structprune.generation import DEFAULT_PROMPT, greedy_generate
from structprune.planning import available_models, detect_devices, device_choices, estimate_seconds

OTHER = "local folder or hub id..."
FILE = "a local file..."
QUICK = {"nsamples": 8, "seqlen": 256, "eval_windows": 8, "sensitivity_windows": 4}


@st.cache_data(show_spinner=False)
def corpora() -> dict[str, str]:
    from structprune.data.corpora import corpus_catalog

    return {c.name: f"{c.name}: {c.label}" + ("" if c.installed else f" ({c.note})") for c in corpus_catalog()}


def md(text: str) -> str:
    """Model output shown literally inside markdown."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in text).replace("\n", " ")


def quick_settings() -> None:
    for key, value in QUICK.items():
        st.session_state[key] = value


st.title("Prune a model")
st.caption("Structured pruning (attention heads, MLP channels) with one decoder layer on the compute device at a "
           "time. The built-in models are 4-bit GGUF weights dequantized to fp32, not the original bf16 checkpoints.")

# --- settings (initial values from PruneConfig: one source of truth) ---------------------------------
models = available_models()
ui.init({
    "model_choice": ui.default("model") if ui.default("model") in models else models[0], "model_other": "",
    "calib_path": "",
    "device": ui.default("device"), "temperature_inf": math.isinf(ui.default("temperature")),
    "eval_data": list(ui.default("eval_data")), "eval_windows": ui.default("eval_windows") or 0,
    **{k: ui.default(k) for k in ("sparsity", "method", "allocation", "temperature", "energy", "nsamples", "seqlen",
                                  "calib_data", "selector", "saliency", "target", "relative_error", "refit", "bias", "damp",
                                  "refine_epochs", "refine_lr", "refine_schedule", "s_max", "sensitivity_windows", "seed", "dtype", "batch_size")},
})
c1, c2, c3 = st.columns(3)
with c1:
    choice = st.selectbox("Model", models + [OTHER], key="model_choice", help=ui.tip("model"))
    name = st.text_input("Folder or hub id", key="model_other", placeholder="/path/to/hf-model or org/name") \
        if choice == OTHER else choice
    st.selectbox("Device", device_choices(), key="device", help=ui.tip("device"))
    st.caption("Detected: " + "; ".join(d["label"] for d in detect_devices()))
with c2:
    st.number_input("Sparsity target (share of prunable parameters)", 0.0, 1.0, step=0.05, key="sparsity",
                    help=ui.tip("sparsity") + f" (the library accepts 0 to {MAX_SPARSITY})")
    st.selectbox("Method", ui.options("method"), key="method", help=ui.tip("method"))
    st.selectbox("Allocation across layers", ui.options("allocation"), key="allocation", help=ui.tip("allocation"))
    tc1, tc2 = st.columns([2, 1])
    tc1.number_input("Temperature T", 0.01, 1000.0, step=0.1, key="temperature", format="%.3g",
                     help=ui.tip("temperature"))
    tc2.checkbox("T = inf", key="temperature_inf", help="uniform allocation (the softmax's infinite-T limit)")
    st.selectbox("Energy", ui.options("energy"), key="energy", help=ui.tip("energy"))
with c3:
    st.number_input("Calibration windows", 1, 4096, key="nsamples", help=ui.tip("nsamples"))
    st.number_input("Tokens per window (seqlen)", 2, 8192, key="seqlen", help=ui.tip("seqlen"))
    cat = corpora()
    st.selectbox("Calibration corpus", list(cat) + [FILE], key="calib_data",
                 format_func=lambda c: c if c == FILE else cat[c] + " (calibration split)", help=ui.tip("calib_data"))
    if st.session_state["calib_data"] == FILE:
        st.text_input("Corpus file (.txt or .parquet; its second half calibrates)", key="calib_path")
    st.multiselect("Evaluation corpora", list(cat), key="eval_data", format_func=cat.get, help=ui.tip("eval_data"))
    st.number_input("Evaluation windows per corpus (0 = all)", 0, 100000, key="eval_windows",
                    help=ui.tip("eval_windows"))
    st.button("Quick preview settings", on_click=quick_settings, key="quick",
              help="8 calibration windows of 256 tokens, 8 evaluation windows: minutes on a laptop CPU")

with st.expander("Advanced"):
    a1, a2, a3 = st.columns(3)
    a1.selectbox("Unit selector", ui.options("selector"), key="selector", help=ui.tip("selector"))
    a1.selectbox("Saliency", ui.options("saliency"), key="saliency", help=ui.tip("saliency"))
    a1.selectbox("Reconstruction target", ui.options("target"), key="target", help=ui.tip("target"))
    a2.checkbox("Relative reconstruction error", key="relative_error", help=ui.tip("relative_error"))
    a2.checkbox("Least-squares refit", key="refit", help=ui.tip("refit"))
    a2.checkbox("Bias compensation", key="bias", help=ui.tip("bias"))
    a2.number_input("Damping", 0.0001, 1.0, step=0.001, key="damp", format="%.4g", help=ui.tip("damp"))
    a2.number_input("Largest module sparsity", 0.05, 0.9, step=0.05, key="s_max", help=ui.tip("s_max"))
    a3.number_input("Block refit epochs (0 = off)", 0, 100, key="refine_epochs", help=ui.tip("refine_epochs"))
    a3.number_input("Block refit learning rate", 1e-6, 0.1, step=1e-5, key="refine_lr", format="%.2g",
                    help=ui.tip("refine_lr"))
    a3.selectbox("Block refit schedule", ui.options("refine_schedule"), key="refine_schedule",
                 help=ui.tip("refine_schedule"))
    a3.number_input("Sensitivity windows", 1, 256, key="sensitivity_windows",
                    help=ui.tip("sensitivity_windows") + " (at most the calibration windows: larger values use all)")
    a3.number_input("Seed", 0, 2**31 - 1, key="seed", help=ui.tip("seed"))
    a3.selectbox("dtype", ["float32", "bfloat16", "float16"], key="dtype", help=ui.tip("dtype"))
    a3.number_input("Batch size", 1, 256, key="batch_size", help=ui.tip("batch_size"))


def current_config() -> PruneConfig:
    """The settings above as a PruneConfig (raises InvalidConfigError with the library's message)."""
    s = st.session_state
    values = {k: s[k] for k in ("sparsity", "method", "allocation", "energy", "nsamples", "seqlen", "calib_data",
                                "device", "selector", "saliency", "target", "relative_error", "refit", "bias", "damp",
                                "refine_epochs", "refine_lr", "refine_schedule", "s_max", "sensitivity_windows", "seed", "dtype", "batch_size")}
    values["temperature"] = math.inf if s["temperature_inf"] else s["temperature"]
    if values["calib_data"] == FILE:
        values["calib_data"] = s.get("calib_path", "").strip()
    values["eval_data"] = tuple(s["eval_data"]) or ui.default("eval_data")
    values["eval_windows"] = s["eval_windows"] or None
    values["sensitivity_windows"] = min(s["sensitivity_windows"], s["nsamples"])  # a subset of the calibration
    return PruneConfig(model=(name or "").strip(), **values)


cfg, config_error, dev = None, None, "cpu"
try:
    cfg = current_config()
except (StructPruneError, ValueError) as exc:
    config_error = exc

# --- predicted cost -----------------------------------------------------------------------------
st.subheader("Before running")
if config_error is not None:
    ui.show_error(config_error)
elif cfg.model:
    try:
        from structprune.estimate import estimate_memory
        from structprune.methods import get_method
        from structprune.evaluation import resolve_device

        mcfg = ui.model_config(cfg.model)
        dev = str(resolve_device(cfg.device))
        sens = get_method(cfg.method)(cfg).wants_sensitivity()
        mem = estimate_memory(mcfg, cfg.method, cfg.nsamples, cfg.seqlen, cfg.dtype, cfg.batch_size, sensitivity=sens,
                              target=cfg.target, relative=cfg.relative_error, host_grams=dev.startswith("cuda"),
                              refine=cfg.refine_epochs > 0)
        secs = estimate_seconds(mcfg, cfg, dev)
        st.session_state["estimate_bytes"] = mem["peak_bytes"]
        e1, e2, e3 = st.columns(3)
        e1.metric("Predicted peak device memory", ui.fmt_bytes(mem["peak_bytes"]),
                  help="estimate.estimate_memory: the pipeline's own byte formulas, phase by phase")
        e2.metric("Whole model (weights)", ui.fmt_bytes(mem["model_weight_bytes"]))
        e3.metric("Predicted time (rough estimate)", ui.fmt_seconds(secs["total_s"]), help=secs["note"])
        st.caption(f"Peak phase: {max(mem['phases'], key=mem['phases'].get)}; host memory for activations "
                   f"{ui.fmt_bytes(mem['host_activation_bytes'])}. Time: {secs['note']} "
                   f"({secs['fp32_flops'] / 1e9:.0f} GFLOP/s fp32 measured on {dev}).")
    except Exception as exc:  # noqa: BLE001 - no estimate is not an error of the run
        st.info(f"No estimate for this model: {exc}")

# --- run ----------------------------------------------------------------------------------------
runner = ui.runner()
if st.button("Run", type="primary", key="run", disabled=cfg is None):
    try:
        loaded = ui.model(cfg.model)
        job = runner.submit_prune(cfg, loaded, ui.store())
        job.config["memory_kind"] = "measured-cuda" if dev.startswith("cuda") else "accounted-cpu"
        st.session_state["job_id"] = job.job_id
    except Exception as exc:  # noqa: BLE001 - unknown model, busy worker, ...: the message, not a traceback
        ui.show_error(exc)

job = runner.current()


@st.fragment(run_every=2.0 if job is not None and job.active else None)
def progress_panel() -> None:
    job = runner.current()
    if job is None or job.kind != "prune":
        return
    if job.active:
        frac, where = job.progress()
        st.progress(frac, text=f"{job.label}: {where} · {job.elapsed_s:.0f} s")
        pts = pd.DataFrame(job.memory_points())
        if not pts.empty:  # at layer boundaries the pipeline holds nothing: plot the peak so far
            fig = plots.memory_timeline_figure(pts[["t", "peak_mib", "label"]].rename(columns={"peak_mib": "mib"}),
                                               job.config.get("memory_kind", ""), st.session_state.get("estimate_bytes"),
                                               title="Peak device memory so far (live, per layer)")
            st.plotly_chart(fig, key="live_memory")
        st.button("Cancel", key="cancel", on_click=runner.cancel)
        return
    if st.session_state.get("seen_job") != job.job_id:  # it just ended: redraw the whole page
        st.session_state["seen_job"] = job.job_id
        if job.status == "finished":
            st.session_state["show_run"] = job.job_id
        st.rerun()
    if job.status == "failed":
        ui.show_error(Exception(job.error), "The run failed")
    elif job.status == "cancelled":
        st.warning(f"The run was cancelled after {job.elapsed_s:.0f} s; nothing was stored but the cancellation.")


progress_panel()

# --- results ------------------------------------------------------------------------------------
st.subheader("Results")
store = ui.store()
finished = store.runs(status="finished")
if not finished:
    st.info("No finished run yet. Runs are stored and can be reopened here after a restart.")
    st.stop()
ids = [r["run_id"] for r in finished]
shown = st.session_state.get("show_run")
sel = st.selectbox("Show run", ids, index=ids.index(shown) if shown in ids else 0, key="result_run",
                   format_func=lambda i: ui.run_label(next(r for r in finished if r["run_id"] == i)))
rec = store.get(sel)["record"]
live = runner.get(sel)
result = live.result if live is not None and live.status == "finished" else None

sp, pp = rec["sparsity"], rec["params"]
m1, m2, m3, m4, m5 = st.columns(5)
ppl = reports.ppl_frame(rec)
first = ppl[ppl["model"] == "pruned"].iloc[0] if (ppl["model"] == "pruned").any() else None
if first is not None:
    dense_v = ppl[(ppl["model"] == "dense") & (ppl["corpus"] == first["corpus"])]["value"]
    m1.metric(f"Perplexity, {first['label']}", f"{first['value']:.4g}",
              delta=f"{first['value'] - dense_v.iloc[0]:+.4g} vs dense" if len(dense_v) else None, delta_color="inverse")
m2.metric("Pruned (of prunable)", f"{sp['achieved_prunable']:.1%}",
          delta=f"{sp['achieved_total']:.1%} of all parameters", delta_color="off",
          help=f"target {sp['target']:.0%} of the prunable parameters (heads + channels)")
m3.metric("Parameters", f"{pp['after']['total'] / 1e6:.1f} M", delta=f"{(pp['after']['total'] - pp['before']['total']) / 1e6:.1f} M")
m4.metric("Peak device memory", ui.fmt_bytes(rec["memory"]["peak_bytes"]), help=rec["memory"]["kind"])
m5.metric("Wall time", ui.fmt_seconds(rec["timing"]["total_s"]))
st.caption(f"{rec['model']['description']} · {rec['method']} · allocation {rec.get('allocation_scheme')} · "
           f"device {rec['device']} · {rec['dtype']} · run {rec['run_id']}")

alloc = reports.allocation_frame(rec)
st.plotly_chart(plots.allocation_figure(alloc, sp["target"]), key="allocation_chart")
r1, r2 = st.columns(2)
with r1:
    if not ppl.empty:
        fig = plots.ppl_figure(ppl)
        st.plotly_chart(fig, key="ppl_chart")
        st.caption(fig.layout.meta["caption"].replace("<br>", "; "))
with r2:
    st.plotly_chart(plots.params_figure(reports.params_frame(rec)), key="params_chart")
r3, r4 = st.columns(2)
with r3:
    if alloc["energy"].notna().all():
        t = rec["config"]["temperature"]
        st.plotly_chart(plots.energy_figure(alloc, float(t), rec["config"]["energy"]), key="energy_chart")
    else:
        st.info("This allocation used no module energies; the Allocation explorer shows them for any temperature.")
with r4:
    tl = reports.timeline_frame(rec)
    st.plotly_chart(plots.memory_timeline_figure(tl, rec["memory"]["kind"]), key="memory_chart")
admm = reports.admm_frame(rec)
if not admm.empty:
    st.plotly_chart(plots.admm_trace_figure(admm), key="admm_chart")
refit = reports.refit_frame(rec)
if not refit.empty:
    st.plotly_chart(plots.refit_error_figure(refit), key="refit_chart")

st.subheader("Dense vs pruned text")
if result is None:
    st.caption("The pruned weights stay in memory only for runs of this app process; re-run to generate or download.")
elif result.tokenizer is None:
    st.caption("Tiny demo models have no tokenizer: no text to show.")
else:
    prompt = st.text_input("Prompt", DEFAULT_PROMPT, key="prompt")
    if st.button("Generate 30 tokens (greedy)", key="generate"):
        with st.spinner("Generating..."):
            st.session_state["generated"] = (sel, prompt, greedy_generate(ui.model(rec["model"]["name"]).model,
                                                                         result.tokenizer, prompt),
                                             greedy_generate(result.model, result.tokenizer, prompt))
    gen = st.session_state.get("generated")
    if gen and gen[0] == sel:
        g1, g2 = st.columns(2)
        g1.markdown(f"**Dense**\n\n> {md(gen[1])} **{md(gen[2].strip())}**")
        g2.markdown(f"**Pruned ({sp['achieved_prunable']:.0%})**\n\n> {md(gen[1])} **{md(gen[3].strip())}**")

st.subheader("Downloads")
d1, d2, d3 = st.columns(3)
d1.download_button("Run record (JSON)", json.dumps(rec, indent=1), f"{sel}.json", "application/json", key="dl_json")
d2.download_button("Allocation (CSV)", alloc.to_csv(index=False), f"{sel}-allocation.csv", "text/csv", key="dl_csv")
if result is not None:
    if d3.button("Prepare the pruned model (zip)", key="zip"):
        from structprune.jobs import export_checkpoint_zip

        with st.spinner("Saving the pruned checkpoint..."):
            st.session_state["zip_path"] = (sel, str(export_checkpoint_zip(result, store.folder / "checkpoints")))
    z = st.session_state.get("zip_path")
    if z and z[0] == sel:
        with open(z[1], "rb") as fh:
            d3.download_button("Download the pruned model", fh, f"structprune-{sel}.zip", "application/zip",
                               key="dl_zip")
