"""Every page under streamlit's AppTest: widgets set by key, tiny runs to completion, the charts
checked against the stored records, and bad inputs answered with the library's message."""

from __future__ import annotations

import base64
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conftest import wait_until  # noqa: E402
from pages import _ui as ui  # noqa: E402  (the module the pages use; monkeypatched below)
from structprune.store import RunStore  # noqa: E402

TINY = {"model_choice": "tiny-llama", "nsamples": 4, "seqlen": 32, "eval_windows": 2}


PAGES = ["pages/prune.py", "pages/explorer.py", "pages/compare.py", "pages/memory.py", "pages/method.py"]


@pytest.fixture
def app(tmp_path, monkeypatch):
    """A fresh app on an empty data folder and an empty benchmarks/results, caches cleared."""
    yield from _fresh_app(tmp_path, monkeypatch, None)


@pytest.fixture
def first_visit(tmp_path, monkeypatch):
    """The app as a newcomer opens it: an empty run store, the repository's own benchmark records."""
    yield from _fresh_app(tmp_path, monkeypatch, ui.RESULTS_DIR)


def _fresh_app(tmp_path, monkeypatch, results):
    monkeypatch.setenv("STRUCTPRUNE_DATA", str(tmp_path / "data"))
    if results is None:
        results = tmp_path / "results"
        results.mkdir()
    monkeypatch.setattr(ui, "RESULTS_DIR", results)
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception
    yield at
    job = ui.runner().current()
    if job is not None and job.active:  # never leave a worker running into the next test
        job.cancel_event.set()
        wait_until(lambda: not job.active)
    st.cache_data.clear()
    st.cache_resource.clear()


def _run_until(at: AppTest, cond, timeout=120.0) -> AppTest:
    t = time.time()
    while True:
        at.run()
        assert not at.exception, at.exception
        if cond(at):
            return at
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.3)


def _decode(obj):
    """Plotly's JSON sends arrays as {"dtype", "bdata" (base64)[, "shape"]}: back to lists."""
    if isinstance(obj, dict):
        if "bdata" in obj and "dtype" in obj:
            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"])
            if "shape" in obj:
                arr = arr.reshape([int(n) for n in str(obj["shape"]).split(",")])
            return arr.tolist()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _figures(at: AppTest) -> dict:
    """title -> plotly Figure of every chart on the page."""
    out = {}
    for el in at.get("plotly_chart"):
        fig = go.Figure(_decode(json.loads(el.proto.spec)))
        out[fig.layout.title.text] = fig
    return out


def _sent_figures(at: AppTest) -> dict:
    """title -> the figure JSON exactly as sent to the browser (not re-validated by plotly.py, which
    would turn a bare-string title, invisible in plotly.js 3, into a drawn one)."""
    return {json.loads(el.proto.spec)["layout"]["title"]["text"]: json.loads(el.proto.spec)
            for el in at.get("plotly_chart")}


def _untitled_axes(spec: dict) -> list[str]:
    """Axes of a sent figure without a drawable title (bare strings count as missing)."""
    lay = spec["layout"]
    return [ax for ax in lay if ax.startswith(("xaxis", "yaxis")) and lay[ax].get("showticklabels") is not False
            and not (isinstance(lay[ax].get("title"), dict) and lay[ax]["title"].get("text"))]


def _errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error)


def _set(at: AppTest, **values) -> None:
    for key, value in values.items():
        widget = next(w for kind in ("selectbox", "number_input", "text_input", "text_area", "multiselect", "checkbox", "radio")
                      for w in getattr(at, kind) if w.key == key)
        widget.set_value(value)
    at.run()


def _prune(at: AppTest, **settings) -> AppTest:
    _set(at, **{**TINY, **settings})
    at.button(key="run").click()
    at.run()
    job = ui.runner().current()
    assert job is not None, _errors(at)
    wait_until(lambda: not job.active)
    return _run_until(at, lambda a: "Sparsity per layer and module" in _figures(a) or a.error)


def test_prune_page_runs_a_tiny_model_and_draws_the_record(app):
    labels = [m.label for m in app.metric]
    assert "Predicted peak device memory" in labels and "Predicted peak host memory" in labels
    _set(app, **TINY)

    def time_help(at: AppTest) -> str:
        return next(m.proto.help for m in at.metric if m.label == "Predicted time (rough estimate)")

    assert "to load the model, once per app process" in time_help(app)  # the first run loads it
    at = _prune(app)
    assert not at.error, _errors(at)
    assert "to load the model" not in time_help(at)  # the next one finds it loaded
    rec = RunStore(ui.store().folder).records()[0]
    figs = _figures(at)
    alloc = figs["Sparsity per layer and module"]
    for kind, name in (("attn", "attention heads"), ("mlp", "MLP channels")):
        rows = [r for r in rec["allocation"] if r["module"] == kind]
        trace = next(t for t in alloc.data if t.name == name)
        assert list(trace.y) == [r["sparsity"] for r in rows]
    assert alloc.layout.shapes[0].y0 == rec["sparsity"]["target"] == 0.3
    ppl = figs["Perplexity, dense vs pruned"]
    assert ppl.layout.yaxis.rangemode == "tozero" and ppl.layout.yaxis.type != "log"  # bars from zero
    assert all(_untitled_axes(spec) == [] for spec in _sent_figures(at).values())
    pruned = next(t for t in ppl.data if t.name == "pruned")
    assert pruned.y[0] == pytest.approx(rec["ppl"]["pruned"]["random"]["value"])
    assert rec["ppl"]["pruned"]["random"]["protocol"] in ppl.layout.meta["caption"]
    assert any(rec["ppl"]["pruned"]["random"]["protocol"] in c.value for c in at.caption)
    energy = figs["Module energies and the softmax allocation"]
    e_attn = next(t for t in energy.data if t.name == "attention heads energy")
    assert list(e_attn.y) == pytest.approx([r["energy"] for r in rec["allocation"] if r["module"] == "attn"])
    assert "Device memory over the run" in figs and "Reconstruction error per module: masked vs refit" in figs
    head = next(m for m in at.metric if m.label.startswith("Perplexity, "))
    want = rec["ppl"]["pruned"]["random"]["value"]
    assert head.value == f"{want:.4g}" and head.delta == f"{want - rec['ppl']['dense']['random']['value']:+.4g} vs dense"
    params = next(m for m in at.metric if m.label == "Parameters")
    assert params.value == f"{rec['params']['after']['total'] / 1e6:.1f} M"
    assert params.proto.color == params.proto.MetricColor.GREEN  # fewer parameters is good news, not a red arrow
    assert any("no tokenizer" in c.value for c in at.caption)  # tiny model: no text generation
    labels = [b.label for b in at.get("download_button")]
    assert "Run record (JSON)" in labels and "Allocation (CSV)" in labels


def test_prune_page_admm_traces_and_a_second_run_is_shown(app):
    at = _prune(app, allocation="uniform")
    first = at.selectbox(key="result_run").value
    at = _prune(at, selector="admm", allocation="uniform")
    assert not at.error, _errors(at)
    rec = RunStore(ui.store().folder).records()[0]
    assert at.selectbox(key="result_run").value == rec["run_id"] != first  # the latest run, not the earlier one
    fig = _figures(at)["ADMM convergence per module"]
    traced = [m for m in rec["modules"] if m.get("trace")]
    assert len(fig.data) == len(traced) > 0
    first = traced[0]
    trace = next(t for t in fig.data if t.name == f"L{first['layer']} {first['module']}")
    assert list(trace.y) == pytest.approx(first["trace"]["primal_residual"])


def test_prune_form_widgets_take_their_bounds_choices_and_help_from_pruneconfig(app):
    from dataclasses import fields

    from pages import _prune_form as form
    from structprune.config import MAX_SPARSITY, PruneConfig, bounds_for, choices_for, help_for

    at = app
    names = [f.name for f in fields(PruneConfig)]
    laid_out = [n for col in form.MAIN + form.ADVANCED for n in col]
    assert sorted(laid_out) == sorted(names)  # every setting once, none invented
    sparsity = at.number_input(key="sparsity")
    assert sparsity.max == MAX_SPARSITY == 0.9 and sparsity.min == 0.0 and sparsity.value == PruneConfig().sparsity
    assert at.number_input(key="s_max").max == MAX_SPARSITY
    numbers = {w.key: w for w in at.number_input}
    for name in names:
        b = bounds_for(name)
        if name in numbers and name != "eval_windows":  # eval_windows offers 0 for "all" (None)
            w = numbers[name]
            assert w.min == b.get("min", b.get("smallest")) and w.max == b.get("max") and w.step == b["step"], name
            assert help_for(name) in w.help, name
        if choices_for(name):
            assert at.selectbox(key=name).options == list(choices_for(name)), name
            assert at.selectbox(key=name).value == getattr(PruneConfig(), name), name
    assert numbers["eval_windows"].min == 0 and numbers["temperature"].min == bounds_for("temperature")["smallest"]
    assert "(0 to 0.9)" in sparsity.help and "(at least 2)" in numbers["seqlen"].help
    at.switch_page("pages/explorer.py")
    at.run()
    assert at.number_input(key="ex_s").max == MAX_SPARSITY
    at.switch_page("pages/method.py")
    at.run()
    assert at.number_input(key="m_s").max == MAX_SPARSITY


def test_prune_page_bad_inputs_show_the_librarys_message(app, tmp_path):
    at = app
    _set(at, sparsity=0.95)  # above the widget's max (MAX_SPARSITY): not taken
    assert at.number_input(key="sparsity").value != 0.95
    _set(at, sparsity=0.5, s_max=0.4)
    assert "sparsity 0.5 is above s_max 0.4" in _errors(at)
    assert at.button(key="run").disabled
    _set(at, sparsity=0.3, s_max=0.9, model_choice="local folder or hub id...")
    for model, message in (("no-such-model", "unknown model"), (str(tmp_path), "not a model folder")):
        _set(at, model_other=model)
        at.button(key="run").click()
        at.run()
        assert message in _errors(at)
        assert not at.exception
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    _set(at, model_other=str(gpt2))
    at.button(key="run").click()
    at.run()
    assert "architecture 'gpt2' is not supported" in _errors(at)


def _tiny_folder(tmp_path, tokenizer) -> Path:
    from structprune.models import build_tiny

    folder = tmp_path / "tiny-with-tokenizer"
    build_tiny("tiny-llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_run_is_deleted_with_its_files_after_a_confirmation(app):
    at = _prune(app)
    store = RunStore(ui.store().folder)
    rid = store.runs()[0]["run_id"]
    (store.folder / "streamed" / rid).mkdir(parents=True)
    (store.folder / "streamed" / rid / "layer-000.safetensors").write_bytes(b"x" * 2048)
    at.run()
    assert at.button(key="delete_run").disabled  # not before the box is ticked
    at.checkbox(key="delete_run_sure").check()
    at.run()
    at.button(key="delete_run").click()
    at.run()
    assert not at.exception and not at.error, _errors(at)
    assert any(f"Deleted run {rid}, 2 KiB freed." in s.value for s in at.success), [s.value for s in at.success]
    assert store.runs() == [] and not (store.folder / "streamed" / rid).exists()
    assert any("No finished run yet" in i.value for i in at.info)


def _click_run_until_error(at: AppTest) -> AppTest:
    at.button(key="run").click()
    at.run()
    job = ui.runner().current()
    wait_until(lambda: not job.active)
    return _run_until(at, lambda a: a.error)


def test_failed_runs_show_their_error_and_are_stored_failed(app, tmp_path, tiny_tokenizer):
    _set(app, **{**TINY, "seqlen": 1000})  # tiny-llama's context is 256 tokens: refused at the click, no job
    app.button(key="run").click()
    at = app.run()
    assert "exceeds the model's context of 256 tokens" in _errors(at)
    assert ui.runner().current() is None and RunStore(ui.store().folder).runs() == []
    folder = _tiny_folder(tmp_path, tiny_tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("A short text.\n\nJust two paragraphs here.")
    _set(at, model_choice="local folder or hub id...")
    _set(at, model_other=str(folder), seqlen=64, calib_data="a local file...")
    _set(at, calib_path=str(short))
    at = _click_run_until_error(at)
    assert "longer than the calibration text" in _errors(at)
    _set(at, calib_data="sotu", eval_data=["wikitext2"])
    at = _click_run_until_error(at)
    assert "cannot be reached (offline)" in _errors(at)
    statuses = {r["status"] for r in RunStore(ui.store().folder).runs()}
    assert statuses == {"failed"}


def test_explorer_redraws_from_the_cached_profile(app, tmp_path, monkeypatch):
    from structprune import demo
    from structprune.allocation import allocate_softmax
    from structprune.explorer import EnergyProfile, temperature_ladder

    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / "no-demo")  # nothing shipped: the page says what to do
    at = app
    at.switch_page("pages/explorer.py")
    at.run()
    assert any("No energy profile yet" in i.value for i in at.info)
    _set(at, ex_model="tiny-llama", ex_nsamples=4, ex_seqlen=32)
    at.button(key="ex_compute").click()
    at.run()
    job = ui.runner().current()
    wait_until(lambda: not job.active)
    at = _run_until(at, lambda a: "Module energies and the softmax allocation" in _figures(a))
    key = at.selectbox(key="ex_profile").value
    profile = EnergyProfile.from_dict(ui.store().cache_get(key))
    t_low = float(temperature_ladder()[10])  # about 0.22
    at.select_slider(key="ex_T").set_value(t_low)
    at.run()
    fig = _figures(at)["Module energies and the softmax allocation"]
    want = allocate_softmax(profile.module_specs(), profile.energies("relative"), 0.3, t_low).sparsities  # the default energy
    got = next(t for t in fig.data if t.name == "MLP channels sparsity").y
    assert list(got) == pytest.approx(list(want[1::2]))
    assert f"T = {t_low:g}" in fig.layout.annotations[1].text
    assert at.session_state["ex_redraw_ms"] < 1000
    heat = _figures(at)["Softmax allocation over temperature"]
    assert np.asarray(heat.data[0].z).shape == (profile.n_layers, 41)
    at.select_slider(key="ex_T").set_value(math.inf)
    at.run()
    schemes = _figures(at)["Allocation schemes, same budget"]
    uni = [t for t in schemes.data if t.name == "uniform"]
    soft = [t for t in schemes.data if t.name.startswith("softmax")]
    assert [list(t.y) for t in uni] == [list(t.y) for t in soft]  # T = inf is uniform


def test_compare_page_plots_stored_and_benchmark_runs(app, tmp_path):
    from structprune.config import PruneConfig
    from structprune.models import load_model

    loaded, store, runner = load_model("tiny-llama"), ui.store(), ui.runner()
    for s in (0.2, 0.4):
        job = runner.submit_prune(PruneConfig(model="tiny-llama", sparsity=s, nsamples=4, seqlen=32, eval_windows=2,
                                              device="cpu"), loaded, store)
        wait_until(lambda: not job.active)
        assert job.status == "finished", job.error
    bench = dict(RunStore(store.folder).records()[0], run_id="bench1", method="wanda-sp", allocation_scheme="uniform")
    (ui.RESULTS_DIR / "bench1.json").write_text(json.dumps(bench))
    at = app
    at.switch_page("pages/compare.py")
    at.run()
    assert not at.exception and not at.error
    fig = _figures(at)["Perplexity vs sparsity"]
    recs = {r["sparsity"]["target"]: r["ppl"]["pruned"]["random"]["value"] for r in RunStore(store.folder).records()}
    line = next(t for t in fig.data if t.mode == "lines" and t.name.startswith("structprune"))
    assert list(line.x) == [0.2, 0.4] and list(line.y) == pytest.approx([recs[0.2], recs[0.4]])
    assert any(t.name == "wanda-sp · uniform" for t in fig.data)  # the benchmark record
    assert fig.layout.yaxis.type == "log" and "random-tokens" in fig.layout.meta["caption"]
    assert "Allocations of the chosen runs" in _figures(at)
    # every app run measured its speed against dense: perplexity against it, one point per run
    speed = _figures(at)["Perplexity vs measured speed-up"]
    pts = [t for t in speed.data if t.name != "dense"]
    assert sorted(pts[0].y) == pytest.approx(sorted(recs.values())) and all(x > 0 for x in pts[0].x)
    _set(at, cmp_methods=["structprune"])
    fig = _figures(at)["Perplexity vs sparsity"]
    assert {t.name for t in fig.data} == {"structprune · softmax (relative)"}
    assert "Export the table (CSV)" in [b.label for b in at.get("download_button")]


def test_memory_page_estimates_measured_points_and_pasted_config(app):
    from structprune.presets import PRESETS, estimate_rows, preset_config

    (ui.RESULTS_DIR / "gpu-test.json").write_text(json.dumps([
        {"kind": "gpu-scaling", "config_name": "opt-125m", "n_params": 125239296, "method": "structprune",
         "peak_bytes": 300 * 2**20, "estimate_bytes": 290 * 2**20, "nsamples": 128, "seqlen": 2048, "oom": False},
        {"kind": "gpu-scaling", "config_name": "opt-13b", "n_params": 12853473280, "method": "global-taylor",
         "peak_bytes": None, "estimate_bytes": 160 * 2**30, "nsamples": 128, "seqlen": 2048, "oom": True}]))
    at = app
    at.switch_page("pages/memory.py")
    at.run()
    assert not at.exception
    fig = _figures(at)["Peak device memory vs model size"]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    rows = {r["preset"]: r["peak_gib"] for r in estimate_rows({n: preset_config(n) for n in PRESETS}, ("structprune",))}
    est = [t for t in fig.data if t.name == "structprune (estimate)"]  # one line per family
    assert {p: y for t in est for p, y in zip(t.customdata, t.y)} == pytest.approx(rows)
    assert list(next(t for t in fig.data if t.name == "structprune (measured)").y) == pytest.approx([300 / 1024])
    assert next(t for t in fig.data if t.name == "global-taylor (out of memory)").marker.symbol == "x"
    assert "One decoder layer vs the whole model" in _figures(at)
    host = next(d.value for d in at.dataframe if "host_disk_gib" in d.value.columns).set_index("preset")
    big = host.loc["llama-2-70b"] if "llama-2-70b" in host.index else host.iloc[-1]
    # 70B on disk: the activations, a layer and its Grams (~13 GiB); in memory: twice the model and more
    assert big["host_disk_gib"] < 0.15 * big["model_gib"] and big["host_memory_gib"] > 2 * big["model_gib"]
    _set(at, mem_json=json.dumps(PRESETS["smollm2-135m"]))
    assert any(m.label == "structprune peak" for m in at.metric)
    assert any(m.label == "structprune host peak, weights on disk" for m in at.metric)
    _set(at, mem_json='{"model_type": "gpt2", "n_layer": 2}')
    assert "cannot estimate this config" in _errors(at)


def test_method_page_steps_through_one_module(app):
    at = app
    at.switch_page("pages/method.py")
    at.run()
    assert len(at.latex) >= 5
    _set(at, m_model="tiny-llama", m_layer=1)
    at.button(key="m_compute").click()
    at.run()
    job = ui.runner().current()
    wait_until(lambda: not job.active)
    assert job.status == "finished", job.error
    at = _run_until(at, lambda a: "Which units ADMM keeps, iteration by iteration" in _figures(a))
    data = job.result
    figs = _figures(at)
    refit = figs["Error of the kept units: zeroed vs refit"]
    after = next(t for t in refit.data if t.name == "least-squares refit")
    assert list(after.y) == pytest.approx([e["err_after_refit"] / data["output_energy"] for e in data["errors"]])
    support = np.asarray(figs["Which units ADMM keeps, iteration by iteration"].data[0].z)
    assert support.shape == (data["n_units"], len(data["supports"]))
    assert support[:, -1].sum() == data["k_keep"]


def test_generation_and_checkpoint_zip_for_a_model_with_a_tokenizer(app, tmp_path, tiny_tokenizer):
    import zipfile

    from structprune.models import load_model

    folder = _tiny_folder(tmp_path, tiny_tokenizer)
    at = app
    _set(at, model_choice="local folder or hub id...")
    at = _prune(at, model_other=str(folder), model_choice="local folder or hub id...")
    assert not at.error, _errors(at)
    assert any("SOTU 2002-" in m.label for m in at.metric)  # the eval corpus, named by its years
    at.button(key="generate").click()
    at.run()
    texts = [m.value for m in at.markdown if m.value.startswith(("**Dense**", "**Pruned"))]
    assert len(texts) == 2 and all("The state of our Union is" in t for t in texts)
    at.button(key="zip").click()
    at.run()
    assert not at.exception, at.exception
    assert "Download the pruned model" in [b.label for b in at.get("download_button")]
    zips = list((ui.store().folder / "checkpoints").glob("*.zip"))
    assert len(zips) == 1
    with zipfile.ZipFile(zips[0]) as z:
        z.extractall(tmp_path / "unzipped")
    (model_dir,) = (tmp_path / "unzipped").iterdir()
    reloaded = load_model(str(model_dir))
    rec = RunStore(ui.store().folder).records()[0]
    assert sum(p.numel() for p in reloaded.model.parameters()) == rec["params"]["after"]["total"]


def test_form_config_and_run_headline():
    from structprune.planning import form_config, run_headline

    base = {"model": " tiny-llama ", "nsamples": 4, "sensitivity_windows": 8, "eval_windows": 0, "eval_data": []}
    cfg = form_config(base, temperature_inf=True)
    assert cfg.model == "tiny-llama" and math.isinf(cfg.temperature)
    assert cfg.sensitivity_windows == 4 and cfg.eval_windows is None and cfg.eval_data == ("sotu",)
    assert form_config({**base, "eval_windows": 3}).eval_windows == 3
    rec = {"ppl": {"dense": {"random": {"value": 10.0, "protocol": "p"}},
                   "pruned": {"random": {"value": 12.5, "protocol": "p"}}},
           "params": {"before": {"total": 3_000_000}, "after": {"total": 2_250_000}}}
    head = run_headline(rec)
    assert run_headline({**rec, "ppl": {}})["ppl"] is None
    assert head["ppl"] == 12.5 and head["ppl_delta"] == pytest.approx(2.5)
    assert head["params_after_m"] == pytest.approx(2.25) and head["params_delta_m"] == pytest.approx(-0.75)


def test_every_page_opens_on_the_repository_records_and_an_empty_store(first_visit):
    """What a newcomer meets: no exception on any page, charts before anything is computed (the
    benchmark records, the shipped demo profile and step-through), every axis titled as sent."""
    at = first_visit
    seen = {}
    for page in PAGES:
        at.switch_page(page)
        at.run()
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, _errors(at))
        for title, spec in _sent_figures(at).items():
            assert _untitled_axes(spec) == [], (page, title)
            seen[title] = page
    for title in ("Perplexity vs sparsity", "Perplexity vs temperature", "Allocations of the chosen runs",
                  "Peak device memory vs model size", "Module energies and the softmax allocation",
                  "Softmax allocation over temperature", "Which units ADMM keeps, iteration by iteration"):
        assert title in seen, (title, sorted(seen))
    text = " ".join(c.value for c in at.caption)
    assert "1 runs" not in text and "1 windows" not in text


def test_compare_page_overlays_runs_chosen_by_scheme_and_temperature(first_visit):
    at = first_visit
    at.switch_page("pages/compare.py")
    at.run()
    assert not at.exception
    overlay = next(w for w in at.multiselect if w.key.startswith("cmp_overlay|"))
    assert overlay.value and all(" · s=" in v and "seed" in v for v in overlay.value)  # what a run is, not its hash
    assert not any(len(v) == 12 and v.isalnum() for v in overlay.value)
    fig = _figures(at)["Allocations of the chosen runs"]
    assert len({t.name for t in fig.data}) == len(overlay.value)
    with_t = [o for o in overlay.options if "softmax T=" in o]
    assert with_t, overlay.options[:5]


def test_explorer_and_method_show_the_shipped_demo_before_anything_is_computed(app, tmp_path, monkeypatch):
    """A demo collection (assets/demo) is drawn on a first visit with an empty run store."""
    from structprune import demo
    from structprune.config import PruneConfig
    from structprune.explorer import compute_energy_profile, profile_key
    from structprune.models import load_model

    loaded = load_model("tiny-llama")
    cfg = PruneConfig(model="tiny-llama", nsamples=4, seqlen=32, sensitivity_windows=2, device="cpu")
    folder = tmp_path / "demo"
    demo.write_demo("profile", profile_key("tiny-llama", cfg), compute_energy_profile(cfg, loaded).to_dict(), "tiny",
                    folder)
    monkeypatch.setattr(demo, "DEMO_DIR", folder)
    at = app
    at.switch_page("pages/explorer.py")
    at.run()
    assert not at.exception and not at.info, [i.value for i in at.info]
    assert "shipped demo" in at.selectbox(key="ex_profile").format_func(at.selectbox(key="ex_profile").value)
    figs = _sent_figures(at)
    assert {"Module energies and the softmax allocation", "Softmax allocation over temperature"} <= set(figs)
    assert all(_untitled_axes(spec) == [] for spec in figs.values())
    assert ui.store().cache_keys("profile|") == []  # drawn from the demo, nothing computed or stored


def test_make_app_starts_without_the_file_watcher():
    make = (ROOT / "Makefile").read_text()
    app_rule = make[make.index("\napp:"):].split("\n\n")[0]
    assert "--server.fileWatcherType=none" in app_rule


def test_cancel_stops_a_run_inside_its_evaluation_and_shows_cancelling(app):
    """Cancel is checked after every evaluation window (cancel.py), not only at layer boundaries; the
    page says "cancelling" until the worker stops."""
    from structprune.config import PruneConfig
    from structprune.models import load_model

    loaded, runner = load_model("tiny-llama"), ui.runner()
    job = runner.submit_prune(PruneConfig(model="tiny-llama", nsamples=2, seqlen=32, eval_windows=400, device="cpu"),
                              loaded, ui.store())
    wait_until(lambda: any(e.stage == "eval-dense" and e.step > 0 for e in job.events) or not job.active)
    assert job.active, job.error
    seen = job.events[-1]  # window k of 400: inside the dense evaluation
    runner.cancel()
    assert job.cancelling and job.progress()[1].startswith("cancelling")
    t = time.time()
    wait_until(lambda: not job.active, timeout=30)
    assert job.status == "cancelled" and time.time() - t < 5
    assert seen.steps == 400 and seen.step < seen.steps
    statuses = {r["status"] for r in RunStore(ui.store().folder).runs()}
    assert statuses == {"cancelled"}


def test_the_page_says_cancelling_until_the_worker_stops(app):
    """A job that stops only when let go: after the Cancel click the page shows "cancelling" with the
    stage it was in and a disabled "Cancelling..." button, then the cancellation."""
    import threading

    from structprune.cancel import check
    from structprune.pipeline import ProgressEvent

    release = threading.Event()

    def work(on_event, cancel):
        on_event(ProgressEvent("pass2", 3, 30, 1.0, 0, 0))
        release.wait(60)
        check()  # the job's cancel scope
        return None

    at = app
    job = ui.runner().submit_call("prune", "blocking job", {}, work, stages={"pass1": 10.0, "pass2": 10.0})
    wait_until(lambda: job.events)
    at.run()
    assert any("pass 2: pruning, layer 5/30" in p.proto.text for p in at.get("progress"))
    at.button(key="cancel").click()
    at.run()
    assert job.cancelling
    assert any(w.value.startswith("blocking job: cancelling") for w in at.warning), [w.value for w in at.warning]
    button = next(b for b in at.button if b.key == "cancel")
    assert button.label == "Cancelling..." and button.disabled
    release.set()
    wait_until(lambda: not job.active)
    assert job.status == "cancelled"
    at = _run_until(at, lambda a: any("was cancelled" in w.value for w in a.warning))


def test_calibration_too_small_to_mean_anything_is_warned(app):
    from structprune.config import PruneConfig
    from structprune.planning import calibration_warning

    assert calibration_warning(PruneConfig(nsamples=1, seqlen=2)).startswith("1 calibration window of 2 tokens")
    assert calibration_warning(PruneConfig(nsamples=8, seqlen=256)) is None
    at = app
    _set(at, nsamples=1, seqlen=2)
    assert any("too little to mean anything" in w.value for w in at.warning)
    _set(at, nsamples=8, seqlen=256)
    assert not any("too little" in w.value for w in at.warning)
