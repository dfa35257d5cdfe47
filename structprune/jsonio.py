"""Strict JSON and atomic files: the one place records become bytes on disk.

JSON has no NaN or Infinity (Python writes them, strict parsers and browsers reject them), so a
non-finite float becomes null and its path and value are listed next to it, and every dump is
`allow_nan=False`. Files are written to a temporary name in the same folder and renamed when
complete (`os.replace`), so a reader sees the old file or the whole new one, never a truncated one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

NONFINITE_KEY = "nonfinite"  # {path: "nan" | "inf" | "-inf"} of the numbers written as null


def finite_copy(obj, path: str = "") -> tuple[object, dict[str, str]]:
    """(a copy of `obj` with every non-finite float replaced by None, {dotted path: repr of the value})."""
    bad: dict[str, str] = {}

    def clean(o, where: str):
        if isinstance(o, float) and not math.isfinite(o):
            bad[where or "."] = repr(o)
            return None
        if isinstance(o, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(o)]
        return o

    return clean(obj, path), bad


def strict_record(record: dict) -> dict:
    """`record` with non-finite numbers as null and, when there were any, `nonfinite` saying which
    they were (a record reader can tell "not measured" from "NaN")."""
    clean, bad = finite_copy(record)
    if bad:
        clean[NONFINITE_KEY] = {**clean.get(NONFINITE_KEY, {}), **bad}
    return clean


def dumps(obj, indent: int | None = None) -> str:
    """Strict JSON text (non-finite numbers as null; see `strict_record` to keep their reason)."""
    return json.dumps(finite_copy(obj)[0], indent=indent, allow_nan=False)


def write_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` to `path` through a temporary file in the same folder and `os.replace`; on any
    error (a full disk, a missing folder) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the record from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    """`obj` as strict JSON, written atomically."""
    return write_atomic(path, dumps(obj, indent=indent))


__all__ = ["finite_copy", "strict_record", "dumps", "write_atomic", "write_json", "NONFINITE_KEY"]
