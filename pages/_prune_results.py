"""The Prune page's results: a stored run's headline numbers, its charts, dense vs pruned text and the
downloads.

Not a page (a leading underscore; st.navigation in app.py lists the pages).
"""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from pages import _ui as ui
from structprune import plots, reports
from structprune.generation import DEFAULT_PROMPT, greedy_generate
from structprune.planning import run_headline


def md(text: str) -> str:
    """Model output shown literally inside markdown."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in text).replace("\n", " ")


def choose_run() -> tuple[str, dict] | None:
    """The finished run to show (the one that just finished, else the newest): its id and record."""
    st.subheader("Results")
    ui.deleted_note()
    finished = ui.store().runs(status="finished")
    if not finished:
        st.info("No finished run yet. Runs are stored and can be reopened here after a restart.")
        return None
    ids = [r["run_id"] for r in finished]
    # a run that just finished replaces the selection (a widget's own state would keep the older one)
    shown = st.session_state.pop("show_run", None)
    if shown in ids or st.session_state.get("result_run") not in ids:
        st.session_state["result_run"] = shown if shown in ids else ids[0]
    sel = st.selectbox("Show run", ids, key="result_run",
                       format_func=lambda i: ui.run_label(next(r for r in finished if r["run_id"] == i)))
    return sel, ui.store().get(sel)["record"]


def headline(rec: dict) -> None:
    sp, head = rec["sparsity"], run_headline(rec)
    m1, m2, m3, m4, m5 = st.columns(5)
    if head["ppl"] is not None:
        delta = f"{head['ppl_delta']:+.4g} vs dense" if head["ppl_delta"] is not None else None
        m1.metric(f"Perplexity, {head['ppl_label']}", f"{head['ppl']:.4g}", delta=delta, delta_color="inverse")
    m2.metric("Pruned (of prunable)", f"{sp['achieved_prunable']:.1%}",
              delta=f"{sp['achieved_total']:.1%} of all parameters", delta_color="off",
              help=f"target {sp['target']:.0%} of the prunable parameters (heads + channels)")
    # fewer parameters is what pruning is for: the reduction is shown green ("inverse"), not as a loss
    m3.metric("Parameters", f"{head['params_after_m']:.1f} M", delta=f"{head['params_delta_m']:.1f} M",
              delta_color="inverse")
    m4.metric("Peak device memory", ui.fmt_bytes(rec["memory"]["peak_bytes"]), help=rec["memory"]["kind"])
    m5.metric("Wall time", ui.fmt_seconds(rec["timing"]["total_s"]))
    st.caption(f"{rec['model']['description']} · {rec['method']} · allocation {rec.get('allocation_scheme')} · "
               f"device {rec['device']} · {rec['dtype']} · run {rec['run_id']}")


def speed_and_size(rec: dict) -> None:
    """The pruned model's size and its speed against dense, measured on the run's device after the run."""
    speed = rec.get("speed") or {}
    if "speedup" not in speed:
        st.caption("Speed against dense: " + (speed.get("skipped") or "not measured for this run (runs started in "
                   "the app measure it; on the command line, `structprune prune --speed`)."))
        return
    s1, s2, s3 = st.columns(3)
    s1.metric(f"Size ({speed['dtype']})", ui.fmt_bytes(speed["size"]["bytes"]),
              delta=f"{speed['size']['ratio']:.2f}x of dense", delta_color="off")
    for col, (shape, x) in zip((s2, s3), speed["speedup"].items()):
        col.metric(f"Speed vs dense, {shape}", f"{x:.2f}x", delta="faster" if x > 1 else "slower",
                   delta_color="normal" if x > 1 else "inverse")
    st.caption(f"Measured on {speed['device']} after the run: {speed['protocol']}. Load average at the time "
               f"{speed['loadavg'][0]:.1f} on {speed['cpu_count']} cores.")


def charts(rec: dict) -> None:
    alloc, ppl = reports.allocation_frame(rec), reports.ppl_frame(rec)
    st.plotly_chart(plots.allocation_figure(alloc, rec["sparsity"]["target"]), key="allocation_chart")
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
        st.plotly_chart(plots.memory_timeline_figure(reports.timeline_frame(rec), rec["memory"]["kind"]),
                        key="memory_chart")
    admm = reports.admm_frame(rec)
    if not admm.empty:
        st.plotly_chart(plots.admm_trace_figure(admm), key="admm_chart")
    refit = reports.refit_frame(rec)
    if not refit.empty:
        st.plotly_chart(plots.refit_error_figure(refit), key="refit_chart")


def dense_vs_pruned_text(sel: str, rec: dict, result) -> None:
    """Greedy continuations of one prompt by the dense and the pruned model (this process's runs)."""
    st.subheader("Dense vs pruned text")
    if result is None:
        st.caption("The pruned weights stay in memory only for runs of this app process; re-run to generate or "
                   "download.")
        return
    if result.tokenizer is None:
        st.caption("Tiny demo models have no tokenizer: no text to show.")
        return
    prompt = st.text_input("Prompt", DEFAULT_PROMPT, key="prompt")
    if st.button("Generate 30 tokens (greedy)", key="generate"):
        with st.spinner("Generating..."):
            dense = ui.model(rec["model"]["name"]).model
            st.session_state["generated"] = (sel, prompt, greedy_generate(dense, result.tokenizer, prompt),
                                             greedy_generate(result.model, result.tokenizer, prompt))
    gen = st.session_state.get("generated")
    if gen and gen[0] == sel:
        g1, g2 = st.columns(2)
        g1.markdown(f"**Dense**\n\n> {md(gen[1])} **{md(gen[2].strip())}**")
        g2.markdown(f"**Pruned ({rec['sparsity']['achieved_prunable']:.0%})**\n\n> {md(gen[1])} "
                    f"**{md(gen[3].strip())}**")


def downloads(sel: str, rec: dict, result) -> None:
    """The record (JSON), the allocation (CSV) and, for this process's runs, the pruned model (zip)."""
    st.subheader("Downloads")
    d1, d2, d3 = st.columns(3)
    d1.download_button("Run record (JSON)", json.dumps(rec, indent=1), f"{sel}.json", "application/json",
                       key="dl_json")
    d2.download_button("Allocation (CSV)", reports.allocation_frame(rec).to_csv(index=False),
                       f"{sel}-allocation.csv", "text/csv", key="dl_csv")
    if result is None:
        return
    if d3.button("Prepare the pruned model (zip)", key="zip"):
        from structprune.jobs import export_checkpoint_zip

        with st.spinner("Saving the pruned checkpoint..."):
            st.session_state["zip_path"] = (sel, str(export_checkpoint_zip(result, ui.store().checkpoints)))
    z = st.session_state.get("zip_path")
    if z and z[0] == sel and Path(z[1]).is_file():
        with open(z[1], "rb") as fh:
            d3.download_button("Download the pruned model", fh, f"structprune-{sel}.zip", "application/zip",
                               key="dl_zip")
