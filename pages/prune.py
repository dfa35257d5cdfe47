"""Prune: choose a model and settings, see the predicted cost, run in the background, read the results.

The screen, top to bottom; each piece is in a `pages/_prune_*.py` / `pages/_progress.py` module.
"""

from __future__ import annotations

import streamlit as st

from pages import _prune_estimate, _prune_form, _prune_results, _prune_resume
from pages import _ui as ui
from pages._progress import job_progress
from structprune.errors import StructPruneError

st.title("Prune a model")
st.markdown("StructPrune removes whole attention heads and MLP channels from a language model, one decoder layer "
            "on the compute device at a time, and measures what it cost in perplexity. **Where to begin:** press "
            "*Quick preview settings* below and *Run* (a few minutes on a CPU), or look first at what the repository's "
            "own runs already show:")
(l1, l2), (l3, l4) = st.columns(2), st.columns(2)  # two per row: the labels fit unclipped
l1.page_link("pages/explorer.py", label="Allocation explorer: how the budget moves across layers",
             icon=":material/tune:")
l2.page_link("pages/compare.py", label="Compare runs: perplexity vs sparsity per method", icon=":material/compare_arrows:")
l3.page_link("pages/memory.py", label="Memory: what fits on which GPU", icon=":material/memory:")
l4.page_link("pages/method.py", label="Method: one module's solve, step by step", icon=":material/functions:")
st.caption("The built-in models are 4-bit GGUF weights dequantized to fp32, not the original bf16 checkpoints.")

# --- settings -----------------------------------------------------------------------------------
_prune_form.settings_form()
cfg, config_error = None, None
try:
    cfg = _prune_form.current_config()
except (StructPruneError, ValueError) as exc:
    config_error = exc

# --- predicted cost -----------------------------------------------------------------------------
dev = _prune_estimate.before_running(cfg, config_error)

# --- run ----------------------------------------------------------------------------------------
runner = ui.runner()
if st.button("Run", type="primary", key="run", disabled=cfg is None):
    try:
        # the job loads the model (a layer at a time when its weights stay on disk), so Cancel works at once
        job = runner.submit_prune(cfg, None, ui.store())
        job.config["memory_kind"] = "measured-cuda" if dev.startswith("cuda") else "accounted-cpu"
        st.session_state["job_id"] = job.job_id
    except Exception as exc:  # noqa: BLE001 - unknown model, busy worker, ...: the message, not a traceback
        ui.show_error(exc)

_prune_resume.offer(runner)


def show_finished(job) -> None:
    st.session_state["show_run"] = job.job_id


job_progress("prune", "seen_job", "The run failed", cancel_key="cancel", live_memory=True, on_finished=show_finished)

# --- results ------------------------------------------------------------------------------------
chosen = _prune_results.choose_run()
if chosen is None:
    st.stop()
sel, rec = chosen
live = runner.get(sel)
result = live.result if live is not None and live.status == "finished" else None
_prune_results.headline(rec)
_prune_results.speed_and_size(rec)
_prune_results.charts(rec)
_prune_results.dense_vs_pruned_text(sel, rec, result)
_prune_results.downloads(sel, rec, result)
ui.delete_run(sel, "delete_run")
