"""A new user's whole flow in a real browser (Debian chromium via Playwright for Python).

Start `streamlit run app.py` on a free port, open it, keep the default model (SmolLM2-135M), set 30%
and the softmax allocation, run a small calibration on the CPU, watch the progress, see the
allocation and perplexity charts, move the temperature slider on the explorer, and find the run on
Compare. Screenshots of every page go to test-artifacts/ (and to $STRUCTPRUNE_SCREENSHOTS when set,
e.g. assets/screenshots for the README); timings to test-artifacts/browser-timings.json.

Kept cheap (Advanced settings a user may change too): 2 calibration windows of 128 tokens, 2
evaluation windows, the residual energy (no sensitivity pass), the one-shot selector with the
diagonal saliency (no 1537 x 1537 inverses): about half a minute of pruning on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"][data-test-connection-state="CONNECTED"]'
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium (as root: `make browser`, i.e. "
                "apt-get install chromium); the browser flow is not tested", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed: make setup")

from structprune.explorer import temperature_ladder  # noqa: E402  (after the skips: it imports torch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The app on a free port with an empty data folder; stopped by its PID afterwards."""
    port = _free_port()
    env = dict(os.environ, STRUCTPRUNE_DATA=str(tmp_path / "data"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    log = open(tmp_path / "streamlit.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless=true", "--server.address=127.0.0.1",
         f"--server.port={port}", "--browser.gatherUsageStats=false", "--server.fileWatcherType=none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "streamlit.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 60, "the server did not answer /_stcore/health within 60 s"
            time.sleep(0.2)
        yield url, t0, tmp_path
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


class App:
    """Small helpers over a Playwright page showing the Streamlit app."""

    def __init__(self, page, shots: list[Path]) -> None:
        self.page, self.shots = page, shots

    def idle(self, timeout: float = 120) -> None:
        self.page.wait_for_selector(IDLE, timeout=timeout * 1000)

    def number(self, label: str, value) -> None:
        box = self.page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Enter")
        self.idle()

    def select(self, label: str, option: str) -> None:
        box = self.page.get_by_role("combobox", name=label, exact=True)
        opt = self.page.get_by_role("option", name=option, exact=True)
        for _ in range(3):  # a click during a rerun or an expander's animation can miss the list
            box.click()
            try:
                opt.wait_for(state="visible", timeout=5000)
                break
            except sync_api.TimeoutError:
                self.page.keyboard.press("Escape")
                self.idle()
        opt.click()
        self.idle()

    def goto(self, title: str) -> None:
        self.page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title).click()
        self.page.wait_for_timeout(300)
        self.idle()

    def shot(self, name: str) -> None:
        """The whole page: Streamlit scrolls inside its main section, so the viewport is made as
        tall as that content for the screenshot, then restored."""
        self.page.wait_for_timeout(500)  # let plotly finish drawing
        size = self.page.viewport_size
        height = self.page.evaluate(
            "() => Math.max(...[...document.querySelectorAll('section, [data-testid=stMain], "
            "[data-testid=stAppViewContainer]')].map(e => e.scrollHeight))")
        self.page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 7000)})
        self.page.wait_for_timeout(700)  # plotly re-lays out on resize
        self.page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stPlotlyChart]')]"
                                    ".every(e => e.querySelector('.main-svg'))", timeout=30_000)
        for folder in self.shots:
            folder.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
        self.page.set_viewport_size(size)


CHART_TITLES_JS = """() => [...document.querySelectorAll('[data-testid=stPlotlyChart]')].map(c => ({
    title: [...c.querySelectorAll('.gtitle')].map(e => e.textContent).join(' '),
    x: [...c.querySelectorAll('text[class$=title]')].filter(e => /^x\\d*title$/.test(e.getAttribute('class')))
        .map(e => e.textContent).filter(t => t),
    y: [...c.querySelectorAll('text[class$=title]')].filter(e => /^y\\d*title$/.test(e.getAttribute('class')))
        .map(e => e.textContent).filter(t => t),
    legend: (c.querySelector('.legend') || {getBoundingClientRect: () => null}).getBoundingClientRect(),
    gtitle: (c.querySelector('.gtitle') || {getBoundingClientRect: () => null}).getBoundingClientRect()}))"""


def chart_titles(page) -> list[dict]:
    """What the browser drew for each chart: its title, axis titles (SVG text), legend and title boxes."""
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stPlotlyChart]')]"
                           ".every(e => e.querySelector('.main-svg'))", timeout=30_000)
    return page.evaluate(CHART_TITLES_JS)


def assert_charts_readable(page, where: str) -> int:
    """Every drawn chart has x and y axis titles, and its legend does not overlap its title."""
    charts = chart_titles(page)
    for c in charts:
        assert c["x"] and c["y"], (where, c["title"], c["x"], c["y"])
        lg, tt = c["legend"], c["gtitle"]
        if lg and tt and lg["width"] and tt["width"]:
            overlap = not (lg["bottom"] <= tt["top"] or tt["bottom"] <= lg["top"] or lg["right"] <= tt["left"]
                           or tt["right"] <= lg["left"])
            assert not overlap, (where, c["title"])
    assert page.locator('[data-testid="stException"]').count() == 0, where
    return len(charts)


CLIPPED_LINKS_JS = """() => [...document.querySelectorAll('[data-testid=stPageLink-NavLink]')]
    .filter(a => [a, ...a.querySelectorAll('*')].some(e => e.scrollWidth > e.clientWidth + 1))
    .map(a => a.textContent)"""


@contextlib.contextmanager
def browser_app():
    """A headless Chromium page at the tests' window size and its `App` driver (screenshots go to
    ARTIFACTS, and to $STRUCTPRUNE_SCREENSHOTS under the repository when set); closed afterwards."""
    shots = [ARTIFACTS] + ([ROOT / os.environ["STRUCTPRUNE_SCREENSHOTS"]] if os.environ.get("STRUCTPRUNE_SCREENSHOTS")
                           else [])
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            yield page, App(page, shots)
        finally:
            browser.close()


def test_every_page_on_first_open(server):
    """A fresh store and the repository's own records: every page renders without an exception, every
    chart has its axis titles in the DOM, and Compare, the explorer and the Method page show charts
    before any run."""
    url, _, _ = server
    with browser_app() as (page, app):
        page.goto(url)
        page.wait_for_selector("text=Where to begin", timeout=180_000)
        app.idle()
        assert_charts_readable(page, "Prune")
        assert page.locator('[data-testid="stPageLink-NavLink"]').count() == 4
        assert page.evaluate(CLIPPED_LINKS_JS) == []  # every link to another page reads whole
        app.shot("first-prune")
        counts = {}
        for title, marker, shot in (("Compare runs", "Perplexity vs sparsity", "first-compare"),
                                    ("Memory", "Peak device memory vs model size", "first-memory"),
                                    ("Method", "Which units ADMM keeps", "first-method"),
                                    ("Allocation explorer", "Softmax allocation over temperature", "first-explorer")):
            app.goto(title)
            page.wait_for_selector(f"text={marker}", timeout=60_000)
            app.idle()
            counts[title] = assert_charts_readable(page, title)
            assert page.evaluate(CLIPPED_LINKS_JS) == [], title
            app.shot(shot)
        assert counts["Compare runs"] >= 3 and counts["Memory"] == 2 and counts["Method"] == 3, counts
        assert counts["Allocation explorer"] >= 3, counts  # the shipped SmolLM2 energy profile


def test_new_user_flow(server):
    url, t_start, tmp = server
    timings: dict[str, float] = {}
    with browser_app() as (page, app):
        try:  # the flow a new user takes, page by page
            # --- first screen: the default model, the estimate
            page.goto(url)
            page.wait_for_selector("text=Predicted peak device memory", timeout=180_000)
            app.idle()
            timings["first_screen_s"] = time.monotonic() - t_start
            assert page.get_by_role("combobox", name="Model", exact=True).input_value() == "smollm2-135m"
            # --- a cheap run: 30%, softmax (residual energy), 2 x 128 calibration, 2 eval windows
            app.number("Sparsity target (share of prunable parameters)", "0.30")
            app.select("Allocation across layers", "softmax")
            app.select("Energy", "residual")
            app.number("Calibration windows", 2)
            app.number("Tokens per window (seqlen)", 128)
            app.number("Evaluation windows per corpus (0 = all)", 2)
            page.get_by_text("Advanced", exact=True).click()
            page.get_by_role("combobox", name="Unit selector", exact=True).wait_for(state="visible")
            app.select("Unit selector", "saliency")
            app.select("Saliency", "diag")
            app.shot("prune-settings")
            t_run = time.monotonic()
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_selector('[data-testid="stProgress"]', timeout=120_000)
            page.wait_for_selector("text=/pass [12]: .*, layer \\d+\\/\\d+|The run failed/", timeout=180_000)
            assert page.get_by_text("The run failed").count() == 0, page.inner_text('[data-testid="stMain"]')[-500:]
            page.wait_for_selector("text=Peak device memory so far", timeout=60_000)
            app.shot("prune-running")
            assert page.get_by_role("button", name="Cancel").is_visible()
            page.wait_for_selector("text=Sparsity per layer and module", timeout=600_000)
            app.idle()
            timings["run_s"] = time.monotonic() - t_run
            for title in ("Perplexity, dense vs pruned", "Parameters before and after", "Device memory over the run",
                          "Module energies and the softmax allocation"):
                assert page.get_by_text(title).count() >= 1, title
            assert page.get_by_text(re.compile(r"Speed vs dense, prefill 1x128")).count() == 1  # measured after the run
            assert page.get_by_text("SOTU 2002-2026").count() >= 1  # the eval corpus, named honestly
            assert page.get_by_text("WikiText").count() == 0
            page.get_by_role("button", name="Generate 30 tokens (greedy)").click()  # dense vs pruned text
            page.wait_for_selector("text=/Pruned \\(30%\\)/", timeout=120_000)
            app.idle()
            assert assert_charts_readable(page, "Prune results") >= 4
            app.shot("prune")

            # --- the explorer: the run left its energy profile; move the temperature slider
            app.goto("Allocation explorer")
            page.wait_for_selector("text=Redrawn in", timeout=60_000)
            app.shot("explorer")
            thumb = page.locator('[data-testid="stSlider"] input[type="range"]').first
            thumb.focus()
            ladder = [float(t) for t in temperature_ladder()]
            start = ladder.index(1.0)
            redraws = []
            for step in range(1, 4):
                t = time.monotonic()
                thumb.press("ArrowLeft")
                page.wait_for_selector(f"text=softmax allocation at T = {ladder[start - step]:g}", timeout=30_000)
                app.idle()
                redraws.append(time.monotonic() - t)
            server_ms = int(re.search(r"Redrawn in (\d+) ms", page.inner_text("body")).group(1))
            timings["explorer_redraw_server_ms"] = server_ms
            timings["explorer_redraw_browser_s"] = min(redraws)
            assert server_ms < 1000
            app.shot("explorer-moved")

            # --- compare: the run is there
            app.goto("Compare runs")
            page.wait_for_selector("text=Perplexity vs sparsity", timeout=60_000)
            assert page.get_by_text(re.compile(r"finished runs: 1 from the app's run store")).count() == 1
            assert assert_charts_readable(page, "Compare") >= 3
            assert page.get_by_text("Perplexity vs measured speed-up").count() >= 1  # the run's own speed
            app.shot("compare")
            if os.environ.get("STRUCTPRUNE_SCREENSHOTS"):  # for the README: the benchmark grid, if there is one
                page.get_by_role("combobox", name="Evaluation protocol (perplexities are comparable only under one)").click()
                labels = page.get_by_role("option").all_inner_texts()
                if len(labels) > 1:
                    page.get_by_role("option", name=labels[1], exact=True).click()
                    app.idle()
                    app.shot("compare-benchmarks")
                else:
                    page.keyboard.press("Escape")

            app.goto("Memory")
            page.wait_for_selector("text=Peak device memory vs model size", timeout=60_000)
            app.shot("memory")

            app.goto("Method")
            page.wait_for_selector("text=One module's solve, step by step", timeout=60_000)
            if os.environ.get("STRUCTPRUNE_SCREENSHOTS"):  # the README's screenshot shows a computed step-through
                compute = page.get_by_role("button", name="Compute the step-through")
                if compute.count():  # the default module's step-through ships with the demo assets
                    compute.click()
                page.wait_for_selector("text=Which units ADMM keeps", timeout=600_000)
                app.idle()
            app.shot("method")
        finally:
            timings["total_s"] = time.monotonic() - t_start
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "browser-timings.json").write_text(json.dumps(timings, indent=1))
