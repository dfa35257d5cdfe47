"""The `structprune` command line: every subcommand's --help, a tiny prune saved and reloaded, the memory
estimate, and refusals as one `error:` line with exit status 2."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch

from structprune import cli
from structprune.cli import build_parser, main
from structprune.config import MAX_SPARSITY, PruneConfig


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_every_subcommand_has_a_working_help(capsys):
    names = _subcommands()
    assert set(names) == {"prepare", "models", "eval", "prune", "export", "runs", "estimate"}
    for name in names:
        assert main([name, "--help"]) == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: structprune {name}"), name


def test_help_comes_from_pruneconfig_with_ranges_and_defaults(capsys):
    d = PruneConfig()
    assert main(["prune", "--help"]) == 0
    prune = _flat(capsys.readouterr().out)
    assert f"to remove (0 to {MAX_SPARSITY}; default: {d.sparsity})" in prune
    assert "0 = off" in prune and "nats" not in prune  # what it does, no measured figures
    for name in ("eval", "estimate"):
        assert main([name, "--help"]) == 0
        out = _flat(capsys.readouterr().out)
        assert f"(default: {d.model})" in out and f"(at least 2; default: {d.seqlen})" in out
        assert f"windows per forward batch (at least 1; default: {d.batch_size})" in out
    assert main(["estimate", "--help"]) == 0
    out = _flat(capsys.readouterr().out)
    assert f"calibration windows (at least 1; default: {d.nsamples})" in out and f"(default: {d.dtype})" in out


def test_eval_and_estimate_defaults_are_pruneconfigs():
    d = PruneConfig()
    ev = build_parser().parse_args(["eval"])
    assert (ev.model, ev.seqlen, ev.batch_size, ev.device, ev.data, ev.windows) == (
        d.model, d.seqlen, d.batch_size, d.device, d.eval_data[0], d.eval_windows)
    est = build_parser().parse_args(["estimate"])
    assert (est.model, est.method, est.nsamples, est.seqlen, est.batch_size, est.dtype) == (
        d.model, d.method, d.nsamples, d.seqlen, d.batch_size, d.dtype)


def test_percent_signs_in_help_strings_reach_the_help_text(monkeypatch, capsys):
    monkeypatch.setattr(cli, "help_for", lambda name: f"{name}: keeps 50% (or 100%) of the units")
    assert main(["prune", "--help"]) == 0
    assert "sparsity: keeps 50% (or 100%) of the units" in _flat(capsys.readouterr().out)


def test_prune_a_tiny_model_saves_a_loadable_model(tmp_path, capsys, monkeypatch):
    from structprune.checkpoint import load_pruned

    monkeypatch.setenv("STRUCTPRUNE_DATA", str(tmp_path / "store"))  # the run is recorded there, not in the user's

    argv = ["prune", "--model", "tiny-llama", "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1",
            "--device", "cpu", "--out", str(tmp_path), "--save-model"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (record,) = tmp_path.glob("*.json")
    rec = json.loads(record.read_text())
    assert rec["status"] == "finished"
    assert rec["config"]["nsamples"] == 2 and rec["config"]["seqlen"] == 16 and rec["config"]["sparsity"] == 0.3
    assert f"record: {record}" in out
    folder = tmp_path / f"model-{rec['run_id']}"
    assert f"pruned model: {folder}" in out
    model, _tokenizer = load_pruned(folder)
    assert sum(p.numel() for p in model.parameters()) == rec["params"]["after"]["total"]
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 16, model.config.vocab_size) and torch.isfinite(logits).all()


def test_estimate_prints_the_estimators_json(capsys):
    from structprune.estimate import estimate_memory, load_config

    assert main(["estimate", "--model", "tiny-llama", "--nsamples", "4", "--seqlen", "32"]) == 0
    est = json.loads(capsys.readouterr().out)
    want = estimate_memory(load_config("tiny-llama"), "structprune", 4, 32, "float32", batch_size=1, host_grams=True)
    assert est["peak_bytes"] > 0 and est["peak_bytes"] == want["peak_bytes"]
    assert est["method"] == "structprune"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "tiny-llama", "--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["eval", "--model", "tiny-llama", "--windows", "0"], "--windows must be at least 1 (got 0)"),
    (["estimate", "--model", "tiny-llama", "--nsamples", "0"], "--nsamples must be at least 1 (got 0)"),
    (["prune", "--model", "tiny-llama", "--sparsity", "0.95"], f"sparsity must be between 0 and {MAX_SPARSITY}"),
    (["prune", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["prune", "--nsamples", "many"], "argument --nsamples: invalid int value: 'many'"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
])
def test_refusals_are_one_error_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in _one_error_line(capsys)


def test_temperature_inf_parses_to_the_uniform_limit():
    args = build_parser().parse_args(["prune", "--temperature", "inf"])
    assert math.isinf(args.temperature)


def test_runs_lists_the_store_and_deletes_a_run_with_its_files(tmp_path, capsys):
    from structprune.store import RunStore

    store = RunStore(tmp_path)
    done, running = store.start({"model": "tiny-llama", "method": "structprune", "allocation": "softmax",
                                 "sparsity": 0.3}), store.start({"model": "tiny-opt", "method": "wanda-sp"})
    store.finish(done, {"allocation_scheme": "softmax"})
    (tmp_path / "streamed" / done).mkdir(parents=True)
    (tmp_path / "streamed" / done / "layer-000.safetensors").write_bytes(b"x" * 3 * 2**20)
    assert main(["runs", "--store", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"2 runs in {store.path}"
    row = next(line for line in lines if line.startswith(done))
    assert "finished" in row and "tiny-llama" in row and "30%" in row and "files 3 MiB" in row
    assert main(["runs", "--store", str(tmp_path), "--delete", done]) == 0
    assert capsys.readouterr().out.strip() == f"deleted {done} (3 MiB of files freed)"
    assert not (tmp_path / "streamed" / done).exists() and [r["run_id"] for r in store.runs()] == [running]
    assert main(["runs", "--store", str(tmp_path), "--delete", running]) == 2
    assert "still running; cancel it before deleting it" in _one_error_line(capsys)


def test_runs_and_export_refuse_a_folder_without_a_store_and_create_nothing(tmp_path, capsys):
    typo = tmp_path / "runz"
    assert main(["runs", "--store", str(typo)]) == 2
    assert f"there is no run store in {typo} (no runs.sqlite)" in _one_error_line(capsys)
    assert main(["export", "abc123", "--out", str(tmp_path / "m"), "--store", str(typo)]) == 2
    assert "there is no run store" in _one_error_line(capsys)
    assert not typo.exists()
