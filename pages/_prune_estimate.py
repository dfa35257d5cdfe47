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
        est = estimate_run(ui.model_config(cfg.model), cfg)
    except Exception as exc:  # noqa: BLE001 - no estimate is not an error of the run
        # the library's one line; a hub library's multi-line error is cut to its first line
        msg = str(exc) if isinstance(exc, StructPruneError) else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        st.info(f"No estimate for this model: {msg}")
        return dev
    mem, secs = est["memory"], est["seconds"]
    st.session_state["estimate_bytes"] = mem["peak_bytes"]
    e1, e2, e3 = st.columns(3)
    e1.metric("Predicted peak device memory", ui.fmt_bytes(mem["peak_bytes"]),
              help="estimate.estimate_memory: the pipeline's own byte formulas, phase by phase")
    e2.metric("Whole model (weights)", ui.fmt_bytes(mem["model_weight_bytes"]))
    e3.metric("Predicted time (rough estimate)", ui.fmt_seconds(secs["total_s"]), help=secs["note"])
    st.caption(f"Peak phase: {est['peak_phase']}; host memory for activations "
               f"{ui.fmt_bytes(mem['host_activation_bytes'])}. Time: {secs['note']} "
               f"({est['fp32_gflops']:.0f} GFLOP/s fp32 measured on {est['device']}).")
    return est["device"]
