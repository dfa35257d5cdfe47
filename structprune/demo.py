"""The demo collection shipped in `assets/demo/` (docs/ASSETS.md): results the repository computed
once from its own built-in model, so the explorer and the Method page have content on a first
visit, before anything is computed. The benchmark records under `benchmarks/results/` are the
Compare page's demo.

Each file is JSON `{"key": <the run store's cache key>, <kind>: <the payload>}`; the key is the one
the app would store the same computation under, so a demo entry and a computed one never differ.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"


@lru_cache(maxsize=4)
def _entries(folder: str, kind: str) -> dict[str, dict]:
    out = {}
    for path in sorted(Path(folder).glob(f"{kind}-*.json")):
        try:
            d = json.loads(path.read_text())
            out[d["key"]] = d[kind]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping demo file %s: %s", path, exc)
    return out


def demo_entries(kind: str, folder: Path | str | None = None) -> dict[str, dict]:
    """{cache key: payload} of the shipped demo files of `kind` ("profile" | "stepthrough")."""
    return _entries(str(folder or DEMO_DIR), kind)


def write_demo(kind: str, key: str, payload: dict, name: str, folder: Path | str | None = None) -> Path:
    """Writes one demo file atomically (`<folder>/<kind>-<name>.json`)."""
    folder = Path(folder or DEMO_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"key": key, kind: payload}))
    tmp.replace(path)
    _entries.cache_clear()
    return path


__all__ = ["DEMO_DIR", "demo_entries", "write_demo"]
