"""Runs that survive being killed: the journal of a disk-streamed run, and resuming it.

A run whose weights stream from disk (weights.py) keeps, in its layer folder next to the pruned
layers' shards, a manifest (`structprune-run.json`, rewritten atomically after every step):

- the run's fingerprint: every setting that changes the pruned model (not the evaluation's
  corpora or windows, nor where the weights stay), the resolved device, the method's class, the
  structprune and torch versions, and the model's identity (its config.json, its safetensors files' sizes,
  headers and 1 MiB of each one's data: a moved folder is the same model, other weights are not);
- pass 1's statistics, in `pass1.safetensors` (numbers bit for bit; a resume does not redo pass 1);
- the plan (units kept per module);
- every finished layer: its shard, size, SHA-256, pruned shape and its modules' infos.

`run_prune(cfg, resume=folder)` continues such a run: the settings are compared first (one line
naming the first difference, before any weights load), the finished shards are checked against
their sizes and checksums, the layers before the first unfinished one are given their pruned shapes
and read from their shards, and pass 2 runs them forward only, rebuilding the calibration
activations, before it solves the rest. On the CPU in float32 the result is bitwise the one of an
uninterrupted run (tests/test_resume.py). A run that ended is marked finished and is not resumed
again. A failed write (a full disk) leaves the manifest as it was after the last finished layer.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import tempfile
import uuid
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .adapters import LayerLayout, adapter_for
from .checkpoint import layer_shape, shrink_layer
from .config import PruneConfig
from .engine import Pass1
from .errors import InvalidConfigError, ModelLoadError, OutputWriteError, StructPruneError
from .evaluation import resolve_device
from .jsonio import write_json
from .memory import layer_weight_bytes
from .methods import get_method
from .models import model_folder
from .paths import data_dir
from .pipeline import LayerStats
from .store import STREAMED_DIR, run_folder  # a run's files are the store's; run_folder stays importable here
from .streaming import ActivationSpill
from .weights import INDEX, DiskResidency, LayerWriter, write_reason

log = logging.getLogger(__name__)

MANIFEST = "structprune-run.json"
PASS1_FILE = "pass1.safetensors"
SCHEMA = "structprune.resume/1"
# settings that do not change the pruned model: a resume may change them (model: compared by identity)
NOT_RESULT = ("model", "eval_data", "eval_windows", "weights", "device")


class ResumeError(StructPruneError, ValueError):
    """A folder that cannot be resumed, or a resume with other settings than the run had."""


# --- what a run is --------------------------------------------------------------------------------

def fingerprint(cfg: PruneConfig, method=None) -> dict:
    """Everything the pruned model depends on besides the model itself, as JSON values: the
    settings (the device resolved), the method's class (`method`: a variant instance, default
    cfg.method's) and the structprune and torch versions."""
    method = method or get_method(cfg.method)(cfg)
    fp = {"structprune": __version__, "torch": torch.__version__,
          "method_class": f"{type(method).__module__}.{type(method).__qualname__}"}
    fp.update({k: v for k, v in cfg.to_dict().items() if k not in NOT_RESULT})
    fp.update(device=str(resolve_device(cfg.device)), dtype=cfg.dtype)
    return fp


SAMPLES, SAMPLE_BYTES = 16, 1 << 16  # blocks of each weights file an identity hashes (1 MiB, spread over it)


def model_identity(folder: str | Path) -> dict:
    """The model a folder holds, without reading all of its weights: config.json's SHA-256 and, per
    safetensors file, its size and the SHA-256 of its header (tensor names, dtypes, shapes, offsets)
    and of SAMPLES blocks spread over its data (other weights of the same shapes differ there)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    files = {}
    for name in names:
        try:
            size = (folder / name).stat().st_size
            with open(folder / name, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                digest = hashlib.sha256(fh.read(n))
                for j in range(SAMPLES):
                    fh.seek(8 + n + (size - 8 - n) * j // SAMPLES)
                    digest.update(fh.read(SAMPLE_BYTES))
        except OSError as exc:
            raise ModelLoadError(f"{folder}: cannot read {name} ({exc.strerror}); the model folder is incomplete") from exc
        files[name] = {"bytes": size, "sha256_sampled": digest.hexdigest()}
    config = folder / "config.json"
    return {"config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None,
            "weights": files}


def _as_option(key: str, value) -> str:
    """A fingerprint entry as the user gave it: a CLI flag (the library's messages name flags)."""
    if key in ("structprune", "torch"):
        return f"{key} {value}"
    if key == "method_class":
        return f"the method class {value}"
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{key.replace('_', '-')}"
    if isinstance(value, list):
        return f"{flag} {' '.join(map(str, value))}"
    return f"{flag} {value}"


def check_fingerprint(folder: Path, was: dict, now: dict) -> None:
    """Refuses, in one line naming the first difference, a resume with other settings."""
    for key in dict.fromkeys([*was, *now]):
        if key not in was or key not in now:  # a setting one version has and the other does not
            raise ResumeError(f"--resume {folder} was run by another structprune version (it records "
                              f"{'no' if key not in was else 'a'} {key} setting); start a new run")
        if was[key] != now[key]:
            old, new = _as_option(key, was[key]), _as_option(key, now[key])
            flag = old.split(" ", 1)[0]
            if old.startswith("--") and new.startswith(flag + " "):  # "--sparsity 0.3, not 0.4"
                new = new[len(flag) + 1:]
            raise ResumeError(f"--resume {folder} was run with {old}, not {new}; rerun with the same settings "
                              "or start a new run")


def check_identity(folder: Path, manifest: dict, now: dict) -> None:
    was = manifest["model"]["identity"]
    what = None
    if was["config_sha256"] != now["config_sha256"]:
        what = "its config.json differs"
    else:
        for name in dict.fromkeys([*was["weights"], *now["weights"]]):
            if was["weights"].get(name) != now["weights"].get(name):
                what = f"its weights file {name} differs"
                break
    if what is not None:
        raise ResumeError(f"--resume {folder} was run on another model than this one ({what}); give the model it "
                          f"was run on (--model {manifest['model']['name']}) or start a new run")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a run that can be resumed; a one-line ResumeError for anything else."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ResumeError(f"--resume {folder} is not a folder; give the layer folder of an interrupted run whose "
                          "weights streamed from disk (printed when it started; the app lists them)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ResumeError(f"--resume {folder} is not a resumable run (it has no {MANIFEST}); only runs whose weights "
                          "stream from disk (--weights disk) can be resumed")
    try:
        manifest = json.loads(path.read_text())
        ok = manifest.get("schema") == SCHEMA and isinstance(manifest.get("layers"), list) and "status" in manifest
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ResumeError(f"--resume {folder}: its {MANIFEST} is unreadable or from another structprune version; "
                          "start a new run")
    if manifest["status"] == "finished":
        raise ResumeError(f"--resume {folder}: run {manifest['run_id']} already finished, there is nothing to resume; "
                          "start a new run to prune again")
    return manifest


def check_resume(folder: str | Path, cfg: PruneConfig, method=None, loaded=None) -> dict:
    """The manifest of the run `folder` holds, if `cfg` (and `method`) may continue it: every
    refusal in one line before any work (not resumable, finished, other settings, another model)."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    if cfg.weights == "memory":
        raise ResumeError(f"--resume {folder} continues a run whose weights stream from disk; drop --weights memory")
    check_fingerprint(folder, manifest["fingerprint"], fingerprint(cfg, method))
    check_identity(folder, manifest, model_identity(model_dir_of(cfg, loaded)))
    return manifest


def _lock(folder: Path):
    """An exclusive lock on the run's folder (released when the file closes or the process ends)."""
    try:
        fh = open(folder / ".lock", "a+")
    except OSError as exc:
        raise OutputWriteError(f"cannot write into the run's folder {folder} ({write_reason(exc)})") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ResumeError(f"--resume {folder}: another process is running this run right now; wait for it or stop "
                          "it first") from None
    return fh


def inspect(folder: str | Path) -> dict | None:
    """What the app shows of a resumable folder ({run_id, config, finished_layers, n_layers}), or None."""
    try:
        m = read_manifest(folder)
    except ResumeError:
        return None
    return {"folder": str(folder), "run_id": m["run_id"], "config": m["config"], "n_layers": m["n_layers"],
            "finished_layers": len(m["layers"]), "updated": m.get("updated")}


def resumable_runs(store) -> list[dict]:
    """The failed or cancelled runs of a run store (store.py) that can be resumed: their store
    summaries with `inspect`'s fields (their layer folders are `run_folder`s of the store)."""
    out = []
    for row in store.runs():
        if row["status"] in ("failed", "cancelled"):
            info = inspect(run_folder(store.folder, row["run_id"]))
            if info is not None:
                out.append({**row, **info})
    return out


def resume_config(folder: str | Path, **changes) -> PruneConfig:
    """The settings an interrupted run had (the evaluation's may be changed: `changes`)."""
    return PruneConfig.from_dict({**read_manifest(folder)["config"], **changes})


def model_dir_of(cfg: PruneConfig, loaded) -> Path:
    """The folder a run's weights stream from, found without loading them (a resume's identity check)."""
    if loaded is None:
        return model_folder(cfg.model)
    if loaded.weights is None:
        raise ResumeError("--resume streams the weights from disk: load the model with load_model(..., on_disk=True) "
                          "or pass no model")
    return loaded.weights.folder


def default_layer_dir() -> Path:
    """A new folder for a run that names none (under the data folder's streamed/)."""
    parent = data_dir() / STREAMED_DIR
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=parent))


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- pass-1 statistics, bit for bit ---------------------------------------------------------------

_STATS_FIELDS = {"layout", "scores", "out_energy", "residual_energy", "sensitivity", "outlier_ratio",
                 "residual_energy_hm"}
_SCALARS = ("residual_energy", "outlier_ratio", "residual_energy_hm")


def stats_to_tensors(p1: Pass1) -> tuple[dict[str, torch.Tensor], dict]:
    """Pass 1 as float64 tensors (every number exact) and the JSON that names them."""
    assert {f.name for f in fields(LayerStats)} == _STATS_FIELDS, "LayerStats changed: persist the new field"
    tensors, layers = {}, []
    for i, st in enumerate(p1.stats):
        names = [*_SCALARS, *(f"out_energy.{k}" for k in st.out_energy), *(f"sensitivity.{k}" for k in st.sensitivity)]
        values = [getattr(st, n) for n in _SCALARS] + list(st.out_energy.values()) + list(st.sensitivity.values())
        tensors[f"{i}.values"] = torch.tensor(values, dtype=torch.float64)
        for kind, s in st.scores.items():
            tensors[f"{i}.scores.{kind}"] = s.detach().cpu().contiguous()
        layers.append({"layout": asdict(st.layout), "values": names, "scores": list(st.scores)})
    tensors["calib_loss"] = torch.tensor(list(p1.calib_loss.values()), dtype=torch.float64)
    return tensors, {"layers": layers, "calib_loss": list(p1.calib_loss)}


def stats_from_tensors(tensors: dict[str, torch.Tensor], meta: dict, weigh) -> Pass1:
    stats = []
    for i, lm in enumerate(meta["layers"]):
        values = dict(zip(lm["values"], tensors[f"{i}.values"].tolist()))
        part = lambda prefix: {n.split(".", 1)[1]: v for n, v in values.items() if n.startswith(prefix)}  # noqa: E731
        stats.append(LayerStats(LayerLayout(**lm["layout"]), {k: tensors[f"{i}.scores.{k}"] for k in lm["scores"]},
                                part("out_energy."), values["residual_energy"], part("sensitivity."),
                                values["outlier_ratio"], values["residual_energy_hm"]))
    calib_loss = dict(zip(meta["calib_loss"], tensors["calib_loss"].tolist()))
    return Pass1(stats, calib_loss, weigh)


# --- the journal ----------------------------------------------------------------------------------

class RunJournal:
    """The manifest of one disk-streamed run and what the engine asks of it (`PruneEngine.run`'s
    `journal`): pass 1 loaded or saved, the plan recorded or checked, each finished layer written
    (`commit`: weights.LayerWriter, then the manifest), and the dense layers a resumed run with
    target="dense" runs forward."""

    def __init__(self, folder: Path, manifest: dict, done: list[dict] | None = None) -> None:
        self.folder, self.manifest = folder, manifest
        self._done = done or []  # verified entries of the layers an interrupted run finished
        self.resumed_at: int | None = None  # the first layer this process solved, when resumed
        self._stream = self._writer = self._dense = self._lock = None
        self._resumed = False

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | Path, cfg: PruneConfig, fp: dict, model_name: str, model_dir: str | Path,
               n_layers: int, run_id: str | None = None) -> RunJournal:
        folder = Path(folder).expanduser()
        if (folder / MANIFEST).exists():
            raise InvalidConfigError(f"{folder} already holds the journal of a run; resume it (--resume {folder}) "
                                     "or give an empty folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(f"cannot create the layer folder {folder} ({write_reason(exc)})") from exc
        manifest = {"schema": SCHEMA, "status": "running", "run_id": run_id or uuid.uuid4().hex[:12],
                    "created": _now(), "updated": _now(), "config": cfg.to_dict(), "fingerprint": fp,
                    "model": {"name": model_name, "folder": str(model_dir), "identity": model_identity(model_dir)},
                    "n_layers": n_layers, "pass1": None, "plan": None, "layers": []}
        journal = cls(folder, manifest)
        journal._lock = _lock(folder)
        journal._write()
        return journal

    @classmethod
    def resume(cls, folder: str | Path, cfg: PruneConfig, method=None, loaded=None) -> RunJournal:
        """The journal of an interrupted run, after every refusal of `check_resume` and while no
        other process continues it (a lock held until `close`). Finished layers whose shard is
        missing or differs from its checksum are solved again (with the layers after them)."""
        folder = Path(folder).expanduser()
        manifest = check_resume(folder, cfg, method, loaded)
        journal = cls(folder, manifest)
        journal._lock, journal._resumed = _lock(folder), True
        try:
            for entry in manifest["layers"]:
                shard = folder / entry["file"]
                if entry["index"] != len(journal._done) or not shard.is_file() \
                        or shard.stat().st_size != entry["bytes"] or _sha256(shard) != entry["sha256"]:
                    log.warning("the shard of layer %d in %s is missing or damaged: solving it again", entry["index"],
                                folder)
                    break
                journal._done.append(entry)
            for stale in folder.glob("*.tmp"):  # a write the kill interrupted
                stale.unlink(missing_ok=True)
        except BaseException:
            journal.close()
            raise
        return journal

    def close(self) -> None:
        """Lets another process continue the run (the lock also ends with this process)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def _write(self) -> None:
        self.manifest["updated"] = _now()
        try:
            write_json(self.folder / MANIFEST, self.manifest)
        except OSError as exc:
            raise OutputWriteError(f"cannot write the run's manifest into {self.folder} ({write_reason(exc)}); the run "
                                   f"is incomplete: free space and resume it with --resume {self.folder}") from exc

    # --- pass 1 -----------------------------------------------------------------------------
    def load_pass1(self, weigh) -> Pass1 | None:
        """The interrupted run's pass-1 statistics (None when it has none, or they are damaged)."""
        meta = self.manifest["pass1"]
        if meta is None:
            return None
        path = self.folder / meta["file"]
        if not path.is_file() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            log.warning("the pass-1 statistics in %s are missing or damaged: pass 1 runs again", self.folder)
            return None
        with safe_open(path, "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        return stats_from_tensors(tensors, meta, weigh)

    def save_pass1(self, p1: Pass1) -> None:
        tensors, meta = stats_to_tensors(p1)
        path = self.folder / PASS1_FILE
        tmp = path.with_suffix(".tmp")
        try:
            save_file(tensors, tmp)
            tmp.replace(path)
        except (OSError, SafetensorError) as exc:
            tmp.unlink(missing_ok=True)
            raise OutputWriteError(f"cannot write pass 1's statistics into {self.folder} ({write_reason(exc)}); the "
                                   f"run is incomplete: free space and resume it with --resume {self.folder}") from exc
        self.manifest["pass1"] = {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path), **meta}
        self._write()

    # --- pass 2 -----------------------------------------------------------------------------
    def begin(self, keep: list[dict[str, int]], stream) -> tuple[int, list[dict]]:
        """(first layer to solve, the infos of the layers before it): records the plan (a fresh
        run) or checks it is the interrupted run's, then gives the finished layers of the skeleton
        their pruned shapes and points the stream's source at their shards."""
        if not isinstance(stream.residency, DiskResidency):
            raise InvalidConfigError("a run journal needs the weights on disk (weights.DiskResidency)")
        self._stream = stream
        adapter = stream.adapter
        self._writer = LayerWriter(stream.residency, adapter.spec.layers, self.folder)
        if self.manifest["plan"] is None:
            self.manifest["plan"] = keep
            self._write()
        elif self.manifest["plan"] != keep:
            raise ResumeError(f"--resume {self.folder}: the plan its pass-1 statistics give now differs from the one "
                              "it was run with (another structprune or torch?); start a new run")
        if self._done:
            residency = stream.residency
            if self.manifest["config"]["target"] == "dense":  # a copy of the dense skeleton, before any layer shrinks
                dense = copy.deepcopy(stream.model)
                source = residency.source.fork()
                self._dense = (dense, DiskResidency(dense, source, residency.dtype, adapter.spec.layers))
            layers = adapter.layers(stream.model)
            for entry in self._done:
                shrink_layer(adapter, layers[entry["index"]], entry["shape"])
                shard = self.folder / entry["file"]
                with safe_open(shard, "pt") as h:
                    residency.source.redirect(list(h.keys()), shard)
        self.resumed_at = len(self._done) if self._resumed else None
        return len(self._done), [info for entry in self._done for info in entry["modules"]]

    def commit(self, index: int, layer: torch.nn.Module, infos: list[dict]) -> None:
        """Writes a finished layer's shard (finite weights only), then records it."""
        path = self._writer(index, layer)
        entry = {"index": index, "file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                 "shape": layer_shape(self._stream.adapter, layer), "modules": infos}
        self.manifest["layers"] = [e for e in self.manifest["layers"] if e["index"] < index] + [entry]
        self._write()

    @contextlib.contextmanager
    def dense_layer_on_device(self, index: int):
        """Dense layer `index` (read from the model's own files) on the device: a resumed run with
        target="dense" streams the dense model's activations past the finished layers too."""
        model, residency = self._dense
        stream = self._stream
        layer = stream.adapter.layers(model)[index]
        residency.bring(layer, stream.device)
        try:
            nbytes = layer_weight_bytes(stream.adapter.layout(layer), stream.dtype_bytes)
            with stream.ledger.held("dense-layer", nbytes):
                yield layer
        finally:
            residency.release(layer)

    def finish(self, run_id: str | None = None) -> None:
        """Marks the run finished: its outputs are written and it is not resumed again."""
        self.manifest.update(status="finished", run_id=run_id or self.run_id, ended=_now())
        self._write()


def start_disk_run(cfg: PruneConfig, loaded, model, method, dtype, journal: RunJournal | None,
                   layer_dir: str | Path | None, activation_budget: int | None, run_id: str | None):
    """(residency, journal, spill) of a run whose weights stay in their files: the pruned layers,
    the manifest and the spilled activations go to `layer_dir` (a new folder under the data
    folder by default), or to the folder of the run `journal` resumes."""
    import psutil

    if method.whole_model or not method.needs_calibration:
        raise InvalidConfigError(f"{cfg.method} needs the whole model in memory; use weights memory")
    layers_path = adapter_for(model).spec.layers
    residency = DiskResidency(model, loaded.weights.fork(), dtype, layers_path)
    if journal is None:
        journal = RunJournal.create(layer_dir or default_layer_dir(), cfg, fingerprint(cfg, method), loaded.name,
                                    loaded.weights.folder, len(adapter_for(model).layers(model)), run_id)
    if activation_budget is None:
        activation_budget = psutil.virtual_memory().available // 4
    return residency, journal, ActivationSpill(journal.folder / "activations", activation_budget)


__all__ = ["MANIFEST", "PASS1_FILE", "ResumeError", "RunJournal", "fingerprint", "model_identity", "read_manifest",
           "inspect", "resumable_runs", "resume_config", "model_dir_of", "run_folder", "default_layer_dir", "start_disk_run",
           "check_fingerprint", "check_resume",
           "stats_to_tensors", "stats_from_tensors"]
