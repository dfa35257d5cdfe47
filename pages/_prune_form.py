"""The Prune page's settings: one widget per PruneConfig field, keyed by the field's name, its bounds,
choices, help and initial value from PruneConfig (the one source of truth); only the labels and the
layout live here.

Not a page (a leading underscore; st.navigation in app.py lists the pages).
"""

from __future__ import annotations

import math

import streamlit as st

from pages import _ui as ui
from structprune.config import PruneConfig
from structprune.planning import available_models, detect_devices, device_choices, form_config

OTHER = "local folder or hub id..."
FILE = "a local file..."
QUICK = {"nsamples": 8, "seqlen": 256, "eval_windows": 8, "sensitivity_windows": 4}

LABELS = {
    "model": "Model", "device": "Device",
    "sparsity": "Sparsity target (share of prunable parameters)", "method": "Method",
    "allocation": "Allocation across layers", "temperature": "Temperature T", "energy": "Energy",
    "nsamples": "Calibration windows", "seqlen": "Tokens per window (seqlen)", "calib_data": "Calibration corpus",
    "eval_data": "Evaluation corpora", "eval_windows": "Evaluation windows per corpus (0 = all)",
    "selector": "Unit selector", "saliency": "Saliency", "target": "Reconstruction target",
    "owl_lambda": "OWL lambda", "owl_m": "OWL outlier threshold M",
    "relative_error": "Relative reconstruction error", "refit": "Least-squares refit", "bias": "Bias compensation",
    "damp": "Damping", "s_max": "Largest module sparsity",
    "refine_epochs": "Block refit epochs (0 = off)", "refine_lr": "Block refit learning rate",
    "refine_schedule": "Block refit schedule", "sensitivity_windows": "Sensitivity windows", "seed": "Seed",
    "dtype": "dtype", "batch_size": "Batch size", "weights": "Weights between uses", "align_channels": "Align MLP widths to",
}
# the form's columns, top to bottom: every PruneConfig field appears once (tests/test_app.py checks)
MAIN = (("model", "device", "weights"), ("sparsity", "method", "allocation", "temperature", "energy"),
        ("nsamples", "seqlen", "calib_data", "eval_data", "eval_windows"))
ADVANCED = (("selector", "saliency", "target", "owl_lambda", "owl_m"),
            ("relative_error", "refit", "bias", "damp", "s_max", "align_channels"),
            ("refine_epochs", "refine_lr", "refine_schedule", "sensitivity_windows", "seed", "dtype", "batch_size"))
FORMATS = {"temperature": "%.3g", "damp": "%.4g", "refine_lr": "%.2g", "owl_lambda": "%.3g", "owl_m": "%.3g"}


@st.cache_data(show_spinner=False)
def corpora() -> dict[str, str]:
    from structprune.data.corpora import corpus_catalog

    return {c.name: f"{c.name}: {c.label}" + ("" if c.installed else f" ({c.note})") for c in corpus_catalog()}


def _quick_settings() -> None:
    for key, value in QUICK.items():
        st.session_state[key] = value


def _init() -> None:
    models = available_models()
    values = {name: ui.default(name) for name in LABELS if name != "model"}
    ui.init({**values, "model_choice": ui.default("model") if ui.default("model") in models else models[0],
             "model_other": "", "calib_path": "", "temperature_inf": math.isinf(ui.default("temperature")),
             "temperature": 1.0 if math.isinf(ui.default("temperature")) else ui.default("temperature"),
             "eval_data": list(ui.default("eval_data")), "eval_windows": ui.default("eval_windows") or 0})


def _model(col) -> None:
    choice = col.selectbox(LABELS["model"], available_models() + [OTHER], key="model_choice", help=ui.tip("model"))
    if choice == OTHER:
        col.text_input("Folder or hub id", key="model_other", placeholder="/path/to/hf-model or org/name")


def _device(col) -> None:
    col.selectbox(LABELS["device"], device_choices(), key="device", help=ui.tip("device"))
    col.caption("Detected: " + "; ".join(d["label"] for d in detect_devices()))


def _temperature(col) -> None:
    tc1, tc2 = col.columns([2, 1])
    ui.setting(tc1, LABELS["temperature"], "temperature", format=FORMATS["temperature"])
    tc2.checkbox("T = inf", key="temperature_inf", help="uniform allocation (the softmax's infinite-T limit)")


def _calib_data(col) -> None:
    cat = corpora()
    col.selectbox(LABELS["calib_data"], list(cat) + [FILE], key="calib_data", help=ui.tip("calib_data"),
                  format_func=lambda c: c if c == FILE else cat[c] + " (calibration split)")
    if st.session_state["calib_data"] == FILE:
        col.text_input("Corpus file (.txt or .parquet; its second half calibrates)", key="calib_path")


def _eval_data(col) -> None:
    cat = corpora()
    col.multiselect(LABELS["eval_data"], list(cat), key="eval_data", format_func=cat.get, help=ui.tip("eval_data"))


def _eval_windows(col) -> None:  # 0 stands for None (all windows)
    ui.number(col, LABELS["eval_windows"], "eval_windows", "eval_windows", min_value=0)
    col.button("Quick preview settings", on_click=_quick_settings, key="quick",
               help="8 calibration windows of 256 tokens, 8 evaluation windows: minutes on a laptop CPU")


SPECIAL = {"model": _model, "device": _device, "temperature": _temperature, "calib_data": _calib_data,
           "eval_data": _eval_data, "eval_windows": _eval_windows}
EXTRA_HELP = {"sensitivity_windows": " (at most the calibration windows: larger values use all)"}


def _column(col, names) -> None:
    for name in names:
        if name in SPECIAL:
            SPECIAL[name](col)
        else:
            kw = {"format": FORMATS[name]} if name in FORMATS else {}
            if name in EXTRA_HELP:
                kw["help"] = ui.tip(name, EXTRA_HELP[name])
            ui.setting(col, LABELS[name], name, **kw)


def settings_form() -> None:
    """The settings, in three columns and an Advanced expander."""
    _init()
    for col, names in zip(st.columns(len(MAIN)), MAIN):
        with col:
            _column(col, names)
    with st.expander("Advanced"):
        for col, names in zip(st.columns(len(ADVANCED)), ADVANCED):
            _column(col, names)


def model_name() -> str:
    s = st.session_state
    return s.get("model_other", "") if s["model_choice"] == OTHER else s["model_choice"]


def current_config() -> PruneConfig:
    """The settings above as a PruneConfig (raises InvalidConfigError with the library's message)."""
    s = st.session_state
    values = {name: s[name] for name in LABELS if name != "model"}
    if values["calib_data"] == FILE:
        values["calib_data"] = s.get("calib_path", "").strip()
    return form_config({**values, "model": model_name()}, temperature_inf=s["temperature_inf"])
