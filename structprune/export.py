"""`structprune export`: the loadable folder (checkpoint.save_pruned) of a run that already ended.

A run is named by its id in the run store (store.py) or by its record JSON (`structprune prune`
writes `<out>/<run_id>.json`). The store keeps records, not weights, so the model comes from:
1. the folder `structprune prune --save-model` wrote next to the record (`model-<run_id>`), if it is
   there and complete; else
2. the run itself, repeated from the record's config (same seed and data: the pruning is
   deterministic on one machine) and checked against the record: the kept units of every module
   must match, or the export is refused rather than shipping a different model under its name.
The model card is made from the original record (its perplexities and protocol).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .atomic import check_output_folder, is_complete
from .errors import RunNotFoundError, StructPruneError


def find_record(run_or_record: str, store_folder: str | Path | None = None) -> tuple[dict, Path | None]:
    """(record, folder the record sits in or None) of a finished run: a record file or a store id."""
    path = Path(run_or_record).expanduser()
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunNotFoundError(f"{path} is not a readable run record (JSON): {exc}") from exc
        if not isinstance(rec, dict) or "config" not in rec or "run_id" not in rec:
            raise RunNotFoundError(f"{path} is not a structprune run record (no run_id / config)")
        if rec.get("status", "finished") != "finished":
            raise RunNotFoundError(f"{path}: the run is {rec.get('status')}; only finished runs can be exported")
        return rec, path.parent
    from .store import RunStore

    store = RunStore.existing(store_folder)
    row = store.get(run_or_record)
    if row is None:
        raise RunNotFoundError(f"no run {run_or_record!r} in the run store ({store.path}) and no such record file; "
                               "give a run id from the store or the path of a run's record JSON")
    if row["status"] != "finished" or row["record"] is None:
        raise RunNotFoundError(f"run {run_or_record} is {row['status']}; only finished runs can be exported")
    return row["record"], None


def _kept_units(record: dict) -> list[tuple]:
    return [(r.get("layer"), r.get("module"), r.get("units_kept")) for r in record.get("allocation", [])]


def model_of(record: dict, record_folder: Path | None, on_event: Callable | None = None):
    """(model, tokenizer) of a finished run: its saved folder, else the run repeated and checked."""
    from .checkpoint import load_pruned
    from .config import PruneConfig
    from .run import run_prune

    if record_folder is not None:
        saved = record_folder / f"model-{record['run_id']}"
        if saved.is_dir() and is_complete(saved):
            return load_pruned(saved)
    cfg = PruneConfig.from_dict(record["config"])
    res = run_prune(cfg, on_event=on_event, evaluate_dense=False)
    if _kept_units(res.record) != _kept_units(record):
        raise StructPruneError(f"repeating run {record['run_id']} kept different units than its record (another "
                               "structprune version, model or corpus?); prune again with --save-model instead")
    return res.model, res.tokenizer


def export_run(run_or_record: str, out: str | Path, overwrite: bool = False, store_folder: str | Path | None = None,
               on_event: Callable | None = None) -> Path:
    """Writes the loadable folder of a finished run to `out` (refused before any work if `out` is a
    non-empty folder and not `overwrite`)."""
    from .checkpoint import save_pruned

    check_output_folder(out, overwrite)
    record, record_folder = find_record(run_or_record, store_folder)
    model, tokenizer = model_of(record, record_folder, on_event)
    provenance = {k: record.get(k) for k in ("run_id", "method", "config", "sparsity", "created")}
    return save_pruned(model, tokenizer, out, provenance=provenance, record=record, overwrite=overwrite)


__all__ = ["RunNotFoundError", "find_record", "model_of", "export_run"]
