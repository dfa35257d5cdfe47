"""What every page shares: the run store, the background worker, the cached models, errors.

Not a page (st.navigation in app.py lists the pages). Only Streamlit glue: the work is in the
structprune package.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import streamlit as st

from structprune.config import PruneConfig, bounds_for, choices_for, config_field, help_for, range_text
from structprune.paths import data_dir

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
DEFAULTS = {f.name: f.default for f in fields(PruneConfig)}


def init(values: dict) -> None:
    """Initial widget values (set once per session, before the widgets: no `value=` arguments, so
    Streamlit never sees two sources for one widget)."""
    for key, value in values.items():
        st.session_state.setdefault(key, value)
    PERSISTENT_KEYS.update(values)


PERSISTENT_KEYS: set[str] = set()  # widget keys whose values survive a switch to another page


def keep_widget_values() -> None:
    """Called by app.py on every run: re-assigning a widget's value makes it session state, which
    Streamlit keeps while the widget's page is not shown (its documented multipage pattern)."""
    for key in PERSISTENT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def default(name: str):
    """A run setting's default, from PruneConfig (the one source of truth)."""
    return DEFAULTS[name]


def tip(name: str, extra: str = "") -> str:
    """A setting's help from PruneConfig, with its allowed range."""
    rng = range_text(name)
    return help_for(name) + extra + (f" ({rng})" if rng else "")


def options(name: str) -> list[str]:
    return list(choices_for(name) or [])


def number_bounds(name: str, positive: bool = False) -> dict:
    """number_input's min_value / max_value / step for a setting, from its PruneConfig bounds (an open
    lower bound offers its `smallest` value; `positive`: a lower bound of 0 becomes one step, for the
    views where 0 has nothing to show, e.g. a sparsity to analyse)."""
    b = bounds_for(name)
    low = b.get("min", b.get("smallest"))
    if positive and low == 0:
        low = b["step"]
    return {"min_value": low, "max_value": b.get("max"), "step": b.get("step")}


def number(container, label: str, name: str, key: str, positive: bool = False, **kw):
    """A number input for a PruneConfig setting: its bounds, step and help (kw overrides)."""
    return container.number_input(label, **{**number_bounds(name, positive), "help": tip(name), **kw}, key=key)


def setting(container, label: str, name: str, key: str | None = None, **kw):
    """The widget a PruneConfig setting calls for: a select box for choices, a checkbox for a switch,
    a number input (bounded) for a number, a text input otherwise. Its key is the setting's name."""
    key = key or name
    if choices_for(name):
        return container.selectbox(label, options(name), key=key, **{"help": tip(name), **kw})
    kind = config_field(name).type
    if kind == "bool":
        return container.checkbox(label, key=key, **{"help": tip(name), **kw})
    if kind in ("int", "float", "int | None"):
        return number(container, label, name, key, **kw)
    return container.text_input(label, key=key, **{"help": tip(name), **kw})


@st.cache_resource(show_spinner=False)
def _store(folder: str):
    from structprune.store import RunStore

    return RunStore(folder)


def store():
    """The run store in the data folder chosen in the sidebar (opened once per folder)."""
    return _store(st.session_state.get("data_dir") or str(data_dir()))


@st.cache_resource(show_spinner=False)
def runner():
    """The process-wide background worker (one job at a time, shared by every session)."""
    from structprune.jobs import JobRunner

    return JobRunner()


def model(name: str):
    """A loaded model, shared with the background jobs (the runner's cache) and never mutated (runs
    prune a deep copy). Jobs load their model themselves; this is for the page's own quick uses."""
    models = runner().models
    if models.cached(name):
        return models.get(name)
    with st.spinner("Loading the model (once per app process)..."):
        return models.get(name)


@st.cache_resource(show_spinner=False)
def model_config(name: str):
    """The model's config (shapes only) for the estimates; built-in, tiny, folder or preset."""
    from structprune.estimate import load_config

    return load_config(name.strip())


def show_error(exc: BaseException, what: str = "") -> None:
    """The library's message (it says what to do), never a traceback."""
    msg = str(exc) or type(exc).__name__
    st.error(f"{what}: {msg}" if what else msg, icon=":material/error:")


def fmt_bytes(n: float | None) -> str:
    from structprune.reports import format_bytes

    return format_bytes(n)


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def delete_run(run_id: str, key: str, what: str = "this run") -> None:
    """A popover that deletes a stored run and the files it owns (store.RunStore.delete), once the
    user ticked that they are sure; the page then shows the next run and says what was freed.
    (A popover, not an expander: it also sits inside the Resume expander, and expanders don't nest.)"""
    runs = store()
    size = runs.owned_bytes(run_id)
    with st.popover(f"Delete {what}", icon=":material/delete:"):
        files = f" and its {fmt_bytes(size)} of files (pruned layers, model zip)" if size else ""
        st.caption(f"Removes run {run_id}'s record{files} from {runs.folder}. This cannot be undone; "
                   "download what you want to keep first.")
        sure = st.checkbox("Yes, delete this run", key=f"{key}_sure")
        if st.button("Delete", key=key, disabled=not sure, icon=":material/delete:"):
            try:
                freed = runs.delete(run_id)
            except Exception as exc:  # noqa: BLE001 - a running run, a vanished id: the library's message
                show_error(exc)
                return
            freed_note = f", {fmt_bytes(freed)} freed." if freed else "."
            st.session_state["deleted_note"] = f"Deleted run {run_id}{freed_note}"
            st.session_state.pop(f"{key}_sure", None)
            st.rerun()


def deleted_note() -> None:
    """Says what the last delete removed (once, after the page reran)."""
    note = st.session_state.pop("deleted_note", None)
    if note:
        st.success(note, icon=":material/delete:")


def run_label(summary: dict) -> str:
    """One line for a stored run in a select box."""
    sp = summary.get("sparsity")
    sp = f"{sp:.0%}" if isinstance(sp, (int, float)) else "?"
    return (f"{summary['created'][:16].replace('T', ' ')} · {summary.get('model')} · {summary.get('method')} · "
            f"{summary.get('allocation')} · {sp} · {summary['status']} · {summary['run_id']}")
