"""The live progress of a background job, drawn the same way on every page that starts one.

Not a page (a leading underscore; st.navigation in app.py lists the pages).
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import streamlit as st

from pages import _ui as ui
from structprune import plots


def job_progress(kind: str, seen_key: str, failed: str, *, cancel_key: str | None = None,
                 live_memory: bool = False, on_finished: Callable | None = None) -> None:
    """The current job of `kind`: while it runs, a progress bar saying which stage runs now, the
    elapsed time and the time left (jobs.Job), the peak-memory chart so far (`live_memory`) and a
    Cancel button (`cancel_key`), then "cancelling" until the worker stops; polled every 2 s. When
    it ends, the whole page reruns once (so it draws the result; `on_finished(job)` runs first for a
    finished job), then a failure shows its error as "`failed`: ...", a cancellation a warning."""
    runner = ui.runner()
    job = runner.current()
    polling = job is not None and job.active and job.kind == kind

    @st.fragment(run_every=2.0 if polling else None)
    def panel() -> None:
        job = runner.current()
        if job is None or job.kind != kind:
            return
        if job.active:
            frac, where = job.progress()
            if job.cancelling:
                st.warning(f"{job.label}: {where} · {job.elapsed_s:.0f} s", icon=":material/hourglass_top:")
            else:
                left = job.remaining_s()
                tail = ("" if left is None else f" · about {ui.fmt_seconds(left)} left" if left >= 1
                        else " · taking longer than estimated")
                st.progress(frac, text=f"{job.label}: {where} · {job.elapsed_s:.0f} s{tail}")
            if cancel_key:
                st.button("Cancelling..." if job.cancelling else "Cancel", key=cancel_key, on_click=runner.cancel,
                          disabled=job.cancelling)
            if live_memory:
                _live_memory(job)
            return
        if st.session_state.get(seen_key) != job.job_id:  # it just ended: redraw the whole page
            st.session_state[seen_key] = job.job_id
            if job.status == "finished" and on_finished is not None:
                on_finished(job)
            st.rerun()
        if job.status == "failed":
            ui.show_error(Exception(job.error), failed)
        elif job.status == "cancelled":
            st.warning(f"{job.label} was cancelled after {job.elapsed_s:.0f} s; nothing was stored but the "
                       "cancellation.")

    panel()


def _live_memory(job) -> None:
    """Peak device memory so far, per layer (at layer boundaries the pipeline holds nothing, so the
    peak, not the current value, is plotted), against the estimate shown before the run."""
    pts = pd.DataFrame(job.memory_points())
    if pts.empty:
        return
    fig = plots.memory_timeline_figure(pts[["t", "peak_mib", "label"]].rename(columns={"peak_mib": "mib"}),
                                       job.config.get("memory_kind", ""), st.session_state.get("estimate_bytes"),
                                       title="Peak device memory so far (live, per layer)")
    st.plotly_chart(fig, key="live_memory")
