"""The bad-input matrix (issue 21): every bad input and fault a new user meets, against the CLI, the
library and the run store. Each row: the input, the exit code and message, and that nothing was
written (no --out folder or file, no store row left "running", the model cache untouched). Faults
that cannot be produced on purpose (a full disk, a read-only filesystem, a kill during a save) are
injected where the operating system would raise them."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from structprune import cli, jsonio
from structprune.cli import main
from structprune.store import RunStore

TINY = ["--model", "tiny-llama", "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def store_dir(tmp_path, monkeypatch):
    """Every CLI run of this file records into a store of its own, never the user's."""
    folder = tmp_path / "store"
    monkeypatch.setenv("STRUCTPRUNE_DATA", str(folder))
    return folder


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("\r")]
    err = [line for line in err if line.startswith("error: ")] if any(e.startswith("error: ") for e in err) else err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def store_rows(folder: Path) -> list[dict]:
    if not (folder / "runs.sqlite").exists():
        return []
    return RunStore(folder).runs()


def strict_load(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture()
def folder_model(tmp_path, tiny_tokenizer):
    """Saves tiny-llama with a real tokenizer as a model folder, optionally damaged by `edit(model)`."""
    from structprune.models import build_tiny

    def make(name: str = "model", edit=None) -> Path:
        model = build_tiny("tiny-llama")
        if edit is not None:
            with torch.no_grad():
                edit(model)
        folder = tmp_path / name
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return folder

    return make


def refused(argv, capsys, out: Path | None = None, message: str = "", seconds: float | None = 20.0) -> str:
    """Runs the CLI, expects exit 2 with one error line containing `message`, and no --out folder
    afterwards. `seconds` bounds a refusal that must come before any work (generously: it catches a
    refusal that ran the model first, not a slow machine); None for faults met after a run."""
    t = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t
    line = one_error_line(capsys)
    assert code == 2, (code, line)
    assert message in line, line
    assert seconds is None or elapsed < seconds, f"{argv}: refused after {elapsed:.1f} s"
    if out is not None:
        assert not out.exists(), tree(out)
    return line


# ------------------------------------------------------------------------------------ help
def test_prune_help_prints_every_option(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--refine-epochs" in out and "--no-store" in out and "--out" in out


# --------------------------------------------------------------------------- settings early
@pytest.mark.parametrize("argv, message", [
    (["prune", *TINY, "--owl-lambda", "nan"], "--owl-lambda must be between 0 and 0.3 (got nan)"),
    (["prune", *TINY, "--owl-lambda", "-0.1"], "--owl-lambda must be between 0 and 0.3 (got -0.1)"),
    (["prune", *TINY, "--sparsity", "0.9"], "--sparsity 0.9 cannot be reached on tiny-llama"),
    (["prune", *TINY, "--sparsity", "0.8", "--s-max", "0.7"], "--sparsity 0.8 is above --s-max 0.7"),
    (["prune", *TINY, "--method", "magnitude", "--refine-epochs", "2"], "--refine-epochs is a structprune setting"),
    (["prune", *TINY, "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
    (["prune", *TINY, "--seqlen", "512"], "--seqlen 512 exceeds the model's context of 256 tokens"),
    (["prune", *TINY, "--calib-data", "brown"], "--calib-data cannot apply to tiny-llama: it has no tokenizer"),
    (["prune", *TINY, "--eval-data", "sotu", "brown"], "--eval-data cannot apply to tiny-llama"),
    (["prune", *TINY, "--method", "structprune", "--energy", "sensitivity", "--sensitivity-windows", "4"],
     "sensitivity_windows (4) exceeds nsamples (2)"),
    (["prune", *TINY, "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "--model", "tiny-llama", "--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["eval", "--model", "tiny-llama"], "tiny-llama has no tokenizer"),
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["estimate", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["estimate", "--method", "pruneall"], "argument --method: invalid choice: 'pruneall'"),
    (["estimate", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    (["estimate", "--model", "tiny-llama", "--nsamples", "-1"], "--nsamples must be at least 1 (got -1)"),
])
def test_bad_settings_are_refused_before_any_work(argv, message, tmp_path, store_dir, capsys):
    out = tmp_path / "out"
    if argv[0] == "prune":
        argv = [*argv, "--out", str(out)]
    refused(argv, capsys, out, message, seconds=10)
    assert store_rows(store_dir) == []


def test_unreachable_sparsity_on_the_builtin_model_is_refused_from_its_config(tmp_path, store_dir, capsys,
                                                                             monkeypatch):
    """SmolLM2 at 0.9: refused from config.json in well under a second (it used to run the dense
    evaluation and pass 1 first, 204 s); no weights are loaded."""
    from structprune.models import converted_dir

    if not (converted_dir("smollm2-135m") / "config.json").is_file():
        pytest.skip("the built-in model is not prepared (make prepare)")
    import structprune.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    cache = tree(converted_dir("smollm2-135m"))
    out = tmp_path / "out"
    line = refused(["prune", "--sparsity", "0.9", "--out", str(out)], capsys, out, seconds=5,
                   message="--sparsity 0.9 cannot be reached on smollm2-135m")
    assert "at most 0.8531 of the prunable parameters" in line and "lower --sparsity to 0.85" in line
    assert tree(converted_dir("smollm2-135m")) == cache and store_rows(store_dir) == []


# ------------------------------------------------------------------------------- output paths
def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    refused(["prune", *TINY, "--out", str(f)], capsys, None, f"--out {f} is a file, not a folder")
    assert f.read_text() == "keep me"


def test_out_below_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    refused(["prune", *TINY, "--out", str(f / "runs")], capsys, None, "is not a writable folder (Not a directory)")
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("code, words", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")])
def test_out_on_a_read_only_or_unwritable_filesystem(code, words, tmp_path, store_dir, capsys, monkeypatch):
    def refuse(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", refuse)  # the probe write, as the OS answers it
    out = tmp_path / "a" / "b"
    refused(["prune", *TINY, "--out", str(out)], capsys, out, f"is not a writable folder ({words})")
    assert not (tmp_path / "a").exists() and store_rows(store_dir) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_existing_unwritable_out_is_refused_before_the_run(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        refused(["prune", *TINY, "--out", str(out)], capsys, None, "is not a writable folder (Permission denied)")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def test_full_disk_leaves_no_record_and_the_run_failed(tmp_path, store_dir, capsys, monkeypatch):
    real = jsonio.os.fsync

    def full(fd):
        real(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(jsonio.os, "fsync", full)
    out = tmp_path / "out"
    refused(["prune", *TINY, "--out", str(out)], capsys, out, "No space left on device", seconds=None)
    (row,) = store_rows(store_dir)
    assert row["status"] == "failed" and "No space left on device" in row["error"]


def test_a_failed_model_save_leaves_neither_model_nor_record(tmp_path, store_dir, capsys, monkeypatch):
    """A save that stops after config.json (as kill -9 did): the record is written only after the
    model, so no "finished" record stands next to a partial model."""
    import structprune.checkpoint as checkpoint

    def partial(model, tokenizer, folder, provenance=None, **_kw):
        Path(folder).mkdir(parents=True)
        model.config.to_json_file(Path(folder) / "config.json")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "save_pruned", partial)
    out = tmp_path / "out"
    refused(["prune", *TINY, "--out", str(out), "--save-model"], capsys, out, "Input/output error", seconds=None)
    assert store_rows(store_dir)[0]["status"] == "failed"


def test_a_model_folder_with_only_config_json_is_one_error_line(folder_model, tmp_path, capsys):
    folder = folder_model()
    for f in folder.iterdir():
        if f.name != "config.json":
            f.unlink()
    refused(["eval", "--model", str(folder), "--seqlen", "16", "--windows", "1", "--data", "sotu"], capsys,
            message=f"cannot load the model in {folder}")


# ------------------------------------------------------------------------------ damaged models
def test_corrupt_config_json(folder_model, tmp_path, store_dir, capsys):
    folder = folder_model()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    out = tmp_path / "out"
    for argv in (["prune", "--model", str(folder), "--seqlen", "16", "--out", str(out)],
                 ["eval", "--model", str(folder), "--seqlen", "16"],
                 ["estimate", "--model", str(folder)]):
        line = refused(argv, capsys, out, "config.json is damaged (not valid JSON")
        assert "restore or re-create" in line
    assert store_rows(store_dir) == []


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"])
def test_nan_weights_are_refused_at_load_naming_the_tensor(tensor, folder_model, tmp_path, store_dir, capsys):
    folder = folder_model(edit=lambda m: m.get_parameter(tensor).view(-1)[3].fill_(float("nan")))
    out = tmp_path / "out"
    msg = f"weight {tensor} holds 1 non-finite value(s) (NaN)"
    refused(["prune", "--model", str(folder), "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1",
             "--device", "cpu", "--out", str(out)], capsys, out, msg)
    refused(["eval", "--model", str(folder), "--seqlen", "16", "--windows", "1"], capsys, None, msg)
    (row,) = store_rows(store_dir)  # it got past the settings: stored as failed, with the reason
    assert row["status"] == "failed" and msg in row["error"]


def test_finite_weights_whose_perplexity_overflows_fail_the_run(folder_model, tmp_path, store_dir, capsys):
    folder = folder_model(edit=lambda m: m.lm_head.weight.fill_(3e38))
    out = tmp_path / "out"
    refused(["prune", "--model", str(folder), "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1",
             "--device", "cpu", "--out", str(out)], capsys, out, "dense perplexity on sotu is not finite",
            seconds=None)
    (row,) = store_rows(store_dir)
    assert row["status"] == "failed" and "not finite" in row["error"]
    refused(["eval", "--model", str(folder), "--seqlen", "16", "--windows", "1"], capsys, None,
            "perplexity is not finite")


def test_non_finite_numbers_become_null_with_their_reason():
    from structprune.run import nonfinite_reason

    rec = jsonio.strict_record({"ppl": {"pruned": {"sotu": {"value": float("nan"), "finite": False}}},
                                "modules": [{"err": float("inf")}], "ok": 1.5})
    text = jsonio.dumps(rec)
    back = strict_load(text)
    assert back["ppl"]["pruned"]["sotu"]["value"] is None and back["modules"][0]["err"] is None
    assert back["nonfinite"] == {"ppl.pruned.sotu.value": "nan", "modules[0].err": "inf"} and back["ok"] == 1.5
    assert "pruned perplexity on sotu" in nonfinite_reason({}, rec["ppl"]["pruned"], {})
    assert nonfinite_reason({}, {}, {"pruned": float("nan")}).startswith("the run failed: calibration loss 'pruned'")
    assert nonfinite_reason({"sotu": {"value": 3.0, "finite": True}}, {}, {"pruned": 2.0}) is None


def test_a_failed_run_with_a_record_is_stored_failed_in_strict_json(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.start({"model": "tiny-llama"})
    store.fail(run_id, "the run failed: pruned perplexity on sotu is not finite",
               record={"ppl": {"pruned": {"sotu": {"value": float("inf")}}}, "status": "finished"})
    got = store.get(run_id)
    assert got["status"] == "failed" and got["record"]["status"] == "failed"
    assert got["record"]["nonfinite"] == {"ppl.pruned.sotu.value": "inf"}
    with sqlite3.connect(tmp_path / "runs.sqlite") as con:
        strict_load(con.execute("SELECT record FROM runs").fetchone()[0])


# ------------------------------------------------------------------------------------ corpora
def test_parquet_whose_text_column_holds_integers(folder_model, tmp_path, isolated_cache, capsys):
    import datasets

    bad = tmp_path / "ints.parquet"
    datasets.Dataset.from_dict({"text": [1, 2, 3]}).to_parquet(str(bad))
    out = tmp_path / "out"
    refused(["prune", "--model", str(folder_model()), "--seqlen", "16", "--calib-data", str(bad), "--out", str(out)],
            capsys, out, f"--calib-data {bad}: the 'text' column holds int64, not text")
    assert tree(isolated_cache) == []


def test_non_utf8_text_is_refused_and_a_failed_load_leaves_no_cache_folders(tmp_path, isolated_cache, capsys,
                                                                            monkeypatch):
    from structprune.data import corpora

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(corpora.CorpusUnavailableError, match="not UTF-8 text \\(byte 3\\)"):
        corpora.check_corpus(str(bad), "--calib-data")
    good = tmp_path / "good.txt"
    good.write_text("one paragraph\n\nanother paragraph\n")
    import datasets

    def half_done(*_a, cache_dir, **_k):  # what a datasets failure leaves: a builder folder and a lock
        (Path(cache_dir) / "text" / "default-0123").mkdir(parents=True)
        (Path(cache_dir) / "_x_text_default.lock").write_text("")
        raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset")

    monkeypatch.setattr(datasets, "load_dataset", half_done)
    with pytest.raises(corpora.CorpusUnavailableError, match="could not read"):
        corpora.load_corpus(str(good))
    assert not (isolated_cache / "corpora" / "hf-datasets").exists()


def test_single_line_text_is_cut_near_its_middle(tmp_path, isolated_cache):
    from structprune.data.corpora import halve, load_corpus

    words = " ".join(f"word{i}" for i in range(23000))  # ~220 KB on one line, newline at the end
    path = tmp_path / "one-line.txt"
    path.write_text(words + "\n")
    test, calib = load_corpus(str(path), "test")[0], load_corpus(str(path), "calib")[0]
    assert 0.45 < len(test) / len(words) < 0.55 and 0.45 < len(calib) / len(words) < 0.55
    assert (test + " " + calib).rstrip("\n") == words  # the loader keeps the final newline
    assert halve(["a" * 10 + "\n\n" + "b" * 10]) == ("a" * 10, "b" * 10)  # a paragraph break at the middle wins
    assert halve(["x" * 100 + "\n"]) == ("x" * 50, "x" * 50 + "\n")  # no break near the middle: the middle


def test_a_single_line_calibration_file_runs(folder_model, tmp_path, store_dir, isolated_cache, capsys):
    path = tmp_path / "one-line.txt"
    path.write_text(" ".join(f"state union {i}" for i in range(6000)) + "\n")
    out = tmp_path / "out"
    argv = ["prune", "--model", str(folder_model()), "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1",
            "--device", "cpu", "--calib-data", str(path), "--eval-data", str(path), "--out", str(out)]
    assert main(argv) == 0
    (record,) = out.glob("*.json")
    rec = strict_load(record.read_text())
    assert rec["status"] == "finished" and rec["config"]["calib_data"] == str(path)
    assert rec["ppl"]["pruned"][str(path)]["value"] > 1
    (row,) = store_rows(store_dir)
    assert row["status"] == "finished" and row["run_id"] == rec["run_id"]
    assert [p.name for p in out.iterdir()] == [record.name]  # no temporary files left


def test_a_seven_token_file_says_how_many_tokens_it_has(folder_model, tmp_path, isolated_cache, capsys):
    path = tmp_path / "tiny.txt"
    path.write_text("The state of our Union is strong\n")
    out = tmp_path / "out"
    line = refused(["prune", "--model", str(folder_model()), "--nsamples", "2", "--seqlen", "16", "--calib-data",
                    str(path), "--out", str(out)], capsys, out, f"--calib-data {path}: calibration seqlen 16 is longer")
    n = int(line.split("calibration text (")[1].split(" tokens")[0])
    assert n > 0, line


# ---------------------------------------------------------------------------------- run store
def test_cli_runs_are_recorded_in_the_store_unless_no_store(tmp_path, store_dir, capsys):
    out = tmp_path / "out"
    assert main(["prune", *TINY, "--out", str(out), "--save-model"]) == 0
    (record,) = out.glob("*.json")
    rec = strict_load(record.read_text())
    got = RunStore(store_dir).get(rec["run_id"])
    assert got["status"] == "finished" and got["record"]["sparsity"] == rec["sparsity"]
    assert rec["saved_model"] == str(out / f"model-{rec['run_id']}") and Path(rec["saved_model"]).is_dir()
    capsys.readouterr()
    assert main(["prune", *TINY, "--out", str(out), "--no-store"]) == 0
    assert len(store_rows(store_dir)) == 1 and len(list(out.glob("*.json"))) == 2


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_and_future_heartbeat_runs_are_failed_when_read_not_only_when_opened(tmp_path):
    store = RunStore(tmp_path)  # open once, as the app does
    killed, future, alive = store.start({"model": "a"}), store.start({"model": "b"}), store.start({"model": "c"})
    with sqlite3.connect(tmp_path / "runs.sqlite") as con:
        con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", (_dead_pid(), killed))
        con.execute("UPDATE runs SET pid = NULL, heartbeat = ? WHERE run_id = ?", (time.time() + 10 * 86400, future))
    status = {r["run_id"]: r["status"] for r in store.runs()}
    assert status == {killed: "failed", future: "failed", alive: "running"}
    assert "stopped" in store.get(killed)["error"] and set(store.recovered) == {killed, future}


def test_heartbeat_keeps_a_run_alive(tmp_path):
    store = RunStore(tmp_path, heartbeat_timeout=0.6)
    run_id = store.start({"model": "a"})
    with sqlite3.connect(tmp_path / "runs.sqlite") as con:
        con.execute("UPDATE runs SET pid = NULL WHERE run_id = ?", (run_id,))
    with store.heartbeat(run_id, interval=0.1):
        time.sleep(1.0)
        assert store.get(run_id)["status"] == "running"
    time.sleep(0.8)
    assert store.get(run_id)["status"] == "failed"


# ---------------------------------------------------------------------------- network exposure
def test_the_app_binds_localhost_however_it_is_started():
    import tomllib

    conf = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert conf["server"]["address"] == "127.0.0.1"
    doc = (ROOT / "docs/SECURITY.md").read_text()
    assert "--server.address=0.0.0.0" in doc and "no authentication" in doc
    assert "docs/SECURITY.md" in (ROOT / "README.md").read_text()
