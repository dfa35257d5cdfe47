"""The comparison grid on Ray (benchmarks/sweep.py via compare.py): a local Ray of 2 CPUs runs a
grid of tiny-model cells; its records equal the sequential executor's, a cell that raises is
recorded as failed while the others finish, and a second run skips the finished cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from benchmarks import compare
from benchmarks.sweep import ray_init
from benchmarks.variants import Variant
from structprune import reports

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--model", "tiny-llama", "--methods", "flap", "structprune", "--sparsities", "0.3", "0.5", "--extra-seeds",
        "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2"]
# fails inside the worker: sensitivities need 8 calibration windows, the grid has 4
BROKEN = Variant("structprune energy=sensitivity", "structprune",
                 (("allocation", "softmax"), ("energy", "sensitivity"), ("sensitivity_windows", 8)))


@pytest.fixture(scope="module")
def local_ray():
    assert ray_init(None, num_cpus=2)  # started here, so shut down here
    assert ray.cluster_resources()["CPU"] == 2
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _records(folder) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*__*.json")}


def _kept(rec: dict) -> list:
    return [(m["layer"], m["module"], m["kept"]) for m in rec["modules"]]


def test_ray_grid_matches_sequential_records_failures_and_resume(local_ray, one_thread, tmp_path, capsys):
    ray_dir, seq_dir = tmp_path / "ray", tmp_path / "seq"
    args = compare.resolve_args(compare.build_parser().parse_args(
        GRID + ["--executor", "ray", "--cpus-per-task", "1", "--results", str(ray_dir)]))
    compare.check_args(args)
    grid = compare.cells(args, compare.plan(args)) + compare.cells(args, [(BROKEN, 0.3, 0)])
    assert len(grid) == 5

    counts = compare.sweep(args, grid)
    assert counts == {"cells": 5, "skipped": 0, "finished": 4, "failed": 1}
    ray_recs = _records(ray_dir)
    assert sorted(ray_recs) == sorted(c.key for c in grid[:4])
    failure = json.loads((ray_dir / "failed" / f"{grid[4].key}.json").read_text())
    assert failure["schema"] == compare.FAILURE_SCHEMA and failure["status"] == "failed"
    assert failure["error"]["type"] == "SequenceLengthError"
    assert "sensitivity_windows (8) exceeds nsamples (4)" in failure["error"]["message"]
    assert "Traceback" in failure["error"]["traceback"]
    assert {r["benchmark"]["executor"] for r in ray_recs.values()} == {"ray"}
    assert {r["benchmark"]["threads"] for r in ray_recs.values()} == {1}  # threads follow --cpus-per-task
    assert "dense.json" in {p.name for p in ray_dir.iterdir()}  # the workers' dense references, written by the driver

    assert compare.main(GRID + ["--results", str(seq_dir), "--threads", "1"]) == 0
    seq_recs = _records(seq_dir)
    assert sorted(seq_recs) == sorted(ray_recs)
    for key, rec in seq_recs.items():
        other = ray_recs[key]
        assert rec["benchmark"]["executor"] == "sequential"
        assert _kept(rec) == _kept(other) and sum(k for *_, k in _kept(rec)) > 0
        assert rec["ppl"]["pruned"]["random"]["value"] == other["ppl"]["pruned"]["random"]["value"]
        assert rec["ppl"]["dense"]["random"]["value"] == other["ppl"]["dense"]["random"]["value"]
        assert rec["calib_loss"]["pruned"] == other["calib_loss"]["pruned"]
        assert rec["sparsity"] == other["sparsity"]

    # a second run (the command line this time) skips every finished cell and rewrites none
    capsys.readouterr()
    assert compare.main(GRID + ["--executor", "ray", "--results", str(ray_dir)]) == 0
    assert capsys.readouterr().err.count("skip   tiny-llama") == 4
    assert {k: r["run_id"] for k, r in _records(ray_dir).items()} == {k: r["run_id"] for k, r in ray_recs.items()}
    # the failed cell is retried by a run that has it, and fails again with the same error
    again = compare.sweep(args, grid)
    assert again == {"cells": 5, "skipped": 4, "finished": 0, "failed": 1}

    # the app's Compare page reads the sweep's records like any other (and not the failure record)
    runs, _ = reports.load_result_records(ray_dir)
    assert sorted(r["run_id"] for r in runs) == sorted(r["run_id"] for r in ray_recs.values())
    frame = reports.runs_frame(runs, "benchmark")
    assert len(frame) == 4 and set(frame["method"]) == {"flap", "structprune"}


def test_the_script_joins_a_running_cluster_and_writes_one_record_per_cell(local_ray, tmp_path):
    """`python benchmarks/compare.py --executor ray --address ...`: a second process joins the
    running Ray, ships its code with the job (py_modules) and writes the records itself."""
    address = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds its own checkout
    proc = subprocess.run(
        [sys.executable, "benchmarks/compare.py", *GRID[:2], "--methods", "flap", "--sparsities", "0.3", "0.5",
         *GRID[8:], "--executor", "ray", "--address", address, "--results", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path)
    assert sorted(recs) == ["tiny-llama__flap__s0.30__seed0__calib4x32__random-2",
                            "tiny-llama__flap__s0.50__seed0__calib4x32__random-2"]
    assert {r["benchmark"]["executor"] for r in recs.values()} == {"ray"}
    assert all(r["ppl"]["pruned"]["random"]["value"] > 1 for r in recs.values())
    assert ray.is_initialized()  # the script disconnected; the cluster it joined is still up


@pytest.mark.parametrize("argv, message", [
    (["--address", "auto"], "error: --address needs --executor ray"),
    (["--executor", "ray", "--cpus-per-task", "0"], "error: --cpus-per-task must be at least 1 (got 0)"),
    (["--executor", "ray", "--progress"], "error: --progress (per-layer lines) needs --executor sequential"),
    (["--executor", "ray", "--address", "auto", "--num-cpus", "2"], "error: --num-cpus sizes a local Ray"),
])
def test_bad_executor_settings_are_one_line_errors_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(GRID + ["--results", str(tmp_path)] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
