"""StructPrune Explorer: `make app`, or `streamlit run app.py` from the repository root (it listens on
127.0.0.1 only: .streamlit/config.toml; docs/SECURITY.md says how to expose it deliberately).

The pages are in pages/; they call the structprune library and draw its results.
"""

from __future__ import annotations

import logging

import streamlit as st

from pages import _ui as ui
from structprune.paths import data_dir

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
st.set_page_config(page_title="StructPrune Explorer", page_icon=":material/content_cut:", layout="wide")

ui.keep_widget_values()
with st.sidebar:
    st.text_input("Data folder (run store)", value=str(data_dir()), key="data_dir",
                  help="Where the SQLite run store lives (STRUCTPRUNE_DATA sets the default). Runs are kept across "
                       "restarts; change it to keep separate collections.")
    try:
        store = ui.store()
        runs = store.runs()
        st.caption(f"{len(runs)} stored runs in `{store.path}`")
        if store.recovered:
            st.caption(f"{len(store.recovered)} interrupted run(s) were marked failed on opening.")
    except Exception as exc:  # noqa: BLE001 - an unusable folder: say so and wait for another
        ui.show_error(exc, "cannot open the run store in that folder; choose another")
        st.stop()

# The pages, listed here (st.navigation: nothing in pages/ is a page unless it is named here). The
# pages/_*.py modules are the pieces the pages share (widgets, the live job progress, the Prune page's
# sections), not pages.
pages = [
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:", default=True),
    st.Page("pages/explorer.py", title="Allocation explorer", icon=":material/tune:"),
    st.Page("pages/compare.py", title="Compare runs", icon=":material/compare_arrows:"),
    st.Page("pages/memory.py", title="Memory", icon=":material/memory:"),
    st.Page("pages/method.py", title="Method", icon=":material/functions:"),
]
st.navigation(pages).run()
