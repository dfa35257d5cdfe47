"""How the comparison grid's cells run: one after another in this process (`sequential`), or as Ray
tasks (`ray`) on a local Ray started on demand or on an existing cluster (`address`).

Both executors call the same task function, `task(settings, cell, cache) -> dict`, and hand every
outcome to the driver's `on_outcome`, which writes it: workers never touch the results folder, so
a cluster needs no shared filesystem. A task that raises is an outcome with an error, never the
end of the sweep; the other cells finish.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

EXECUTORS = ("sequential", "ray")
RAY_TEMP_DIR = "/tmp/structprune-ray"  # short: Ray's socket paths must stay under 107 bytes
RAY_OBJECT_STORE_BYTES = 256 * 2**20  # records are small; the shared machine's /dev/shm is not ours
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a variant at a sparsity and seed, named by its record's key."""

    key: str
    variant: object  # variants.Variant (kept opaque: this module knows nothing of pruning)
    sparsity: float
    seed: int


def error_info(exc: BaseException) -> dict:
    """What a failure record keeps of an exception: type, one-line message, traceback, where."""
    return {"type": type(exc).__name__, "message": str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            "traceback": "".join(traceback.format_exception(exc)), "host": socket.gethostname(), "pid": os.getpid()}


def guarded(task, settings: dict, cell: Cell, cache: dict) -> dict:
    """Runs `task`; an exception becomes {"error": error_info}. KeyboardInterrupt still stops."""
    try:
        return task(settings, cell, cache)
    except Exception as exc:  # noqa: BLE001 - a failing cell is recorded, the grid goes on
        return {"error": error_info(exc)}


class CellProgress:
    """A one-line progress bar over the grid's cells on stderr (like the CLI's per-layer bar);
    `log` prints a line above it."""

    def __init__(self, total: int, skipped: int = 0, stream=None) -> None:
        self.total, self.done, self.failed, self.skipped = total, skipped, 0, skipped
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.width = 0

    def line(self) -> str:
        n = max(self.total, 1)
        bar = "#" * int(30 * self.done / n)
        ran = self.done - self.skipped
        elapsed = time.perf_counter() - self.t0
        eta = f"  eta {elapsed / ran * (self.total - self.done):6.0f}s" if 0 < ran and self.done < self.total else ""
        failed = f"  {self.failed} failed" if self.failed else ""
        return f"sweep        [{bar:<30}] cell {self.done}/{self.total}{failed}  {elapsed:7.1f}s{eta}"

    def draw(self) -> None:
        text = self.line()
        self.stream.write("\r" + text.ljust(self.width))
        self.width = len(text)
        self.stream.flush()

    def log(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.width) + "\n")
        self.width = 0
        self.draw()

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        self.draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run_sequential(task, settings: dict, cells: list[Cell], cache: dict, on_outcome) -> None:
    """Every cell in this process, in order. `cache` is the driver's (it sees each merge)."""
    for cell in cells:
        on_outcome(cell, guarded(task, settings, cell, cache))


def ray_init(address: str | None, num_cpus: int | None, num_gpus: int | None = None) -> bool:
    """Joins the cluster at `address`, or starts a local Ray on loopback (no dashboard, no usage
    report, temp files under /tmp). Returns whether this call started or joined it (so the caller
    shuts it down); a Ray already initialised in this process (a test's) is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report
    if address:
        # the driver's code travels with the job: the cluster's nodes need the dependencies, not this checkout
        modules = [str(REPO / "structprune"), str(REPO / "benchmarks")]
        ray.init(address=address, runtime_env={"py_modules": modules, "excludes": ["results/", "__pycache__/"]},
                 log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", _temp_dir=RAY_TEMP_DIR, object_store_memory=RAY_OBJECT_STORE_BYTES,
                 log_to_driver=True)
    return True


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run_ray(task, settings: dict, cells: list[Cell], cache: dict, on_outcome, cpus_per_task: int,
            gpus_per_task: int = 0) -> None:
    """Every cell as a Ray task (Ray must be initialised: see ray_init) asking for `cpus_per_task`
    CPUs and `gpus_per_task` GPUs; outcomes reach `on_outcome` in the order they finish. A task
    whose worker dies (killed, out of memory) is a failed outcome like a task that raised."""
    import ray

    remote = ray.remote(guarded).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)
    task_ref, settings_ref, cache_ref = ray.put(task), ray.put(settings), ray.put(dict(cache))
    pending = {remote.remote(task_ref, settings_ref, cell, cache_ref): cell for cell in cells}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the worker died: no Python exception to catch there
                out = {"error": error_info(exc)}
            on_outcome(cell, out)
    finally:
        for ref in pending:  # interrupted: stop what is still queued or running
            ray.cancel(ref, force=True)
