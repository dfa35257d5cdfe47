"""Long work off the page: one background thread per job, one job at a time per process.

The app submits a prune run (or an energy-profile pass, a step-through) and returns at once; the
worker thread calls the library inside a `cancel.cancel_scope` of the job's cancel flag, so every
long loop of the library stops within one batch or solver step of a Cancel click, and appends
every `ProgressEvent` to the job. The job turns them into the progress bar's value, a line saying
which stage runs now, and the time left (from planning.py's estimate per stage, at the pace
measured so far). The page polls `JobRunner.current()` from a timer fragment. The worker makes no
Streamlit calls.

A second submission while a job runs is refused with `JobBusyError` (never interleaved: two runs
would share the CPU and the device and both would be slow). Prune runs are written to the run
store: "running" with a heartbeat at the start, then the record (or the error) when they end.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import planning
from .cancel import cancel_scope
from .config import PruneConfig
from .errors import RunCancelledError, StructPruneError
from .model_cache import ModelCache
from .pipeline import ProgressEvent
from .store import RunStore

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0


class JobBusyError(StructPruneError):
    """A job is already running in this app process."""


# what each stage of a job is called on its progress bar, and what its steps count
STAGE_LABELS = {
    "load": ("loading the model, once per app process", "step"),
    "prepare": ("preparing the run", "step"),
    "eval-dense": ("evaluating the dense model", "window"),
    "heldout-dense": ("held-out loss of the dense model", "window"),
    "pass1": ("pass 1: statistics of the dense model", "window"),
    "sensitivity": ("pass 1: loss sensitivity of each module", "module"),
    "pass2": ("pass 2: pruning", "step"),
    "losses-pruned": ("calibration and held-out loss of the pruned model", "window"),
    "eval-pruned": ("evaluating the pruned model", "window"),
    "speed": ("timing the pruned model against dense", "step"),
    "gram": ("streaming the calibration windows to the layer", "layer"),
    "admm": ("ADMM, iteration by iteration", "iteration"),
    "solves": ("solving with each selector", "selector"),
}
STAGE_ALIASES = {"embed": "pass1"}  # sub-steps reported under their stage's name
TRUST_AFTER = 0.25  # share of the estimated work after which the measured pace replaces the estimate's


@dataclass
class Job:
    """One unit of background work and everything the page shows about it.

    `stages`: the estimated seconds of each stage the job goes through, in order (planning.py's
    phase model); the progress bar's value is the estimated work done, and the time left is the
    estimate's rest at the pace measured so far."""

    kind: str  # "prune" | "profile" | "stepthrough" | ...
    label: str
    config: dict
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # = the run id in the store
    status: str = "running"  # running | finished | failed | cancelled
    events: list[ProgressEvent] = field(default_factory=list)
    error: str | None = None
    result: Any = None  # PruneResult (prune) or EnergyProfile (profile)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    stages: dict[str, float] = field(default_factory=dict)
    cancel_asked: float | None = None  # when Cancel was clicked
    event_times: list[float] = field(default_factory=list)  # wall time each event arrived
    _shown: float = field(default=0.0, init=False, repr=False)  # the bar never moves back

    @property
    def active(self) -> bool:
        return self.status == "running"

    @property
    def record(self) -> dict | None:
        return getattr(self.result, "record", None)

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.time()) - self.started

    @property
    def cancelling(self) -> bool:
        """Cancel was asked and the worker has not stopped yet."""
        return self.active and self.cancel_event.is_set()

    def add(self, event: ProgressEvent) -> None:
        """The library's on_event: keeps the event and when it came."""
        self.event_times.append(time.time())
        self.events.append(event)

    def on_window(self, done: int, total: int) -> None:
        """An evaluation window batch finished (cancel.window_done): a step of the current stage."""
        last = self.events[-1] if self.events else None
        self.add(ProgressEvent(last.stage if last else "evaluating", -1, last.n_layers if last else 1,
                               time.time() - self.started, last.device_bytes if last else 0,
                               last.peak_bytes if last else 0, "", done, total))

    def progress(self) -> tuple[float, str]:
        """(fraction done in [0, 1], a line saying what runs now)."""
        frac, where = self._progress()
        if self.cancelling:
            since = time.time() - (self.cancel_asked or time.time())
            return frac, f"cancelling ({since:.0f} s): stops within one batch or solver step"
        return frac, where

    def progress_value(self) -> float:
        return self._progress()[0]

    def where(self) -> str:
        return self._progress()[1]

    def remaining_s(self) -> float | None:
        """Seconds left: the estimated work left at the pace measured so far (the estimate's own pace
        until TRUST_AFTER of the work is done, blended in between); None without an estimate."""
        total = sum(self.stages.values())
        if not self.active or total <= 0:
            return None
        done = self._work_done()
        at = (self.event_times[-1] if self.event_times else self.started) - self.started
        trust = min(done / (TRUST_AFTER * total), 1.0)
        pace = (1 - trust) + trust * (at / done if done > 0 else 1.0)
        return max((total - done) * pace - (time.time() - self.started - at), 0.0)

    def _stage(self) -> tuple[str, float, str]:
        """(stage, share of it done, where it is in words) from the last event."""
        if not self.events:
            return "prepare", 0.0, "starting"
        ev = self.events[-1]
        stage = STAGE_ALIASES.get(ev.stage, ev.stage)
        label, unit = STAGE_LABELS.get(stage, (stage, "step"))
        if ev.steps > 0:
            done, n = ev.step, ev.steps
        elif ev.layer >= 0:
            done, n, unit = ev.layer + 1, max(ev.n_layers, 1), "layer"
        else:
            done, n = 0, 0
        where = label
        if n:
            where += f", {unit} {done + 1}/{n}" if done < n else f", {n}/{n} {unit}s done"
        if ev.message:
            where += f" ({ev.message})"
        return stage, (done / n if n else 0.0), where

    def _work_done(self) -> float:
        """Estimated seconds of work done: the stages before the current one and its share."""
        stage, share, _ = self._stage()
        keys = list(self.stages)
        if stage not in self.stages:
            return self._shown * sum(self.stages.values())
        i = keys.index(stage)
        return sum(self.stages[k] for k in keys[:i]) + self.stages[stage] * share

    def _progress(self) -> tuple[float, str]:
        if self.events and self.events[-1].stage == "done":
            return 1.0, "done"
        _, share, where = self._stage()
        total = sum(self.stages.values())
        frac = self._work_done() / total if total > 0 else share
        self._shown = max(self._shown, min(frac, 0.99))
        return self._shown, where

    def memory_points(self) -> list[dict]:
        """[{t (s), mib, peak_mib, label}] from the events so far: the live memory timeline."""
        return [{"t": e.elapsed_s, "mib": e.device_bytes / 2**20, "peak_mib": e.peak_bytes / 2**20,
                 "label": e.stage if e.layer < 0 else f"{e.stage} layer {e.layer + 1}"} for e in list(self.events)]


class JobRunner:
    """Runs at most one job at a time in a daemon thread. Shared by every session of the app."""

    def __init__(self, keep: int = 20) -> None:
        self._lock = threading.Lock()
        self._jobs: list[Job] = []
        self._keep = keep
        self.stats_cache: dict = {}  # run_prune's pass-1 statistics, shared by runs and profiles
        self.models = ModelCache()  # the models jobs and pages load, once per process

    def current(self) -> Job | None:
        """The running job, else the most recent one (None before the first)."""
        with self._lock:
            running = [j for j in self._jobs if j.active]
            return running[-1] if running else (self._jobs[-1] if self._jobs else None)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs if j.job_id == job_id), None)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    @property
    def busy(self) -> bool:
        job = self.current()
        return job is not None and job.active

    def cancel(self) -> bool:
        """Asks the running job to stop (within one batch or solver step: cancel.py); False when none runs."""
        job = self.current()
        if job is None or not job.active:
            return False
        if job.cancel_asked is None:
            job.cancel_asked = time.time()
        job.cancel_event.set()
        return True

    # --- submitting -----------------------------------------------------------------------
    def submit_prune(self, cfg: PruneConfig, loaded=None, store: RunStore | None = None,
                     on_done: Callable[[Job], None] | None = None, resume: str | Path | None = None) -> Job:
        """Starts `run_prune(cfg, loaded)` in the background; the run is stored in `store`.
        `loaded` None: the job loads the model itself, so Cancel works from the first second: into
        `self.models` (kept for later runs), or a layer at a time when the run streams from disk
        (run.streams_from_disk); such a run writes its layers into the store's `streamed/<run id>`
        and can be resumed. `resume`: the layer folder of an interrupted run to continue."""
        from .preflight import preflight
        from .resume import inspect, run_folder
        from .run import run_prune, streams_from_disk

        if loaded is None:
            preflight(cfg)  # bad settings refused here, before a job or a store row exists
        on_disk = resume is not None or (loaded is None and streams_from_disk(cfg))
        name = loaded.name if loaded is not None else cfg.model
        job = Job("prune", f"{cfg.method} · {cfg.allocation} · s={cfg.sparsity:g} · {name}", cfg.to_dict(),
                  stages=self._stages_with_load(cfg.model, loaded, on_disk,
                                                lambda config: planning.run_stages(config, cfg, measure_speed=True)))
        if resume is not None:
            job.job_id = inspect(resume)["run_id"]
            job.label += " · resumed"
        layer_dir = run_folder(store.folder, job.job_id) if store is not None and resume is None else None

        def work():
            model = loaded if loaded is not None or on_disk else self.load(cfg.model, job.add)
            before = set(self.stats_cache)
            res = run_prune(cfg, model, on_event=job.add, cancel=job.cancel_event, stats_cache=self.stats_cache,
                            layer_dir=layer_dir, resume=resume, run_id=job.job_id, measure_speed=True)
            if store is not None:
                store.finish(job.job_id, res.record)
                try:
                    if model is not None:
                        self._store_new_profiles(store, cfg, model, before)
                except Exception:  # noqa: BLE001 - the run itself is stored; the profile is a bonus
                    log.warning("could not store the energy profile of run %s", job.job_id, exc_info=True)
            return res

        return self._start(job, work, store, on_done, reopen=resume is not None)

    def submit_resume(self, folder: str | Path, store: RunStore | None = None,
                      on_done: Callable[[Job], None] | None = None) -> Job:
        """Continues the interrupted run in `folder` (resume.py) with its own settings, under its
        own run id: its store row runs again and ends finished (or failed) like any run."""
        from .resume import check_resume, resume_config

        cfg = resume_config(folder)
        check_resume(folder, cfg)  # a finished run, another model: refused here, not in the worker
        return self.submit_prune(cfg, None, store, on_done, resume=folder)

    def submit_profile(self, cfg: PruneConfig, loaded=None, store: RunStore | None = None,
                       on_done: Callable[[Job], None] | None = None) -> Job:
        """Computes an energy profile (pass 1 alone) in the background and caches it in `store`;
        `loaded` None: the job loads the model (into `self.models`)."""
        from .explorer import compute_energy_profile, profile_key
        from .preflight import preflight

        if loaded is None:
            preflight(cfg)
        job = Job("profile", f"energies · {loaded.name if loaded else cfg.model} · {cfg.nsamples}x{cfg.seqlen}",
                  cfg.to_dict(), stages=self._stages_with_load(cfg.model, loaded, False,
                                                               lambda config: planning.profile_stages(config, cfg)))

        def work():
            model = loaded if loaded is not None else self.load(cfg.model, job.add)
            prof = compute_energy_profile(cfg, model, on_event=job.add, cancel=job.cancel_event,
                                          stats_cache=self.stats_cache)
            if store is not None:
                store.cache_put(profile_key(model.name, cfg), prof.to_dict())
            return prof

        return self._start(job, work, None, on_done)

    def load(self, name: str, on_event: Callable[[ProgressEvent], None] | None = None):
        """The model `name` from `self.models`, loaded there first if needed (a "load" stage for
        `on_event`); inside a job, Cancel ends the wait (model_cache.py)."""
        if on_event is not None and not self.models.cached(name):
            on_event(ProgressEvent("load", -1, 1, 0.0, 0, 0, name))
        return self.models.get(name)

    def _stages_with_load(self, name: str, loaded, on_disk: bool,
                          stages: Callable[[Any], dict[str, float]]) -> dict[str, float]:
        """`stages(model config)`, after a "load" stage when the job will load the model first."""
        from .estimate import load_config

        def estimate() -> dict[str, float]:
            config = loaded.model.config if loaded is not None else load_config(name)
            return {**({} if loaded is not None or on_disk else self.load_stage(name, config)), **stages(config)}

        return _stages(estimate)

    def load_stage(self, name: str, config) -> dict[str, float]:
        """{"load": estimated seconds} while `name` is not loaded yet, else {}: the first stage of a
        job that calls `load(name)`."""
        return {} if self.models.cached(name) else {"load": planning.load_seconds(config)}

    def submit_call(self, kind: str, label: str, config: dict, fn: Callable[..., Any],
                    on_done: Callable[[Job], None] | None = None, stages: dict[str, float] | None = None) -> Job:
        """Runs `fn(on_event, cancel)` in the background (any other library call with progress);
        `stages`: its estimated seconds per stage, in order (planning.py), for the bar and the time left."""
        job = Job(kind, label, config, stages=dict(stages or {}))
        return self._start(job, lambda: fn(job.add, job.cancel_event), None, on_done)

    def _store_new_profiles(self, store: RunStore, cfg: PruneConfig, loaded, before: set) -> None:
        """A structprune run's pass-1 statistics also make an energy profile for the explorer."""
        from .adapters import adapter_for
        from .explorer import profile_from_stats, profile_key
        from .units import layouts_of, module_specs

        if cfg.method != "structprune":
            return
        for key in set(self.stats_cache) - before:
            stats = self.stats_cache[key].stats
            if stats:
                specs = module_specs(layouts_of(loaded.model, adapter_for(loaded.model)), cfg.align_channels)
                prof = profile_from_stats(stats, specs, loaded.name, cfg)
                store.cache_put(profile_key(loaded.name, cfg, prof.sensitivity is not None), prof.to_dict())

    def _start(self, job: Job, work: Callable[[], Any], store: RunStore | None,
               on_done: Callable[[Job], None] | None, reopen: bool = False) -> Job:
        with self._lock:
            running = next((j for j in self._jobs if j.active), None)
            if running is not None:
                raise JobBusyError(
                    f"a run is already in progress ({running.label}, {running.elapsed_s:.0f} s so far); "
                    "wait for it to finish or cancel it first")
            self._jobs = (self._jobs + [job])[-self._keep:]
        if store is not None:
            if not (reopen and store.reopen(job.job_id)):  # a resumed run not in this store gets a new row
                store.start(job.config, run_id=job.job_id)
        threading.Thread(target=self._run, args=(job, work, store, on_done), name=f"structprune-{job.kind}",
                         daemon=True).start()
        return job

    def _run(self, job: Job, work, store: RunStore | None, on_done) -> None:
        stop_beat = threading.Event()
        if store is not None:
            def beat():
                while not stop_beat.wait(HEARTBEAT_S):
                    try:
                        store.beat(job.job_id)
                    except Exception:  # noqa: BLE001 - a missed heartbeat must not kill the run
                        log.warning("heartbeat of run %s failed", job.job_id, exc_info=True)

            threading.Thread(target=beat, name="structprune-heartbeat", daemon=True).start()
        try:
            with cancel_scope(job.cancel_event, job.on_window):  # every long loop checks Cancel (cancel.py)
                job.result = work()
            job.status = "finished"
        except RunCancelledError:
            job.status, job.error = "cancelled", "cancelled by the user"
        except StructPruneError as exc:  # the library's own messages say what to do
            job.status, job.error = "failed", str(exc)
        except MemoryError:
            job.status, job.error = "failed", "the host ran out of memory; lower nsamples / seqlen"
        except Exception as exc:  # noqa: BLE001 - anything else: shown in the page, logged in full
            log.exception("job %s failed", job.job_id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            stop_beat.set()
            job.ended = time.time()
            if store is not None and job.status != "finished":
                try:
                    store.fail(job.job_id, job.error or "failed", cancelled=job.status == "cancelled")
                except Exception:  # noqa: BLE001
                    log.exception("could not record the end of run %s", job.job_id)
            if on_done is not None:
                on_done(job)


def _stages(estimate: Callable[[], dict[str, float]]) -> dict[str, float]:
    """A job's stage estimates, or none (a bar without a time left) when the model cannot be estimated."""
    try:
        return estimate()
    except Exception:  # noqa: BLE001 - an estimate is a convenience; the job runs without one
        log.warning("no time estimate for this job", exc_info=True)
        return {}


def export_checkpoint_zip(result, folder: str | Path) -> Path:
    """The pruned model of a finished run (PruneResult) as `<folder>/<run_id>.zip`, written with
    `checkpoint.save_pruned`: the unzipped folder loads with plain transformers (docs/EXPORT.md) or
    `load_model(<unzipped folder>)`."""
    import shutil
    import tempfile

    from .checkpoint import save_pruned

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rec = result.record
    target = folder / f"{rec['run_id']}.zip"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        model_dir = Path(tmp) / f"structprune-{rec['run_id']}"
        provenance = {k: rec.get(k) for k in ("run_id", "method", "config", "sparsity", "created")}
        save_pruned(result.model, result.tokenizer, model_dir, provenance=provenance, record=rec)
        archive = shutil.make_archive(str(Path(tmp) / rec["run_id"]), "zip", root_dir=tmp, base_dir=model_dir.name)
        Path(archive).replace(target)
    return target


__all__ = ["Job", "JobRunner", "JobBusyError", "HEARTBEAT_S", "STAGE_LABELS", "export_checkpoint_zip"]
