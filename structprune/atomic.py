"""Output folders that are complete or absent: never half-written.

A folder is written under a hidden temporary name next to its target, ends with a completion mark
(`structprune-complete.json`: every file and its size) and is renamed into place only when
complete. Any failure (an exception, a full disk) removes the temporary folder; a process killed
mid-write leaves only a hidden `.<name>.partial-*` folder, which no loader presents and the next
write to the same target removes. Readers call `check_complete` and refuse a folder without its
mark (or whose files no longer match it).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StructPruneError

MARK = "structprune-complete.json"


class OutputFolderError(StructPruneError):
    """The output folder cannot be written (exists and is not empty, is a file, is not writable)."""


class IncompleteFolderError(StructPruneError):
    """A model folder without its completion mark, or whose files differ from what the mark lists."""


def check_output_folder(folder: str | Path, overwrite: bool = False, option: str = "--out") -> Path:
    """Refuses, before any work, a target that cannot become a complete folder."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{option} {folder} is a file; give a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputFolderError(f"{option} {folder} exists and is not empty; choose a new folder or pass --overwrite "
                                "to replace it")
    parent = folder.parent
    while not parent.exists():  # the nearest existing ancestor must let us create the rest
        parent = parent.parent
    if not parent.is_dir():
        raise OutputFolderError(f"{option} {folder} lies below a file ({parent}); give a folder path")
    if not os.access(parent, os.W_OK | os.X_OK) or (folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK)):
        raise OutputFolderError(f"{option} {folder} is not writable; choose a folder you can write to")
    return folder


def _mark(folder: Path) -> dict:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"complete": True, "files": files}


@contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`with atomic_folder(target) as tmp:` write into `tmp`; on a clean exit the mark is written and
    `tmp` becomes `target` (replacing it only when `overwrite`); on any error nothing is left."""
    folder = check_output_folder(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.partial-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARK).write_text(json.dumps(_mark(tmp), indent=1))
        if folder.exists():
            old = folder.parent / f".{folder.name}.partial-old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)  # checked empty or overwrite above
            try:
                tmp.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: str | Path) -> bool:
    try:
        check_complete(folder)
    except IncompleteFolderError:
        return False
    return True


def check_complete(folder: str | Path) -> Path:
    """The folder, if its completion mark is present and its files match it; else a one-line error."""
    folder = Path(folder)
    redo = "write it again (e.g. `structprune export RUN --out FOLDER --overwrite`)"
    mark = folder / MARK
    if not mark.is_file():
        raise IncompleteFolderError(f"{folder} has no completion mark ({MARK}): it was not completely written "
                                    f"(interrupted or failed); {redo}")
    try:
        listed = json.loads(mark.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IncompleteFolderError(f"{folder}: its completion mark {MARK} is unreadable; {redo}") from exc
    for name, size in listed.items():  # sizes of the weights only: a truncated copy; the card may be edited
        p = folder / name
        if not p.is_file() or (name.endswith(".safetensors") and p.stat().st_size != size):
            raise IncompleteFolderError(f"{folder}: {name} is missing or truncated since the folder was written; "
                                        f"{redo}")
    return folder


__all__ = ["MARK", "OutputFolderError", "IncompleteFolderError", "check_output_folder", "atomic_folder",
           "is_complete", "check_complete"]
