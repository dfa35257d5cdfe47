"""The Prune page's "Before running": predicted peak device memory and time for the settings.

Not a page (a leading underscore; st.navigation in app.py lists the pages).
"""

from __future__ import annotations

import streamlit as st

from pages import _ui as ui
from structprune.config import PruneConfig
from structprune.evaluation import resolve_device
from structprune.errors import StructPruneError
from structprune.planning import calibration_warning, estimate_run


def before_running(cfg: PruneConfig | None, config_error: Exception | None) -> str:
    """The settings' error, or the estimates (planning.estimate_run). Returns the device the run will
    use ("cpu" when unknown)."""
    st.subheader("Before running")
    if config_error is not None:
        ui.show_error(config_error)
        return "cpu"
    if not cfg.model:
        return "cpu"
    warning = calibration_warning(cfg)
    if warning:
        st.warning(warning, icon=":material/warning:")
    dev = "cpu"
    try:
        dev = str(resolve_device(cfg.device))
        # the run's job loads the model first unless this process already holds it
        est = estimate_run(ui.model_config(cfg.model), cfg, loads_model=not ui.runner().models.cached(cfg.model))
    except Exception as exc:  # noqa: BLE001 - no estimate is not an error of the run
        # the library's one line; a hub library's multi-line error is cut to its first line
        msg = str(exc) if isinstance(exc, StructPruneError) else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        st.info(f"No estimate for this model: {msg}")
        return dev
    mem, secs = est["memory"], est["seconds"]
    load_s = secs["phases"].get("load")
    st.session_state["estimate_bytes"] = mem["peak_bytes"]
    e1, e2, e3, e4 = st.columns(4)
    e1.metric("Predicted peak device memory", ui.fmt_bytes(mem["peak_bytes"]),
              help="estimate.estimate_memory: the pipeline's own byte formulas, phase by phase")
    e2.metric("Predicted peak host memory", ui.fmt_bytes(mem["host_peak_bytes"] + mem["host_process_bytes"]),
              help=host_help(mem))
    e3.metric("Whole model (weights)", ui.fmt_bytes(mem["model_weight_bytes"]))
    e4.metric("Predicted time (rough estimate)", ui.fmt_seconds(secs["total_s"]), help=secs["note"] + (
        f" Includes {ui.fmt_seconds(load_s)} to load the model, once per app process." if load_s else ""))
    where = ("streamed from disk, a layer at a time" if mem["weights"] == "disk"
             else "all in host memory (the loaded model and the run's copy)")
    st.caption(f"Peak phase: {est['peak_phase']}. Weights: {where}. Time: {secs['note']} "
               f"({est['fp32_gflops']:.0f} GFLOP/s fp32 measured on {est['device']}).")
    return est["device"]


HOST_TERMS = {"activations": "calibration activations", "weights": "weights", "device_working_set":
              "the CPU's working set (it is the device)", "grams": "one layer's Grams awaiting their solves"}


def host_help(mem: dict) -> str:
    """The host estimate's terms, for the metric's tooltip."""
    terms = "; ".join(f"{HOST_TERMS[k]} {ui.fmt_bytes(v)}" for k, v in mem["host_terms"].items())
    return (f"{terms}; Python, torch and transformers {ui.fmt_bytes(mem['host_process_bytes'])} "
            "(estimate.estimate_memory; measured against benchmarks/results/scale)")
