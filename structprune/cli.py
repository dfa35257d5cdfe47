"""`structprune` command line: prepare, models, eval, prune, estimate.

Options of `prune` come from `PruneConfig`'s fields (defaults and help in one place). Errors of the
library print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from .config import PruneConfig
from .errors import StructPruneError

log = logging.getLogger("structprune")


def _progress(event) -> None:
    """A one-line progress bar on stderr."""
    if event.layer < 0:
        msg = f"\r{event.stage:<12} {event.message}"
    else:
        done = event.layer + 1
        bar = "#" * int(30 * done / event.n_layers)
        msg = f"\r{event.stage:<12} [{bar:<30}] layer {done}/{event.n_layers}"
    mem = event.peak_bytes / 2**20
    sys.stderr.write(f"{msg}  {event.elapsed_s:7.1f}s  peak {mem:8.1f} MiB")
    if event.layer < 0 or event.layer + 1 == event.n_layers:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _add_config_options(p: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    for f in fields(PruneConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if f.name == "eval_data":
            p.add_argument(flag, nargs="+", default=list(default), help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.name == "eval_windows":
            p.add_argument(flag, type=int, default=None, help=help_)
        else:
            kind = type(default) if default is not None else str
            p.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                           help=f"{help_} (default: {default})")


def cmd_prepare(args) -> int:
    from .data.corpora import prepare_corpora
    from .models import prepare_builtin

    t = time.perf_counter()
    folder = prepare_builtin(args.model)
    print(f"model {args.model}: {folder} ({time.perf_counter() - t:.1f} s)")
    for name, status in prepare_corpora().items():
        print(f"corpus {name}: {status}")
    return 0


def cmd_models(_args) -> int:
    from .models import BUILTIN_MODELS, TINY_MODELS

    for b in BUILTIN_MODELS.values():
        print(f"{b.name:<16} {b.description}")
    for name in TINY_MODELS:
        print(f"{name:<16} tiny random model for tests and demos")
    return 0


def cmd_eval(args) -> int:
    from .data.corpora import corpus_id
    from .data.windows import corpus_token_ids, eval_windows, protocol_string
    from .evaluation import check_seqlen, perplexity
    from .models import load_model

    if args.windows is not None and args.windows < 1:
        raise StructPruneError(f"--windows must be at least 1 (got {args.windows}); omit it for all windows")
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise StructPruneError(f"{args.model} has no tokenizer; evaluate a built-in model or a model folder")
    check_seqlen(loaded.model, args.seqlen)
    win = eval_windows(corpus_token_ids(loaded.tokenizer, args.data, "test"), args.seqlen, args.windows)
    proto = protocol_string(corpus_id(args.data, "test"), args.seqlen, win.shape[0])
    t = time.perf_counter()
    res = perplexity(loaded.model, win, device=args.device, mode=args.mode, batch_size=args.batch_size, protocol=proto)
    value = f"{res.value:.4f}" if math.isfinite(res.value) else "inf"
    print(f"perplexity {value}  ({proto}; {loaded.description}; {time.perf_counter() - t:.1f} s)")
    return 0


def cmd_prune(args) -> int:
    from .checkpoint import save_pruned
    from .run import run_prune

    values = {f.name: getattr(args, f.name) for f in fields(PruneConfig)}
    values["eval_data"] = tuple(values["eval_data"])
    cfg = PruneConfig(**values)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run_prune(cfg, on_event=_progress)
    rec = res.record
    path = out / f"{rec['run_id']}.json"
    path.write_text(json.dumps(rec, indent=1))
    for name, r in rec["ppl"]["pruned"].items():
        dense = rec["ppl"]["dense"].get(name, {}).get("value")
        print(f"{name}: ppl dense {dense} -> pruned {r['value']}  ({r['protocol']})")
    sp = rec["sparsity"]
    print(f"sparsity target {sp['target']:.3f}, achieved {sp['achieved_prunable']:.4f} of prunable, "
          f"{sp['achieved_total']:.4f} of all parameters; peak device memory "
          f"{rec['memory']['peak_bytes'] / 2**20:.1f} MiB ({rec['memory']['kind']})")
    print(f"record: {path}")
    if args.save_model:
        folder = save_pruned(res.model, res.tokenizer, out / f"model-{rec['run_id']}",
                             provenance={"run_id": rec["run_id"], "config": rec["config"]})
        print(f"pruned model: {folder}")
    return 0


def cmd_estimate(args) -> int:
    from .estimate import estimate_memory, load_config

    config = load_config(args.model)
    est = estimate_memory(config, args.method, args.nsamples, args.seqlen, args.dtype, batch_size=args.batch_size,
                          host_grams=args.device == "cuda")
    print(json.dumps(est, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert the built-in model and prepare corpora (idempotent)")
    p.add_argument("--model", default="smollm2-135m")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("models", help="list built-in and demo models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", help="perplexity of a model (PROTOCOL.md)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="sotu")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", default="auto", choices=("auto", "whole", "streamed"))
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="prune a model and write its JSON record")
    _add_config_options(p)
    p.add_argument("--out", default="runs", help="folder for the record (and the model)")
    p.add_argument("--save-model", action="store_true", help="also save the pruned model")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("estimate", help="predicted peak device memory for a model config")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, tiny name, folder or config.json")
    p.add_argument("--method", default="structprune")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="the pipeline keeps Grams in host memory on cuda, on the device on cpu")
    p.set_defaults(func=cmd_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress line is the only one on stderr
    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except StructPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
