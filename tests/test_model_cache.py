"""The app's models are loaded inside its jobs (model_cache.py, jobs.JobRunner.load): once per process,
shared by every job and page, and a Cancel click ends a job that is still waiting for its model."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import wait_until
from structprune.cancel import cancel_scope
from structprune.config import PruneConfig
from structprune.errors import InvalidConfigError, RunCancelledError, UnknownModelError
from structprune.jobs import STAGE_LABELS, JobRunner
from structprune.model_cache import ModelCache
from structprune.models import load_model

TINY = dict(model="tiny-llama", nsamples=4, seqlen=32, eval_windows=2, device="cpu", sparsity=0.3)


class GatedLoader:
    """A loader that blocks until `release` is set, counting its calls (a slow disk, made exact)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def __call__(self, name: str):
        self.calls.append(name)
        assert self.release.wait(60), "never released"
        return load_model(name)


def test_a_model_is_loaded_once_for_every_caller_and_the_oldest_is_dropped():
    loader = GatedLoader()
    cache = ModelCache(max_entries=2, loader=loader)
    got = []
    waiters = [threading.Thread(target=lambda: got.append(cache.get("tiny-llama"))) for _ in range(3)]
    for w in waiters:
        w.start()
    time.sleep(0.3)
    assert not cache.cached("tiny-llama") and not got  # all three wait for the one load
    loader.release.set()
    for w in waiters:
        w.join(30)
    assert loader.calls == ["tiny-llama"] and len(got) == 3 and got[0] is got[1] is got[2]
    assert cache.get(" tiny-llama ") is got[0]  # the name as the form sends it
    cache.get("tiny-opt")
    cache.get("tiny-llama")  # used last: tiny-opt is now the oldest
    cache.get("tiny-gemma3")
    assert loader.calls == ["tiny-llama", "tiny-opt", "tiny-gemma3"]
    assert cache.cached("tiny-llama") and cache.cached("tiny-gemma3") and not cache.cached("tiny-opt")


def test_a_failed_load_reaches_the_caller_and_is_tried_again():
    cache = ModelCache()
    for _ in range(2):
        with pytest.raises(UnknownModelError, match="unknown model"):
            cache.get("no-such-model")
    assert not cache.cached("no-such-model")


def test_cancel_ends_the_wait_and_the_load_still_fills_the_cache():
    loader = GatedLoader()
    cache = ModelCache(loader=loader)
    flag, raised = threading.Event(), []

    def wait():
        with cancel_scope(flag):
            try:
                cache.get("tiny-llama")
            except RunCancelledError as exc:
                raised.append((exc, time.monotonic()))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    clicked = time.monotonic()
    flag.set()
    waiter.join(10)
    # within the app's bar of 5 s (it takes one 0.1 s wait step), while the load still runs
    assert raised and raised[0][1] - clicked < 5.0
    loader.release.set()
    wait_until(lambda: cache.cached("tiny-llama"))
    assert cache.get("tiny-llama").name == "tiny-llama" and loader.calls == ["tiny-llama"]


def test_a_run_loads_its_model_in_the_job_and_cancel_works_while_it_loads():
    runner = JobRunner()
    loader = GatedLoader()
    runner.models = ModelCache(loader=loader)
    job = runner.submit_prune(PruneConfig(**TINY))
    assert list(job.stages)[0] == "load" and job.stages["load"] > 0  # the estimate has the load
    wait_until(lambda: job.events)
    assert job.where().startswith(STAGE_LABELS["load"][0])
    clicked = time.time()
    assert runner.cancel()
    wait_until(lambda: not job.active, timeout=10)
    assert job.status == "cancelled" and job.ended - clicked < 5.0
    loader.release.set()
    wait_until(lambda: runner.models.cached("tiny-llama"))
    # the next run finds the model loaded: no load stage, and the run finishes
    again = runner.submit_prune(PruneConfig(**TINY))
    assert "load" not in again.stages
    wait_until(lambda: not again.active)
    assert again.status == "finished", again.error
    assert loader.calls == ["tiny-llama"] and again.events[0].stage == "prepare"


def test_a_profile_job_loads_its_model_too_and_bad_settings_are_refused_before_a_job():
    runner = JobRunner()
    job = runner.submit_profile(PruneConfig(**TINY))
    wait_until(lambda: not job.active)
    assert job.status == "finished", job.error
    assert [e.stage for e in job.events][:2] == ["load", "prepare"]
    with pytest.raises(InvalidConfigError, match="cannot apply to tiny-llama"):
        runner.submit_prune(PruneConfig(**{**TINY, "calib_data": "brown"}))
    with pytest.raises(UnknownModelError):
        runner.submit_prune(PruneConfig(**{**TINY, "model": "no-such-model"}))
    assert runner.jobs() == [job]  # neither refusal started a job
