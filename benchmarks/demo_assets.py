"""Builds the demo collection shipped in assets/demo/ (structprune/demo.py, docs/ASSETS.md): what the
explorer and the Method page show on a first visit, computed once from the built-in model.

    PYTHONPATH=. .venv/bin/python -m benchmarks.demo_assets              # both, at the app's defaults
    PYTHONPATH=. .venv/bin/python -m benchmarks.demo_assets --only profile

- profile: the energy profile (pass 1 with module sensitivities, `explorer.compute_energy_profile`)
  of SmolLM2-135M at the Prune page's default settings (PruneConfig's defaults), stored under the
  key the app would store it under, so the explorer opens on it.
- stepthrough: the Method page's default step-through (layer 3, attention, 30%, 8 x 256).

Each file says how long it took to compute and on what; a rerun replaces it atomically.
"""

from __future__ import annotations

import argparse
import time

from structprune.config import PruneConfig
from structprune.demo import write_demo
from structprune.explorer import compute_energy_profile, profile_key
from structprune.models import load_model


def build_profile(model: str = "smollm2-135m") -> str:
    cfg = PruneConfig(model=model)
    loaded = load_model(model)
    t0 = time.perf_counter()
    prof = compute_energy_profile(cfg, loaded)
    path = write_demo("profile", profile_key(loaded.name, cfg), prof.to_dict(), f"{loaded.name}-default")
    return f"{path} ({time.perf_counter() - t0:.0f} s)"


def build_stepthrough(model: str = "smollm2-135m", layer: int = 3, kind: str = "attn", sparsity: float = 0.3) -> str:
    from structprune.stepthrough import admm_stepthrough, stepthrough_key

    loaded = load_model(model)
    key = stepthrough_key(loaded.name, layer, kind, sparsity)
    t0 = time.perf_counter()
    data = admm_stepthrough(loaded, layer, kind, sparsity, nsamples=8, seqlen=256)
    path = write_demo("stepthrough", key, data, f"{loaded.name}-L{layer}-{kind}")
    return f"{path} ({time.perf_counter() - t0:.0f} s)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("profile", "stepthrough"), default=None)
    args = p.parse_args(argv)
    if args.only in (None, "profile"):
        print(build_profile(), flush=True)
    if args.only in (None, "stepthrough"):
        print(build_stepthrough(), flush=True)


if __name__ == "__main__":
    main()
