"""The quality cost of channel alignment: perplexity of SmolLM2 pruned with the default method and
allocation, aligned (`align_channels`, default) vs unaligned (1), same seed, both evaluation sets.

    PYTHONPATH=. .venv/bin/python -m benchmarks.align_quality                # 10/20/30/50%, 64 and 1
    PYTHONPATH=. .venv/bin/python -m benchmarks.align_quality --save-models DIR  # also keeps the models

Reduced protocol so that the grid fits in minutes on 2 CPU cores: 16 x 512 calibration windows
(seed 0), 16 evaluation windows per corpus (sotu and brown test splits); the records say so. Pass 1
is shared by all runs (its statistics do not depend on the alignment). One JSON record per run in
benchmarks/results/speed/quality/. With --save-models each pruned model is saved (save_pruned) so
that benchmarks/speed.py can time the real pruned models.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from structprune.checkpoint import save_pruned
from structprune.config import PruneConfig
from structprune.models import load_model
from structprune.run import run_prune

OUT = Path(__file__).parent / "results" / "speed" / "quality"


def key(model: str, sparsity: float, align: int, nsamples: int, windows: int, seed: int) -> str:
    return f"{model}__s{sparsity:.2f}__align{align}__seed{seed}__calib{nsamples}x512__sotu-{windows}_brown-{windows}"


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=1)
    os.replace(f.name, path)


def quality_table(out: Path = OUT) -> str:
    """Markdown: perplexity per sparsity and alignment, both corpora, with the dense reference."""
    recs = [json.loads(f.read_text()) for f in sorted(Path(out).glob("*.json"))]
    lines = ["| sparsity | align_channels | achieved | sotu ppl | brown ppl | load |", "|---|---|---|---|---|---|"]
    if recs:
        d = recs[0]["ppl"]["dense"]
        lines.append(f"| dense | | | {d['sotu']['value']:.2f} | {d['brown']['value']:.2f} | |")
    for r in sorted(recs, key=lambda r: (r["config"]["sparsity"], -r["config"]["align_channels"])):
        pp = r["ppl"]["pruned"]
        lines.append(f"| {r['config']['sparsity']:.0%} | {r['config']['align_channels']} | "
                     f"{r['sparsity']['achieved_prunable']:.4f} | {pp['sotu']['value']:.2f} | {pp['brown']['value']:.2f} | "
                     f"{r['benchmark']['loadavg'][0]:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--aligns", nargs="+", type=int, default=[64, 1])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-models", default=None, help="folder to keep the pruned models in")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report", action="store_true", help="print the markdown table of the records in --out")
    args = p.parse_args(argv)
    if args.report:
        print(quality_table(Path(args.out)))
        return
    loaded = load_model(args.model)
    cache: dict = {}
    dense = None
    for s in args.sparsities:
        for align in args.aligns:
            k = key(args.model, s, align, args.nsamples, args.eval_windows, args.seed)
            path = Path(args.out) / f"{k}.json"
            cfg = PruneConfig(model=args.model, sparsity=s, align_channels=align, nsamples=args.nsamples,
                              eval_windows=args.eval_windows, eval_data=("sotu", "brown"), seed=args.seed,
                              device="cpu")
            if path.exists() and not args.save_models:
                print("skip", k, flush=True)
                continue
            res = run_prune(cfg, loaded, evaluate_dense=dense is None, stats_cache=cache)
            rec = res.record
            if dense is None:
                dense = rec["ppl"]["dense"]
            rec["ppl"]["dense"] = rec["ppl"]["dense"] or dense
            rec["benchmark"] = {"script": "benchmarks/align_quality.py", "loadavg": list(os.getloadavg()),
                                "protocol": f"reduced: calibration {args.nsamples} x 512 (seed {args.seed}), "
                                            f"{args.eval_windows} windows each of sotu and brown (test splits)"}
            write_json(path, rec)
            if args.save_models:
                save_pruned(res.model, res.tokenizer, Path(args.save_models) / k, provenance={"key": k})
            pp = {n: round(v["value"], 3) for n, v in rec["ppl"]["pruned"].items()}
            print(k, pp, flush=True)


if __name__ == "__main__":
    main()
