"""A cheap proxy for choosing the block refit's settings: a few layers' held-out error per epoch.

    .venv/bin/python -m benchmarks.refit_probe                    # the grid that chose the defaults
    .venv/bin/python -m benchmarks.refit_probe --layers 5 --settings 1e-3:6:cosine 3e-4:6:constant

Only the given layers are pruned (to the keep counts of the 30% default record's allocation), on the
dense model's activations; each setting refits its own copy of the pruned layer
(`refine.fit_layer`), and the held-out relative error after each epoch is recorded as a fraction of
the error before the fit. Minutes instead of the half hour of a full run, and only a proxy: in a
full run the inputs come from the pruned layers before. Lower is better.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from structprune.config import PruneConfig
from structprune.engine import Pass1, PruneEngine
from structprune.methods import get_method
from structprune.models import load_model
from structprune.refine import fit_layer
from structprune.run import prepare_data

RESULTS = Path(__file__).parent / "results"
RECORD = RESULTS / ("smollm2-135m__structprune__softmax-T1-relative__greedy-obs__local__s0.30__seed0__"
                    "calib64x512__sotu-all_brown-64.json")
DEFAULT_SETTINGS = ("3e-4:6:constant", "1e-3:6:constant", "1e-3:3:cosine", "3e-4:3:cosine",
                    "5e-4:6:cosine", "1e-3:6:cosine", "2e-4:12:cosine", "5e-4:12:cosine", "7e-4:12:cosine",
                    "1e-3:12:cosine")


def parse_setting(text: str) -> tuple[float, int, str]:
    lr, epochs, schedule = text.split(":")
    return float(lr), int(epochs), schedule


def probe(layers: list[int], settings: list[str], record: Path = RECORD) -> dict[str, list[float]]:
    cfg = PruneConfig(sparsity=0.3)
    loaded = load_model(cfg.model)
    model = copy.deepcopy(loaded.model).eval()
    method = get_method("structprune")(cfg)
    calib, _, _ = prepare_data(cfg, loaded.tokenizer, model)
    engine = PruneEngine(model, "cpu", method)
    keep = [{sp.kind: sp.n_units for sp in engine.specs if sp.layer == i} for i in range(engine.n_layers)]
    for a in json.loads(record.read_text())["allocation"]:
        if a["layer"] in layers:
            keep[a["layer"]][a["module"]] = a["units_kept"]
    out: dict[str, list[float]] = {}

    def refit_copies(stream, index, layer, dense_layer, inputs):
        for text in settings:
            lr, epochs, schedule = parse_setting(text)
            t = time.perf_counter()
            r = fit_layer(stream, index, copy.deepcopy(layer), dense_layer, inputs, epochs, lr, schedule=schedule)
            h = r["heldout_error"]
            out[f"layer {index} {text}"] = [v / h[0] for v in h]
            print(f"layer {index} {text:>16}: " + " ".join(f"{v / h[0]:.4f}" for v in h)
                  + f"  ({time.perf_counter() - t:.0f} s)", flush=True)
        return {}  # the layer itself is left as pass 2 gave it

    # no pass 1: the keep counts come from the record; Grams weighed as a run weighs them
    engine.pass2(calib, keep, Pass1([], {}, method.token_weights()), refine=refit_copies)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[5, 20])
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="LR:EPOCHS:SCHEDULE")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "exploration" / "refit_probe.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    curves = probe(args.layers, args.settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "held-out relative error of a pruned layer per refit epoch, as a fraction of the error before "
                "(epoch 0); layers pruned alone on dense inputs to the 30% default record's keep counts",
        "model": "smollm2-135m", "calibration": "sotu-calib 64x512 seed 0", "threads": torch.get_num_threads(),
        "curves": curves}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
