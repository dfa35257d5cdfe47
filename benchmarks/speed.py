"""Speed benchmark: dense vs pruned prefill and KV-cached decode tokens/s (structprune/speed.py).

    PYTHONPATH=. .venv/bin/python -m benchmarks.speed                       # TinyLlama shape + SmolLM2, CPU
    PYTHONPATH=. .venv/bin/python -m benchmarks.speed --kinds tinyllama --dtypes float32 --shapes p8x512
    PYTHONPATH=. .venv/bin/python -m benchmarks.speed --device cuda --dtypes bfloat16   # a GPU machine
    PYTHONPATH=. .venv/bin/python -m benchmarks.speed --cpu-smoke           # seconds: tiny model, tiny shapes

Two model kinds:
- `tinyllama`: a random-weight model of the TinyLlama-1.1B shape (hidden 2048, 22 layers, MLP 5632,
  32 query / 4 KV heads, vocabulary 32000), cut physically (`shrink_to_counts`) to the unit counts
  of a real allocation: the library's softmax allocation (T = 1, the default) over its own modules,
  fed with the module energies of SmolLM2's default run (the committed 64 x 512 record at 30%),
  mapped by relative depth, at each sparsity and alignment. Large enough GEMMs to mean something.
- `smollm2`: SmolLM2-135M pruned by the library with the default method and allocation, aligned
  and unaligned, loaded from the folders `benchmarks.align_quality --save-models DIR` wrote
  (`--smollm2-models DIR`); their shapes are those of real runs.

Per (kind, dtype, sparsity) one record in benchmarks/results/speed/: the dense model and the pruned
ones (one per alignment) interleaved in one process, median of --repeats after --warmup, the
machine's load average before and after. Weights are random for `tinyllama` and the token ids
random for both: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from structprune.adapters import adapter_for
from structprune.allocation import allocate_softmax
from structprune.checkpoint import load_pruned
from structprune.models import build_tiny
from structprune.speed import Shape, compare_speed, load_note, n_params, shrink_to_counts, speedups
from structprune.units import layouts_of, module_specs

OUT = Path(__file__).parent / "results" / "speed"
ENERGY_RECORD = (Path(__file__).parent / "results" /
                 "smollm2-135m__structprune__softmax-T1-relative__greedy-obs__local__s0.30__seed0__calib64x512__sotu-all_brown-64.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {"p1x512": Shape("prefill", 1, 512), "p8x512": Shape("prefill", 8, 512), "p1x128": Shape("prefill", 1, 128),
          "d1": Shape("decode", 1, 128, 16), "d8": Shape("decode", 8, 128, 16)}
SMOKE_SHAPES = {"p1x16": Shape("prefill", 1, 16), "p2x16": Shape("prefill", 2, 16), "d1": Shape("decode", 1, 8, 4)}


def tinyllama_shape(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def mapped_energies(specs, record: Path = ENERGY_RECORD) -> np.ndarray:
    """(M,) energies for `specs`: the recorded run's module energies, attention to attention and MLP to
    MLP, taken at the same relative depth (nearest layer)."""
    rows = json.loads(record.read_text())["allocation"]
    src = {kind: [r["energy"] for r in rows if r["module"] == kind] for kind in ("attn", "mlp")}
    n_layers = max(sp.layer for sp in specs) + 1
    out = []
    for sp in specs:
        e = src[sp.kind]
        out.append(e[round(sp.layer * (len(e) - 1) / max(n_layers - 1, 1))])
    return np.array(out)


def allocation_counts(model, sparsity: float, align: int) -> tuple[list[dict], dict]:
    """Kept heads / channels per layer from the library's default (softmax, T = 1) allocation."""
    specs = module_specs(layouts_of(model, adapter_for(model)), align)
    alloc = allocate_softmax(specs, mapped_energies(specs), sparsity, 1.0)
    keep = [{} for _ in range(max(sp.layer for sp in specs) + 1)]
    for sp, k in zip(specs, alloc.units_kept):
        keep[sp.layer][sp.kind] = int(k)
    info = {"scheme": "softmax T=1 over SmolLM2 energies mapped by depth", "align_channels": align,
            "achieved_sparsity": round(alloc.achieved_sparsity, 5), "kept": keep}
    return keep, info


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=1)
    os.replace(f.name, path)


def smollm2_folders(root: Path, sparsity: float) -> dict[int, Path]:
    """{align: folder} of the saved SmolLM2 runs at `sparsity` (names from benchmarks.align_quality)."""
    found = {}
    for d in sorted(root.glob(f"smollm2-135m__s{sparsity:.2f}__align*")):
        m = re.search(r"__align(\d+)__", d.name)
        if m:
            found[int(m.group(1))] = d
    return found


def bench_one(kind: str, dense, pruned: dict[str, torch.nn.Module], shapes: dict[str, Shape], dtype: str,
              sparsity: float, args, info: dict) -> dict:
    dt = DTYPES[dtype]
    models = {"dense": dense.to(args.device, dt)}
    models.update({name: m.to(args.device, dt) for name, m in pruned.items()})
    before = load_note()
    t0 = time.perf_counter()
    timings = compare_speed(models, list(shapes.values()), args.device, repeats=args.repeats, warmup=args.warmup)
    ratio = speedups(timings, "dense")
    rec = {
        "schema": "structprune.speed/1", "kind": kind, "dtype": dtype, "device": args.device, "sparsity": sparsity,
        "repeats": args.repeats, "warmup": args.warmup, "interleaved": True,
        "params": {name: n_params(m) for name, m in models.items()},
        "timings": [t.to_dict() for t in timings],
        "speedup": {f"{m} | {label}": round(r, 4) for (m, label), r in ratio.items() if m != "dense"},
        "load_before": before, "load_after": load_note(), "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info,
    }
    for name, m in models.items():  # back to fp32 on the CPU for the next dtype
        m.to("cpu", torch.float32)
    return rec


def speed_table(out: Path = OUT) -> str:
    """Markdown: one row per (kind, dtype, sparsity, pruned model), tokens/s and speed-up per shape."""
    recs = [json.loads(f.read_text()) for f in sorted(Path(out).glob("*.json"))]
    recs = [r for r in recs if r.get("schema") == "structprune.speed/1" and r["kind"] != "smoke"]
    lines, last_header = [], None
    for r in sorted(recs, key=lambda r: (r["kind"], r["dtype"], r["device"], r["sparsity"])):
        labels = [t["label"] for t in r["timings"] if t["model"] == "dense"]
        dense = {t["label"]: t["tokens_per_s"] for t in r["timings"] if t["model"] == "dense"}
        for name in [m for m in r["params"] if m != "dense"]:
            tps = {t["label"]: t["tokens_per_s"] for t in r["timings"] if t["model"] == name}
            cells = [f"{tps[lb]:.3g} / {dense[lb]:.3g} = **{r['speedup'][f'{name} | {lb}']:.2f}x**" for lb in labels]
            lines.append(f"| {r['kind']} | {r['device']} {r['dtype']} | {r['sparsity']:.0%} | {name} | "
                         f"{r['params'][name] / r['params']['dense']:.2f} | " + " | ".join(cells) +
                         f" | {r['load_before']['loadavg'][0]:.0f} |")
        header = ("| model | device, dtype | sparsity | pruned | size | " + " | ".join(labels) +
                  " | load |\n|" + "---|" * (6 + len(labels)))
        if header != last_header:  # one header per run of records with the same shapes
            lines.insert(len(lines) - (len(r["params"]) - 1), ("\n" if lines else "") + header)
            last_header = header
    return "\n".join(lines).strip("\n")


def attach_to_quality(out: Path = OUT, quality: Path = OUT / "quality") -> list[Path]:
    """Copies each SmolLM2 model's measured fp32 CPU speed (the records of this benchmark) into the
    run record `benchmarks.align_quality` wrote for it, as the record's "speed" (the shape the app's
    runs have, `speed.speed_section`), so that Compare can plot perplexity against speed-up."""
    written = []
    for f in sorted(Path(out).glob("smollm2__cpu__float32__s*.json")):
        r = json.loads(f.read_text())
        for name, alloc in r["allocations"].items():
            target = Path(quality) / f"{alloc['run']}.json"
            if not target.is_file():
                continue
            rows = [{"shape": t["label"], "model": "dense" if t["model"] == "dense" else "pruned",
                     "tokens_per_s": round(t["tokens_per_s"], 1),
                     "speedup": 1.0 if t["model"] == "dense" else r["speedup"][f"{name} | {t['label']}"]}
                    for t in r["timings"] if t["model"] in ("dense", name)]
            rec = json.loads(target.read_text())
            rec["speed"] = {"device": r["device"], "dtype": r["dtype"], "repeats": r["repeats"], "rows": rows,
                            "speedup": {k.split(" | ", 1)[1]: v for k, v in r["speedup"].items()
                                        if k.startswith(f"{name} | ")},
                            "size": {"ratio": round(r["params"][name] / r["params"]["dense"], 4)},
                            "protocol": f"benchmarks/speed.py ({f.name}): dense and pruned interleaved, median of "
                                        f"{r['repeats']} after {r['warmup']} warm-up; random token ids",
                            "loadavg": r["load_before"]["loadavg"], "cpu_count": r["load_before"]["cpu_count"]}
            write_json(target, rec)
            written.append(target)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["tinyllama", "smollm2"], choices=["tinyllama", "smollm2"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--aligns", nargs="+", type=int, default=[64, 1],
                   help="alignments of the pruned models timed against dense (each one a model)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--smollm2-models", default=None, help="folder of benchmarks.align_quality --save-models")
    p.add_argument("--tag", default="", help="suffix of the record names (e.g. a rerun)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny random model, tiny shapes: seconds")
    p.add_argument("--report", action="store_true", help="print the markdown table of the records in --out")
    p.add_argument("--attach-to-quality", action="store_true",
                   help="copy the SmolLM2 speed records into benchmarks.align_quality's run records and stop")
    args = p.parse_args(argv)
    if args.report:
        print(speed_table(Path(args.out)))
        return
    if args.attach_to_quality:
        for path in attach_to_quality(Path(args.out)):
            print(path)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    shapes = {k: SHAPES[k] for k in args.shapes}
    if args.cpu_smoke:
        dense = build_tiny("tiny-llama").eval()
        for s in args.sparsities:
            pruned, info = {}, {"model": "tiny-llama (random)", "allocations": {}}
            for a in [a for a in args.aligns if a <= 96]:
                keep, ai = allocation_counts(dense, s, a)
                pruned[f"align{a}"] = shrink_to_counts(copy.deepcopy(dense), keep)
                info["allocations"][f"align{a}"] = ai
            rec = bench_one("smoke", dense, pruned, SMOKE_SHAPES, "float32", s, args, info)
            write_json(out / f"smoke__s{s:.2f}{args.tag}.json", rec)
            print(json.dumps(rec["speedup"]), flush=True)
        return
    for kind in args.kinds:
        if kind == "smollm2" and not args.smollm2_models:
            print("smollm2: no --smollm2-models folder given; skipped", file=sys.stderr)
            continue
        dense = tinyllama_shape() if kind == "tinyllama" else None
        if kind == "smollm2":
            from structprune.models import load_model
            dense = load_model("smollm2-135m").model.eval()
        for s in args.sparsities:
            pruned, info = {}, {"model": kind, "allocations": {}}
            if kind == "tinyllama":
                for a in args.aligns:
                    keep, ai = allocation_counts(dense, s, a)
                    pruned[f"align{a}"] = shrink_to_counts(copy.deepcopy(dense), keep)
                    info["allocations"][f"align{a}"] = ai
            else:
                for a, folder in smollm2_folders(Path(args.smollm2_models), s).items():
                    if a in args.aligns:
                        pruned[f"align{a}"] = load_pruned(folder)[0]
                        shapes_ = json.loads((folder / "config.json").read_text())["structprune"]["layer_shapes"]
                        info["allocations"][f"align{a}"] = {"run": folder.name, "kept": shapes_}
            if not pruned:
                print(f"{kind} s={s}: no pruned model; skipped", file=sys.stderr)
                continue
            for dtype in args.dtypes:
                rec = bench_one(kind, dense, pruned, shapes, dtype, s, args, info)
                name = f"{kind}__{args.device.replace(':', '')}__{dtype}__s{s:.2f}{args.tag}.json"
                write_json(out / name, rec)
                print(name, json.dumps(rec["speedup"]), rec["load_before"]["loadavg"], flush=True)
            del pruned


if __name__ == "__main__":
    main()
