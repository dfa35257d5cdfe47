"""Allocation explorer: how the budget moves across layers as the temperature changes, redrawn from
cached pass-1 energies without touching the model."""

from __future__ import annotations

import math
import time

import streamlit as st

from pages import _ui as ui
from pages._progress import job_progress
from structprune import plots
from structprune.config import PruneConfig
from structprune.demo import demo_entries
from structprune.errors import StructPruneError
from structprune.explorer import (EnergyProfile, entropy_frame, scheme_frame, softmax_frame,
                                  temperature_grid, temperature_ladder)
from structprune.planning import available_models

LADDER = [float(t) for t in temperature_ladder()]


@st.cache_resource(show_spinner=False, max_entries=8)
def load_profile(folder: str, key: str) -> EnergyProfile | None:
    """A stored (else a shipped demo) profile, kept in memory (with its energies memo) for instant redraws."""
    data = ui.store().cache_get(key) or demo_entries("profile").get(key)
    return EnergyProfile.from_dict(data) if data else None


def profile_label(key: str) -> str:
    parts = key.split("|")  # profile|model|calib|NxS|seed|s|sens|...
    sens = f"sensitivities at {parts[5]}" if parts[6].startswith("sens") else f"{parts[5]}, no sensitivities"
    demo = " · shipped demo" if key in demo_entries("profile") and not ui.store().cache_get(key) else ""
    return f"{parts[1]} · {parts[2]} {parts[3]} · {parts[4]} · {sens}{demo}"


st.title("Allocation explorer")
st.caption("Pass 1 of the engine measures every module's energy once; every chart here is recomputed from those "
           "numbers alone (no model run), so moving the temperature redraws in milliseconds.")

store, runner = ui.store(), ui.runner()
keys = list(dict.fromkeys(store.cache_keys("profile|") + list(demo_entries("profile"))))  # computed ones first

with st.expander("Compute an energy profile of another model or calibration", expanded=not keys):
    models = available_models()
    ui.init({"ex_model": ui.default("model") if ui.default("model") in models else models[0],
             "ex_nsamples": 8, "ex_seqlen": 256, "ex_s": ui.default("sparsity")})
    p1, p2, p3, p4 = st.columns(4)
    p1.selectbox("Model", models, key="ex_model", help=ui.tip("model"))
    ui.number(p2, "Calibration windows", "nsamples", "ex_nsamples")
    ui.number(p3, "Tokens per window", "seqlen", "ex_seqlen")
    ui.number(p4, "Sparsity for the sensitivities", "sparsity", "ex_s", positive=True)
    st.caption("Every structprune run on the Prune page stores its pass-1 profile here too; it has measured "
               "sensitivities when the run used the sensitivity energy. This pass always measures them.")
    if st.button("Compute (pass 1 in the background)", key="ex_compute"):
        try:
            s = st.session_state
            cfg = PruneConfig(model=s.ex_model, nsamples=s.ex_nsamples, seqlen=s.ex_seqlen, sparsity=s.ex_s,
                              sensitivity_windows=min(ui.default("sensitivity_windows"), s.ex_nsamples))
            runner.submit_profile(cfg, None, store)
        except Exception as exc:  # noqa: BLE001
            ui.show_error(exc)

job_progress("profile", "ex_seen", "The energy pass failed", cancel_key="ex_cancel")

if not keys:
    st.info("No energy profile yet: compute one above, or run structprune on the Prune page.")
    st.stop()

key = st.selectbox("Energy profile", keys, format_func=profile_label, key="ex_profile")
profile = load_profile(str(store.folder), key)
c1, c2, c3 = st.columns(3)
energy = c1.radio("Energy", profile.energy_kinds, key="ex_energy", horizontal=True, help=ui.tip("energy"))
s = ui.number(c2, "Sparsity target", "sparsity", "ex_target", value=float(profile.sparsity), positive=True)
owl_lambda = ui.number(c3, "OWL lambda", "owl_lambda", "ex_owl", value=ui.default("owl_lambda"))
if energy == "sensitivity" and not math.isclose(s, profile.sparsity):
    st.caption(f"Sensitivities were measured at s = {profile.sparsity:g}; they rank the modules at other targets too.")


@st.fragment
def temperature_view() -> None:
    """The slider and everything that depends on T: the only part that reruns when T moves."""
    t_value = st.select_slider("Temperature T", LADDER + [math.inf], value=1.0, key="ex_T",
                               format_func=lambda t: "inf (uniform)" if math.isinf(t) else f"{t:g}",
                               help=ui.tip("temperature"))
    t0 = time.perf_counter()
    try:
        soft = softmax_frame(profile, s, t_value, energy)
        schemes = scheme_frame(profile, s, t_value, energy, owl_lambda=owl_lambda)
    except StructPruneError as exc:  # e.g. a target these modules cannot reach under s_max
        ui.show_error(exc)
        return
    fig_e = plots.energy_figure(soft, t_value, energy)
    fig_s = plots.schemes_figure(schemes, s)
    ms = 1000 * (time.perf_counter() - t0)
    st.session_state["ex_redraw_ms"] = ms
    cols = st.columns(5)
    for col, (_, row) in zip(cols, schemes.drop_duplicates("scheme").iterrows()):
        col.metric(f"{row['scheme']}: entropy (nats)", f"{row['entropy']:.3f}",
                   help="of where the pruned parameters sit; uniform is the maximum")
    cols[4].caption(f"Redrawn in {ms:.0f} ms (allocations + figures, no model run).")
    a, b = st.columns(2)
    a.plotly_chart(fig_e, key="ex_energy_chart")
    b.plotly_chart(fig_s, key="ex_schemes_chart")


temperature_view()

try:
    entropy, grid = entropy_frame(profile, s, LADDER, energy), temperature_grid(profile, s, LADDER, energy)
except StructPruneError:  # shown above
    st.stop()
st.plotly_chart(plots.entropy_figure(entropy), key="ex_entropy_chart")
st.plotly_chart(plots.temperature_heatmap(grid), key="ex_heatmap")
st.caption(f"{profile.model}: {profile.n_layers} layers; calibration {profile.calibration}. T -> 0 prunes the "
           "lowest-energy modules first (up to the cap); T -> inf is uniform. Continuous allocation, before rounding "
           "to whole heads and channels.")
