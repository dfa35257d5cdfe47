"""The run store: every run the app starts, in one SQLite file in `paths.data_dir()`.

A run is inserted as "running" when it starts and carries a heartbeat (and its process id); it is
rewritten once, in one transaction, when it ends: "finished" with its record, or "failed" /
"cancelled" with the error (such a run whose weights streamed from disk may be resumed: `reopen`
makes it "running" again, resume.py). A process killed mid-run leaves a "running" row whose
process is gone (or whose heartbeat stopped, or lies further in the future than the timeout: a
clock set back); opening the store, and every read of its runs, marks such rows "failed", so a
run killed in another process never stays "running" in a long-lived reader (the app) and every
finished run stays readable. The command line records its runs here too (`structprune prune`, unless
`--no-store`), so the app's pages show them.

The same file keeps small JSON caches (`cache_put` / `cache_get`): the allocation explorer's energy
profiles and the Method page's solver step-through, so they survive a restart.

Every call opens its own connection, so any thread may use a `RunStore` (the app's worker does).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import RunNotFoundError, StructPruneError
from .jsonio import dumps, strict_record
from .paths import data_dir

log = logging.getLogger(__name__)

DB_NAME = "runs.sqlite"
HEARTBEAT_TIMEOUT_S = 120.0  # a running row whose heartbeat is older than this is dead
HEARTBEAT_INTERVAL_S = 15.0  # how often `heartbeat` beats (well inside the timeout)
STATUSES = ("running", "finished", "failed", "cancelled")
STREAMED_DIR, CHECKPOINTS_DIR = "streamed", "checkpoints"  # the runs' files, under the store's folder
TRASH_PREFIX = ".deleting-"  # a deleted run's files, renamed aside until they are removed

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    created    TEXT NOT NULL,
    status     TEXT NOT NULL,
    model      TEXT,
    method     TEXT,
    allocation TEXT,
    sparsity   REAL,
    config     TEXT NOT NULL,
    record     TEXT,
    error      TEXT,
    host       TEXT,
    pid        INTEGER,
    heartbeat  REAL,
    ended      TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
CREATE TABLE IF NOT EXISTS cache (
    key     TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    value   TEXT NOT NULL
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json(obj) -> str:
    """Strict JSON (no NaN/Infinity): a record's non-finite numbers become null and are listed
    under its `nonfinite` key (jsonio.strict_record)."""
    return dumps(strict_record(obj) if isinstance(obj, dict) else obj)


def run_folder(store_folder: str | Path, run_id: str) -> Path:
    """Where a stored run (run store id) writes its pruned layers and its manifest (resume.py)."""
    return Path(store_folder) / STREAMED_DIR / run_id


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _remove(path: Path) -> None:
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    except OSError:  # a file still open elsewhere: the next delete tries again
        log.warning("could not remove %s", path, exc_info=True)


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class RunStore:
    """Runs and caches in `<folder>/runs.sqlite` (folder: `paths.data_dir()` by default).

    Opening it marks runs left "running" by a dead process as failed (`recover`).
    """

    def __init__(self, folder: str | Path | None = None, heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else data_dir()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DB_NAME
        self.checkpoints = self.folder / CHECKPOINTS_DIR  # where the Results page writes a run's model zip
        self.heartbeat_timeout = heartbeat_timeout
        with self._connect() as con:
            con.executescript(_SCHEMA)
        self.recovered: list[str] = []  # runs this instance marked failed (on opening, then on reads)
        self.recover()

    @classmethod
    def existing(cls, folder: str | Path | None = None) -> RunStore:
        """The store already in `folder` (default: `paths.data_dir()`); a reader given a folder with
        no store is refused in one line instead of creating an empty one at a mistyped path."""
        folder = Path(folder).expanduser() if folder is not None else data_dir()
        if not (folder / DB_NAME).is_file():
            raise RunNotFoundError(f"there is no run store in {folder} (no {DB_NAME}); give the folder the app or "
                                   "`structprune prune` stored its runs in (--store), or run one first")
        return cls(folder)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30.0)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.row_factory = sqlite3.Row
            with con:  # one transaction: committed on success, rolled back on an exception
                yield con
        finally:
            con.close()

    # --- a run's life ---------------------------------------------------------------------
    def start(self, config: dict, run_id: str | None = None) -> str:
        """Inserts a "running" row for a run about to start; returns its id."""
        run_id = run_id or uuid.uuid4().hex[:12]
        with self._connect() as con:
            con.execute(
                "INSERT INTO runs (run_id, created, status, model, method, allocation, sparsity, config, host, pid, "
                "heartbeat) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, _now(), config.get("model"), config.get("method"), config.get("allocation"),
                 config.get("sparsity"), _json(config), socket.gethostname(), os.getpid(), time.time()))
        return run_id

    def reopen(self, run_id: str) -> bool:
        """A failed or cancelled run continued from where it stopped (resume.py): "running" again,
        under this process. False when the run is not failed or cancelled (e.g. still running)."""
        self.recover()
        with self._connect() as con:
            cur = con.execute(
                "UPDATE runs SET status = 'running', error = NULL, ended = NULL, host = ?, pid = ?, heartbeat = ? "
                "WHERE run_id = ? AND status IN ('failed', 'cancelled')",
                (socket.gethostname(), os.getpid(), time.time(), run_id))
            return cur.rowcount == 1

    def beat(self, run_id: str) -> None:
        """Refreshes a running run's heartbeat."""
        with self._connect() as con:
            con.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ? AND status = 'running'", (time.time(), run_id))

    def finish(self, run_id: str, record: dict) -> None:
        """Stores the finished run's record (one transaction: all of it or nothing)."""
        rec = {**record, "run_id": run_id, "status": "finished"}
        with self._connect() as con:
            con.execute(
                "UPDATE runs SET status = 'finished', record = ?, error = NULL, ended = ?, heartbeat = ?, "
                "allocation = COALESCE(?, allocation) WHERE run_id = ?",
                (_json(rec), _now(), time.time(), record.get("allocation_scheme"), run_id))

    def fail(self, run_id: str, error: str, cancelled: bool = False, record: dict | None = None) -> None:
        """Marks a run failed (or cancelled) with the error message, and its record when it has one
        (a run whose perplexity was not finite)."""
        status = "cancelled" if cancelled else "failed"
        rec = None if record is None else _json({**record, "run_id": run_id, "status": status, "error": error})
        with self._connect() as con:
            con.execute("UPDATE runs SET status = ?, error = ?, ended = ?, heartbeat = ?, record = COALESCE(?, record) "
                        "WHERE run_id = ?", (status, error, _now(), time.time(), rec, run_id))

    @contextmanager
    def heartbeat(self, run_id: str, interval: float = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
        """Beats `run_id` every `interval` seconds from a thread while the block runs (a missed beat
        is logged, never raised: the run goes on)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.beat(run_id)
                except Exception:  # noqa: BLE001
                    log.warning("heartbeat of run %s failed", run_id, exc_info=True)

        thread = threading.Thread(target=beat, name="structprune-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def recover(self) -> list[str]:
        """Marks as failed every "running" row whose process is gone (same host) or whose heartbeat
        is more than `heartbeat_timeout` old, or as far in the future (a clock set back, a damaged
        row: it would otherwise never go stale); returns their ids."""
        host, now = socket.gethostname(), time.time()
        dead = []
        with self._connect() as con:
            for row in con.execute("SELECT run_id, host, pid, heartbeat FROM runs WHERE status = 'running'"):
                stale = row["heartbeat"] is None or abs(now - row["heartbeat"]) > self.heartbeat_timeout
                gone = row["host"] == host and row["pid"] is not None and not _process_alive(row["pid"])
                if gone or stale:
                    dead.append(row["run_id"])
            for run_id in dead:
                con.execute(
                    "UPDATE runs SET status = 'failed', ended = ?, error = ? WHERE run_id = ?",
                    (_now(), "the process running this run stopped (killed or crashed) before it finished",
                     run_id))
        if dead:
            log.warning("marked %d interrupted run(s) failed: %s", len(dead), ", ".join(dead))
            self.recovered.extend(dead)
        return dead

    # --- reading --------------------------------------------------------------------------
    def runs(self, status: str | None = None) -> list[dict]:
        """Summaries (no record), newest first: run_id, created, status, model, method,
        allocation, sparsity, error, ended."""
        q = "SELECT run_id, created, status, model, method, allocation, sparsity, error, ended FROM runs"
        args: tuple = ()
        if status is not None:
            q, args = q + " WHERE status = ?", (status,)
        self.recover()
        with self._connect() as con:
            return [dict(r) for r in con.execute(q + " ORDER BY created DESC, rowid DESC", args)]

    def get(self, run_id: str) -> dict | None:
        """One run: its summary plus `config` and `record` (dicts; record None unless finished, or
        failed with a record)."""
        self.recover()
        with self._connect() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["config"] = json.loads(out["config"])
        out["record"] = json.loads(out["record"]) if out["record"] else None
        return out

    def records(self) -> list[dict]:
        """Records of every finished run, newest first."""
        self.recover()
        with self._connect() as con:
            rows = con.execute("SELECT record FROM runs WHERE status = 'finished' ORDER BY created DESC, rowid DESC")
            return [json.loads(r["record"]) for r in rows]

    def owned_paths(self, run_id: str) -> list[Path]:
        """The files a run keeps under the store's folder, present or not: the layers a run that
        streamed from disk wrote (`run_folder`) and the zip of its pruned model the Results page
        prepared (`checkpoints/<run_id>.zip`)."""
        return [run_folder(self.folder, run_id), self.checkpoints / f"{run_id}.zip"]

    def owned_bytes(self, run_id: str) -> int:
        return sum(_size(p) for p in self.owned_paths(run_id))

    def delete(self, run_id: str) -> int:
        """Deletes a run that has ended: its row, then the files it owns (`owned_paths`); returns the
        bytes freed. The files are first renamed aside, so a failure leaves the run whole, and a
        crash after the row is gone leaves only `.deleting-*` names, removed by the next delete.
        A running run is refused (cancel it first), as is an id the store does not have."""
        self._remove_leftovers()
        row = self.get(run_id)
        if row is None:
            raise RunNotFoundError(f"there is no run {run_id!r} in {self.path}; `structprune runs` lists them")
        if row["status"] == "running":
            raise StructPruneError(f"run {run_id} is still running; cancel it before deleting it")
        aside: list[tuple[Path, Path]] = []
        try:
            for path in self.owned_paths(run_id):
                if path.exists():
                    moved = path.with_name(TRASH_PREFIX + path.name)
                    path.rename(moved)
                    aside.append((path, moved))
            with self._connect() as con:
                if con.execute("DELETE FROM runs WHERE run_id = ? AND status != 'running'", (run_id,)).rowcount != 1:
                    raise StructPruneError(f"run {run_id} started again (resumed) meanwhile; cancel it first")
        except BaseException:
            for path, moved in reversed(aside):
                moved.rename(path)
            raise
        freed = sum(_size(moved) for _, moved in aside)
        for _, moved in aside:
            _remove(moved)
        return freed

    def _remove_leftovers(self) -> None:
        for parent in (self.folder / STREAMED_DIR, self.folder / CHECKPOINTS_DIR):
            for moved in parent.glob(TRASH_PREFIX + "*"):
                _remove(moved)

    # --- small JSON caches ---------------------------------------------------------------------
    def cache_put(self, key: str, value: dict) -> None:
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO cache (key, created, value) VALUES (?, ?, ?)",
                        (key, _now(), _json(value)))

    def cache_get(self, key: str) -> dict | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM cache WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else None

    def cache_keys(self, prefix: str = "") -> list[str]:
        with self._connect() as con:
            rows = con.execute("SELECT key FROM cache WHERE key LIKE ? ORDER BY created DESC", (prefix + "%",))
            return [r["key"] for r in rows]


__all__ = ["RunStore", "run_folder", "STATUSES", "DB_NAME", "HEARTBEAT_TIMEOUT_S", "HEARTBEAT_INTERVAL_S"]
