"""The Prune page's offer to resume an interrupted run whose weights streamed from disk (resume.py).

Not a page (a leading underscore; st.navigation in app.py lists the pages).
"""

from __future__ import annotations

import streamlit as st

from pages import _ui as ui
from structprune.resume import resumable_runs


def offer(runner) -> None:
    """Failed or cancelled runs of the store whose finished layers are kept, and a Resume button."""
    runs = resumable_runs(ui.store())
    if not runs:
        return
    with st.expander(f"Resume an interrupted run ({len(runs)})", icon=":material/restart_alt:"):
        st.caption("A run whose weights stream from disk keeps every layer it finished. Resuming continues after the "
                   "last one with the run's own settings (pass 1 is not repeated) and gives the same pruned model as "
                   "an uninterrupted run.")
        by_id = {r["run_id"]: r for r in runs}
        chosen = st.selectbox("Interrupted run", list(by_id), key="resume_run", format_func=lambda i: (
            f"{ui.run_label(by_id[i])} · {by_id[i]['finished_layers']}/{by_id[i]['n_layers']} layers pruned"))
        pick = by_id[chosen]
        if pick.get("error"):
            st.caption(f"It stopped because: {pick['error']}")
        if st.button("Resume", key="resume", disabled=runner.busy):
            try:
                job = runner.submit_resume(pick["folder"], ui.store())
                st.session_state["job_id"] = job.job_id
            except Exception as exc:  # noqa: BLE001 - a finished run, a model that changed: the library's message
                ui.show_error(exc)
        ui.delete_run(chosen, "delete_interrupted", "this interrupted run and its layers")
