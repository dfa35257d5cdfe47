"""Resuming a killed disk-streamed run (resume.py): for every family, a run stopped after layer k
and resumed gives the uninterrupted run's model bit for bit (kept units, every tensor, the
perplexity); a process killed with SIGKILL, a full disk and non-finite weights leave a folder that
is marked incomplete and resumes; a resume with other settings, of another model, of a finished
run or of a folder that is no run is refused in one line before any work."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from structprune import resume as resume_mod
from structprune import weights as weights_mod
from structprune.atomic import MARK
from structprune.config import PruneConfig
from structprune.engine import PruneEngine
from structprune.errors import NonFiniteResultError, OutputWriteError
from structprune.methods import get_method
from structprune.models import build_tiny, load_model
from structprune.resume import MANIFEST, ResumeError, RunJournal, stats_from_tensors, stats_to_tensors
from structprune.run import run_prune

ROOT = Path(__file__).resolve().parent.parent
# every family, each with settings that exercise what a resume must carry over: the measured
# sensitivities (pass 1's calibration loss), the dense target (the dense model's activations
# replayed too), the block refit (seeded per layer)
FAMILIES = {"tiny-llama": {"energy": "sensitivity", "sensitivity_windows": 2}, "tiny-llama-mha": {},
            "tiny-opt": {"target": "dense"}, "tiny-gemma3": {"refine_epochs": 1}}
KILL_AT = {"tiny-llama": 2, "tiny-llama-mha": 1, "tiny-opt": 2, "tiny-gemma3": 1}  # first layer not finished


class Killed(Exception):
    pass


def _cfg(name: str, **kw) -> PruneConfig:
    base = dict(model=name, sparsity=0.4, nsamples=4, seqlen=16, eval_windows=1)
    return PruneConfig(**{**base, **FAMILIES[name], **kw})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """family -> (model folder, the uninterrupted disk run): computed once per family."""
    root = tmp_path_factory.mktemp("resume")
    done = {}

    def get(name: str):
        if name not in done:
            folder = root / name
            build_tiny(name).save_pretrained(folder)
            res = run_prune(_cfg(name), load_model(str(folder), on_disk=True), layer_dir=root / f"{name}-full",
                            evaluate_dense=False)
            done[name] = folder, res
        return done[name]

    return get


def _kill_after(layer: int):
    def hook(ev):
        if ev.stage == "pass2" and ev.layer == layer:
            raise Killed(f"killed after layer {layer}")
    return hook


def _killed_run(name: str, folder: Path, layer_dir: Path, after: int) -> None:
    """A disk-streamed run killed once layer `after` is written (its folder stays resumable)."""
    with pytest.raises(Killed):
        run_prune(_cfg(name), load_model(str(folder), on_disk=True), layer_dir=layer_dir,
                  on_event=_kill_after(after), evaluate_dense=False)


def _resume(name: str, folder: Path, layer_dir: Path, **kw):
    events = []
    res = run_prune(_cfg(name), load_model(str(folder), on_disk=True), resume=layer_dir, on_event=events.append,
                    evaluate_dense=False, **kw)
    return res, events


def _assert_same_model(a, b) -> None:
    kept = lambda r: [(m["layer"], m["module"], m["kept"]) for m in r.record["modules"]]  # noqa: E731
    assert kept(a) == kept(b)
    assert a.record["allocation"] == b.record["allocation"]
    names = sorted(a.weights.files)
    assert names == sorted(b.weights.files)
    for n in names:  # every tensor of the pruned model: the layers' shards, embeddings, norms, head
        assert torch.equal(a.weights.get(n), b.weights.get(n)), n
    assert a.record["ppl"]["pruned"] == b.record["ppl"]["pruned"]
    assert a.record["calib_loss"] == b.record["calib_loss"]


def _manifest(layer_dir: Path) -> dict:
    return json.loads((layer_dir / MANIFEST).read_text())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_run_killed_at_layer_k_resumes_to_the_uninterrupted_model(uninterrupted, tmp_path, name):
    folder, full = uninterrupted(name)
    k = KILL_AT[name]
    _killed_run(name, folder, tmp_path / "run", after=k - 1)
    m = _manifest(tmp_path / "run")
    assert m["status"] == "running" and [e["index"] for e in m["layers"]] == list(range(k))
    assert m["pass1"] is not None and m["plan"] == [{"attn": a, "mlp": b} for a, b in _plan(full)]
    assert not (tmp_path / "run" / MARK).exists()
    res, events = _resume(name, folder, tmp_path / "run")
    _assert_same_model(full, res)
    assert res.record["weights"]["resumed_at_layer"] == k
    assert res.record["run_id"] == m["run_id"]
    assert not [e for e in events if e.stage == "pass1"]  # pass 1's statistics were read back, not recomputed
    replayed = [e.layer for e in events if e.stage == "pass2" and "forward only" in e.message]
    assert replayed == list(range(k))
    assert _manifest(tmp_path / "run")["status"] == "finished"


def _plan(res) -> list[tuple[int, int]]:
    by = {(m["layer"], m["module"]): m["kept"] for m in res.record["modules"]}
    return [(by[(i, "attn")], by[(i, "mlp")]) for i in range(res.record["model"]["n_layers"])]


def test_a_process_killed_with_sigkill_mid_run_resumes_to_the_uninterrupted_model(uninterrupted, tmp_path):
    name = "tiny-llama"
    folder, full = uninterrupted(name)
    flag, run = tmp_path / "layer-1-done", tmp_path / "run"
    child = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from structprune.config import PruneConfig
from structprune.models import load_model
from structprune.run import run_prune
def hook(ev):
    if ev.stage == "pass2" and ev.layer == 1:
        open({str(flag)!r}, "w").close()
        time.sleep(600)
cfg = PruneConfig.from_dict({_cfg(name).to_dict()!r})
run_prune(cfg, load_model({str(folder)!r}, on_disk=True), layer_dir={str(run)!r}, on_event=hook, evaluate_dense=False)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t = time.time()
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() - t < 900, "the child never finished layer 1"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [e["index"] for e in _manifest(run)["layers"]] == [0, 1]
    res, _ = _resume(name, folder, run)
    _assert_same_model(full, res)
    assert res.record["weights"]["resumed_at_layer"] == 2


def test_a_damaged_shard_or_pass1_file_is_computed_again(uninterrupted, tmp_path):
    name = "tiny-llama-mha"
    folder, full = uninterrupted(name)
    run = tmp_path / "run"
    _killed_run(name, folder, run, after=0)
    for f in (run / "layer-00000.safetensors", run / "pass1.safetensors"):  # same size, other bytes
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    res, events = _resume(name, folder, run)
    assert res.record["weights"]["resumed_at_layer"] == 0
    assert [e.layer for e in events if e.stage == "pass1" and e.layer >= 0] == [0, 1]
    _assert_same_model(full, res)


def test_a_full_disk_gives_one_line_leaves_the_run_incomplete_and_it_resumes(uninterrupted, tmp_path, monkeypatch):
    name = "tiny-llama"
    folder, full = uninterrupted(name)
    save = weights_mod.save_file

    def full_disk_at_layer_2(state, path, *a, **kw):
        if any(".layers.2." in n for n in state):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(state, path, *a, **kw)

    monkeypatch.setattr(weights_mod, "save_file", full_disk_at_layer_2)
    run = tmp_path / "run"
    with pytest.raises(OutputWriteError) as err:
        run_prune(_cfg(name), load_model(str(folder), on_disk=True), layer_dir=run, evaluate_dense=False)
    msg = str(err.value)
    assert "\n" not in msg and "cannot write pruned layer 2" in msg and "No space left on device" in msg
    assert f"--resume {run}" in msg
    m = _manifest(run)
    assert m["status"] == "running" and [e["index"] for e in m["layers"]] == [0, 1]
    assert sorted(p.name for p in run.glob("layer-*")) == ["layer-00000.safetensors", "layer-00001.safetensors"]
    assert not (run / MARK).exists()
    # then the manifest's own write fails once layer 3 is written: that layer is solved again
    monkeypatch.setattr(weights_mod, "save_file", save)
    write_json = resume_mod.write_json

    def full_disk_after_layer_3(path, obj, *a, **kw):
        if any(e["index"] == 3 for e in obj["layers"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_json(path, obj, *a, **kw)

    monkeypatch.setattr(resume_mod, "write_json", full_disk_after_layer_3)
    with pytest.raises(OutputWriteError, match="cannot write the run's manifest .*No space left on device"):
        _resume(name, folder, run)
    assert [e["index"] for e in _manifest(run)["layers"]] == [0, 1, 2]
    monkeypatch.setattr(resume_mod, "write_json", write_json)  # space freed
    res, _ = _resume(name, folder, run)
    _assert_same_model(full, res)
    assert res.record["weights"]["resumed_at_layer"] == 3


def test_resumes_that_cannot_be_are_refused_in_one_line_before_any_work(uninterrupted, tmp_path):
    name = "tiny-llama"
    folder, full = uninterrupted(name)
    run = tmp_path / "run"
    _killed_run(name, folder, run, after=0)
    other = tmp_path / "other-weights"
    build_tiny(name, seed=1).save_pretrained(other)  # the same shapes, other weights
    cases = [
        (_cfg(name, sparsity=0.3), str(folder), run,
         f"--resume {run} was run with --sparsity 0.4, not 0.3; rerun with the same settings or start a new run"),
        (_cfg(name, refit=False), str(folder), run, f"--resume {run} was run with --refit, not --no-refit"),
        (_cfg(name, seed=3), str(folder), run, "was run with --seed 0, not 3"),
        (_cfg(name, weights="memory"), str(folder), run, "continues a run whose weights stream from disk"),
        (_cfg(name), str(other), run, "was run on another model than this one (its weights file model.safetensors "
                                      "differs)"),
        (_cfg(name), str(folder), tmp_path, "is not a resumable run (it has no structprune-run.json)"),
        (_cfg(name), str(folder), tmp_path / "nowhere", "is not a folder"),
        (_cfg(name), str(folder), full.layer_dir, f"run {full.record['run_id']} already finished"),
    ]
    for cfg, model, where, expected in cases:
        events = []
        with pytest.raises(ResumeError) as err:
            run_prune(cfg, load_model(model, on_disk=True), resume=where, on_event=events.append)
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert events == []  # refused before the run's first step
    # one process at a time: a second one is refused while the first holds the run
    held = RunJournal.resume(run, _cfg(name, model=str(folder)))
    try:
        with pytest.raises(ResumeError, match="another process is running this run"):
            RunJournal.resume(run, _cfg(name, model=str(folder)))
    finally:
        held.close()
    # the evaluation may change: its corpora and windows are not part of the pruned model
    res = run_prune(_cfg(name, eval_windows=2), load_model(str(folder), on_disk=True), resume=run, evaluate_dense=False)
    assert [m["kept"] for m in res.record["modules"]] == [m["kept"] for m in full.record["modules"]]
    assert res.record["ppl"]["pruned"]["random"]["windows"] == 2


def test_a_disk_run_refuses_a_layer_whose_pruned_weights_are_not_finite(uninterrupted, tmp_path):
    name = "tiny-llama-mha"
    folder, _ = uninterrupted(name)
    cfg = _cfg(name)
    base = get_method(cfg.method)

    class Overflows(base):
        def rule(self, kind, i, W, b, G, lay, k_keep, **kw):
            res = super().rule(kind, i, W, b, G, lay, k_keep, **kw)
            if i == 1 and kind == "mlp":
                res.W = torch.full_like(res.W, float("nan"))
            return res

    run = tmp_path / "run"
    with pytest.raises(NonFiniteResultError, match="the pruned weights of layer 1 are not finite"):
        run_prune(cfg, load_model(str(folder), on_disk=True), method=Overflows(cfg), layer_dir=run,
                  evaluate_dense=False)
    assert [e["index"] for e in _manifest(run)["layers"]] == [0]
    assert sorted(p.name for p in run.glob("layer-*")) == ["layer-00000.safetensors"]


def test_pass1_statistics_survive_the_disk_bit_for_bit():
    cfg = PruneConfig(model="tiny-opt", sparsity=0.4, nsamples=4, seqlen=16, energy="sensitivity",
                      sensitivity_windows=2)
    method = get_method(cfg.method)(cfg)
    p1 = PruneEngine(build_tiny("tiny-opt"), "cpu", method).pass1(torch.randint(0, 512, (4, 16)))
    tensors, meta = stats_to_tensors(p1)
    back = stats_from_tensors(tensors, json.loads(json.dumps(meta)), p1.weigh)
    assert back.calib_loss == p1.calib_loss and "dense" in back.calib_loss
    for a, b in zip(p1.stats, back.stats):
        assert a.layout == b.layout and a.out_energy == b.out_energy and a.sensitivity == b.sensitivity
        assert (a.residual_energy, a.outlier_ratio, a.residual_energy_hm) == \
            (b.residual_energy, b.outlier_ratio, b.residual_energy_hm)
        assert a.scores.keys() == b.scores.keys() and all(torch.equal(a.scores[k], b.scores[k]) for k in a.scores)
        assert set(a.sensitivity) == {"attn", "mlp"}


def test_cli_resume_takes_the_runs_settings_refuses_a_differing_flag_and_finishes_the_stored_run(
        uninterrupted, tmp_path, monkeypatch, capsys):
    from structprune.checkpoint import load_pruned
    from structprune.cli import main
    from structprune.store import RunStore

    name = "tiny-llama"
    folder, full = uninterrupted(name)
    monkeypatch.setenv("STRUCTPRUNE_DATA", str(tmp_path / "data"))
    save = weights_mod.save_file

    def full_disk_at_layer_1(state, path, *a, **kw):
        if any(".layers.1." in n for n in state):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(state, path, *a, **kw)

    monkeypatch.setattr(weights_mod, "save_file", full_disk_at_layer_1)
    args = ["prune", "--model", str(folder), "--weights", "disk", "--sparsity", "0.4", "--nsamples", "4",
            "--seqlen", "16", "--eval-windows", "1", "--energy", "sensitivity", "--sensitivity-windows", "2",
            "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot write pruned layer 1 into ") and "No space left on device" in err
    (row,) = RunStore(tmp_path / "data").runs()
    run = tmp_path / "data" / "streamed" / row["run_id"]
    assert row["status"] == "failed" and f"--resume {run}" in row["error"]
    assert not (tmp_path / "runs").exists()  # no record, no model of an unfinished run
    assert resume_mod.resumable_runs(RunStore(tmp_path / "data"))[0]["finished_layers"] == 1
    monkeypatch.setattr(weights_mod, "save_file", save)
    assert main(["prune", "--resume", str(run), "--sparsity", "0.3"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --resume {run} was run with --sparsity 0.4, not 0.3; rerun "
                                               "with the same settings or start a new run")
    # only --out and --save-model given: every setting is the run's own
    assert main(["prune", "--resume", str(run), "--out", str(tmp_path / "runs"), "--save-model"]) == 0
    (row,) = RunStore(tmp_path / "data").runs()
    assert row["status"] == "finished"
    rec = json.loads((tmp_path / "runs" / f"{row['run_id']}.json").read_text())
    assert rec["weights"]["resumed_at_layer"] == 1 and rec["config"]["energy"] == "sensitivity"
    assert [m["kept"] for m in rec["modules"]] == [m["kept"] for m in full.record["modules"]]
    pruned, _ = load_pruned(tmp_path / "runs" / f"model-{row['run_id']}")
    for n, p in pruned.state_dict().items():
        if n in full.weights:
            assert torch.equal(p, full.weights.get(n)), n
    assert resume_mod.resumable_runs(RunStore(tmp_path / "data")) == []
    assert main(["prune", "--resume", str(run)]) == 2
    assert "already finished" in capsys.readouterr().err


def test_spilled_activations_on_a_full_disk_are_a_one_line_error_not_a_crash(tmp_path, monkeypatch):
    from structprune import streaming
    from structprune.streaming import ActivationSpill

    spill = ActivationSpill(tmp_path / "run" / "activations", budget_bytes=0)
    t = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mapped = spill.place(t)
    assert torch.equal(mapped, t) and spill.spilled_bytes == t.numel() * 4

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(streaming.os, "posix_fallocate", full)  # the blocks are reserved before the map is written
    with pytest.raises(OutputWriteError, match=r"cannot spill calibration activations .*\(No space left on device\).*"
                                                f"--resume {tmp_path / 'run'}$"):
        spill.place(t)
    assert list((tmp_path / "run" / "activations").iterdir()) == []
