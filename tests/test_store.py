"""The run store (SQLite) and the background worker: atomic records, restart, killed processes,
one job at a time."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from structprune.errors import RunCancelledError, StructPruneError
from structprune.jobs import JobBusyError, JobRunner
from structprune.store import RunStore

RECORD = {"schema": "structprune.run/1", "method": "structprune", "allocation_scheme": "softmax",
          "sparsity": {"target": 0.3}, "ppl": {"pruned": {"sotu": {"value": 30.5, "protocol": "sotu-test · seqlen 32"}}}}
CONFIG = {"model": "tiny-llama", "method": "structprune", "allocation": "softmax", "sparsity": 0.3}


def test_finished_run_is_stored_whole_and_reopens(tmp_path):
    store = RunStore(tmp_path)
    rid = store.start(CONFIG)
    assert store.get(rid)["status"] == "running" and store.get(rid)["record"] is None
    store.finish(rid, {**RECORD, "big": list(range(20000)), "ppl_inf": float("inf")})
    again = RunStore(tmp_path)  # a restart
    row = again.get(rid)
    assert row["status"] == "finished" and row["error"] is None
    assert row["record"]["run_id"] == rid and row["record"]["big"] == list(range(20000))
    assert row["record"]["ppl_inf"] is None  # JSON has no inf: stored as null, never invalid JSON
    assert again.records()[0]["ppl"] == RECORD["ppl"]
    assert [r["run_id"] for r in again.runs(status="finished")] == [rid]


def test_failed_and_cancelled_runs_keep_their_error(tmp_path):
    store = RunStore(tmp_path)
    a, b = store.start(CONFIG), store.start(CONFIG)
    store.fail(a, "seqlen 1000 exceeds the model's context of 256 tokens")
    store.fail(b, "cancelled by the user", cancelled=True)
    rows = {r["run_id"]: r for r in RunStore(tmp_path).runs()}
    assert rows[a]["status"] == "failed" and "exceeds" in rows[a]["error"]
    assert rows[b]["status"] == "cancelled"
    assert RunStore(tmp_path).records() == []


def test_a_record_that_cannot_be_written_leaves_the_row_untouched(tmp_path):
    store = RunStore(tmp_path)
    rid = store.start(CONFIG)
    with pytest.raises(TypeError):
        store.finish(rid, {**RECORD, "bad": object()})
    row = store.get(rid)
    assert row["status"] == "running" and row["record"] is None


_CHILD = textwrap.dedent("""
    import sys, time
    from structprune.store import RunStore
    store = RunStore(sys.argv[1])
    done = store.start({"model": "tiny-llama", "method": "structprune"}, run_id="earlier")
    store.finish(done, {"schema": "structprune.run/1", "ppl": {"pruned": {}}, "note": "kept"})
    store.start({"model": "smollm2-135m", "method": "structprune"}, run_id="killed")
    print("ready", flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(60)
    else:  # keep rewriting a large record until killed: the kill lands inside a write
        big = {"schema": "structprune.run/1", "blob": "x" * 2_000_000}
        i = 0
        while True:
            store.finish(store.start({"model": "m"}, run_id=f"w{i}"), {**big, "i": i})
            i += 1
""")


def _spawn(folder, mode):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_process_killed_mid_run_is_marked_failed_and_earlier_runs_survive(tmp_path):
    proc = _spawn(tmp_path, "sleep")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    store = RunStore(tmp_path)  # the next app start
    assert store.recovered == ["killed"]
    killed, earlier = store.get("killed"), store.get("earlier")
    assert killed["status"] == "failed" and "stopped" in killed["error"]
    assert earlier["status"] == "finished" and earlier["record"]["note"] == "kept"
    assert RunStore(tmp_path).recovered == []  # only once


def test_kill_during_writes_never_leaves_a_partial_record(tmp_path):
    proc = _spawn(tmp_path, "write")
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    store = RunStore(tmp_path)
    rows = store.runs()
    assert len(rows) >= 3
    for r in rows:
        assert r["status"] in ("finished", "failed")
        if r["status"] == "finished":
            assert store.get(r["run_id"])["record"] is not None  # complete, parseable JSON
    with sqlite3.connect(tmp_path / "runs.sqlite") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_stale_heartbeat_of_a_live_process_is_failed_fresh_one_kept(tmp_path):
    store = RunStore(tmp_path, heartbeat_timeout=0.5)
    fresh, stale = store.start(CONFIG), store.start(CONFIG)
    time.sleep(0.8)
    store.beat(fresh)
    reopened = RunStore(tmp_path, heartbeat_timeout=0.5)
    assert reopened.recovered == [stale]
    assert reopened.get(fresh)["status"] == "running"


def test_cache_round_trip(tmp_path):
    store = RunStore(tmp_path)
    store.cache_put("profile|m|x", {"a": [1.0, 2.0]})
    store.cache_put("other|y", {"b": 1})
    assert RunStore(tmp_path).cache_get("profile|m|x") == {"a": [1.0, 2.0]}
    assert store.cache_keys("profile|") == ["profile|m|x"]
    assert store.cache_get("missing") is None


def _waiting_job(release: threading.Event):
    def work(on_event, cancel):
        while not release.wait(0.01):
            if cancel.is_set():
                raise RunCancelledError("run cancelled")
        return "done"
    return work


def test_runner_refuses_a_second_job_and_cancels():
    runner, release = JobRunner(), threading.Event()
    job = runner.submit_call("prune", "first", {}, _waiting_job(release))
    assert runner.busy
    with pytest.raises(JobBusyError, match="already in progress"):
        runner.submit_call("prune", "second", {}, _waiting_job(release))
    assert runner.cancel()
    for _ in range(300):
        if not job.active:
            break
        time.sleep(0.01)
    assert job.status == "cancelled" and not runner.busy
    second = runner.submit_call("prune", "after", {}, _waiting_job(release))
    release.set()
    for _ in range(300):
        if not second.active:
            break
        time.sleep(0.01)
    assert second.status == "finished" and second.result == "done"


@pytest.mark.parametrize("energy", ["sensitivity", "residual"])
def test_runner_stores_a_tiny_prune_and_its_energy_profile(tmp_path, energy):
    from structprune.config import PruneConfig
    from structprune.explorer import EnergyProfile, profile_key
    from structprune.models import load_model

    store, runner = RunStore(tmp_path), JobRunner()
    cfg = PruneConfig(model="tiny-llama", nsamples=4, seqlen=32, eval_windows=2, device="cpu", energy=energy)
    loaded = load_model("tiny-llama")
    job = runner.submit_prune(cfg, loaded, store)
    for _ in range(1200):
        if not job.active:
            break
        time.sleep(0.05)
    assert job.status == "finished", job.error
    row = store.get(job.job_id)
    assert row["status"] == "finished" and row["record"]["run_id"] == job.job_id
    assert row["record"]["allocation"] == job.record["allocation"]
    assert job.progress()[0] == 1.0 and job.memory_points()
    # a residual-energy run measures no sensitivities: its profile is stored under the "no sens" key
    prof = EnergyProfile.from_dict(store.cache_get(profile_key("tiny-llama", cfg, energy == "sensitivity")))
    energies = [r["energy"] for r in row["record"]["allocation"]]
    assert prof.energies(energy) == pytest.approx(energies, rel=1e-4)  # the run's own energies
    json.dumps(prof.to_dict())


def _owned_files(store: RunStore, rid: str) -> None:
    layers = store.folder / "streamed" / rid
    layers.mkdir(parents=True)
    (layers / "layer-000.safetensors").write_bytes(b"x" * 1000)
    store.checkpoints.mkdir(exist_ok=True)
    (store.checkpoints / f"{rid}.zip").write_bytes(b"z" * 500)


def test_delete_removes_an_ended_run_and_its_files_and_nothing_else(tmp_path):
    store = RunStore(tmp_path)
    keep, gone = store.start(CONFIG), store.start(CONFIG)
    for rid in (keep, gone):
        store.finish(rid, RECORD)
        _owned_files(store, rid)
    store.cache_put("profile|x", {"a": 1})
    assert store.owned_bytes(gone) == 1500
    assert store.delete(gone) == 1500
    assert store.get(gone) is None and [r["run_id"] for r in store.runs()] == [keep]
    assert not (tmp_path / "streamed" / gone).exists() and not (store.checkpoints / f"{gone}.zip").exists()
    assert store.owned_bytes(keep) == 1500 and store.cache_get("profile|x") == {"a": 1}
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == [keep]  # nothing left aside
    failed = store.start(CONFIG)
    store.fail(failed, "cancelled by the user", cancelled=True)
    assert store.delete(failed) == 0  # an interrupted run with no files yet


def test_delete_refuses_a_running_or_unknown_run_and_a_failed_delete_keeps_the_run(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    running = store.start(CONFIG)
    _owned_files(store, running)
    with pytest.raises(StructPruneError, match="still running; cancel it"):
        store.delete(running)
    with pytest.raises(StructPruneError, match="there is no run 'nope'"):
        store.delete("nope")
    assert store.owned_bytes(running) == 1500
    store.finish(running, RECORD)

    def locked(*_a, **_k):  # the database refuses the delete after the files were moved aside
        raise sqlite3.OperationalError("database is locked")

    real = store._connect
    monkeypatch.setattr(store, "_connect", lambda: _FailingDelete(real(), locked))
    with pytest.raises(sqlite3.OperationalError):
        store.delete(running)
    monkeypatch.undo()
    assert store.get(running)["status"] == "finished" and store.owned_bytes(running) == 1500  # all put back
    # a crash between the row's removal and the files' leaves only names set aside: the next delete clears them
    aside = tmp_path / "streamed" / ".deleting-0123"
    aside.mkdir()
    other = store.start(CONFIG)
    store.finish(other, RECORD)
    store.delete(other)
    assert not aside.exists()


class _FailingDelete:
    """A `_connect()` context whose DELETE statement raises."""

    def __init__(self, ctx, fail) -> None:
        self.ctx, self.fail = ctx, fail

    def __enter__(self):
        con = self.ctx.__enter__()
        outer = self

        class Con:
            def execute(self, sql, *args):
                if sql.startswith("DELETE"):
                    outer.fail()
                return con.execute(sql, *args)

        return Con()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)
