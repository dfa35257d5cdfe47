"""`structprune` command line: prepare, models, eval, prune, export, estimate.

Options of `prune`, and the shared options of `eval`, `estimate` and `prepare`, come from
`PruneConfig`'s fields: defaults, types, choices, bounds and help in one place. Every refusal (a bad
option or an error of the library) prints one line, `error: ...`, and exits with status 2, before
any model is loaded where the options allow (preflight.py). `prune` checks `--out` writable first,
writes the model before the record and both atomically, leaves nothing behind when it fails, and
records the run in the run store the app shows (unless `--no-store`). A run whose weights stream
from disk writes its layers into `<data>/streamed/<run_id>` and can be continued after a kill, a
full disk or Ctrl-C with `prune --resume DIR` (resume.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import MISSING, fields
from pathlib import Path

from .config import PruneConfig, check_settings, check_value, choices_for, config_field, default_for, help_for, range_text
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
    _open_line[0] = not (event.layer < 0 or event.layer + 1 == event.n_layers)
    if not _open_line[0]:
        sys.stderr.write("\n")
    sys.stderr.flush()


_open_line = [False]  # the progress bar's line is not ended yet: a message after it starts a new one


def _end_progress_line() -> None:
    if _open_line[0]:
        sys.stderr.write("\n")
        _open_line[0] = False


def _help(name: str, extra: str = "", default=MISSING) -> str:
    """A setting's help from PruneConfig, its range and default; `%` escaped for argparse (help strings
    are %-format templates to it)."""
    default = default_for(name) if default is MISSING else default
    parts = [p for p in (range_text(name), f"default: {default}" if default is not None else "") if p]
    text = help_for(name) + extra + (f" ({'; '.join(parts)})" if parts else "")
    return text.replace("%", "%%")


def _config_option(p: argparse.ArgumentParser, name: str, flag: str | None = None, **kw) -> None:
    """One option from a PruneConfig field: its default, type, choices and help (overridable by kw)."""
    f = config_field(name)
    flag = flag or "--" + name.replace("_", "-")
    default = default_for(name)
    if name == "eval_data":
        opts = dict(nargs="+", default=list(default))
    elif isinstance(default, bool):
        opts = dict(action=argparse.BooleanOptionalAction, default=default)
    else:
        kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
        opts = dict(type=kind, default=default, choices=choices_for(name))
    p.add_argument(flag, **{**opts, "help": _help(name), **kw})


def _add_config_options(p: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    for f in fields(PruneConfig):
        if f.name not in skip:
            _config_option(p, f.name)


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


def _flag(name: str) -> str:
    """The CLI flag of a PruneConfig setting, for messages."""
    return "--" + name.replace("_", "-")


def cmd_eval(args) -> int:
    from .data.corpora import check_corpus, corpus_id
    from .data.windows import corpus_token_ids, eval_windows, protocol_string
    from .evaluation import check_seqlen, perplexity, resolve_device
    from .models import TINY_MODELS, load_model, model_config
    from .preflight import check_context

    check_value("eval_windows", args.windows, "--windows")
    check_value("seqlen", args.seqlen, "--seqlen")
    check_value("batch_size", args.batch_size, "--batch-size")
    check_settings({"device": args.device}, _flag)
    resolve_device(args.device)
    if args.model in TINY_MODELS:
        raise StructPruneError(f"{args.model} has no tokenizer; evaluate a built-in model or a model folder")
    config = model_config(args.model)  # unknown name, damaged config.json: refused before any weights load
    if config is not None:
        check_context(config, args.seqlen)
    check_corpus(args.data, "--data")
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise StructPruneError(f"{args.model} has no tokenizer; evaluate a built-in model or a model folder")
    check_seqlen(loaded.model, args.seqlen)
    win = eval_windows(corpus_token_ids(loaded.tokenizer, args.data, "test"), args.seqlen, args.windows)
    proto = protocol_string(corpus_id(args.data, "test"), args.seqlen, win.shape[0])
    t = time.perf_counter()
    res = perplexity(loaded.model, win, device=args.device, mode=args.mode, batch_size=args.batch_size, protocol=proto)
    if not math.isfinite(res.value):
        raise StructPruneError(f"perplexity is not finite ({res.value}) on {proto}: the model overflowed; "
                               "its weights were finite when loaded")
    print(f"perplexity {res.value:.4f}  ({proto}; {loaded.description}; {time.perf_counter() - t:.1f} s)")
    return 0


def _prepare_out(out: Path) -> list[Path]:
    """Makes `out` a writable folder before any work (a probe file written and removed); returns the
    folders it created, which are removed again if the run fails."""
    if out.exists() and not out.is_dir():
        raise StructPruneError(f"--out {out} is a file, not a folder; give a folder for the record")
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".structprune-probe-"):
            pass
    except OSError as exc:
        _remove_empty(missing)
        why = exc.strerror or type(exc).__name__
        raise StructPruneError(f"--out {out} is not a writable folder ({why}); give another --out") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first
        try:
            p.rmdir()
        except OSError:
            pass


def cmd_prune(args) -> int:
    from .paths import data_dir
    from .preflight import preflight

    values = {f.name: getattr(args, f.name) for f in fields(PruneConfig)}
    values["eval_data"] = tuple(values["eval_data"])
    run_id = manifest = None
    if args.resume is not None:  # the run's own settings, but for those given here (compared below)
        from .resume import read_manifest

        manifest = read_manifest(args.resume)
        own = PruneConfig.from_dict(manifest["config"])
        given = _given_settings(args.argv)
        values = {name: values[name] if name in given else getattr(own, name) for name in values}
        run_id = manifest["run_id"]
    check_settings(values, _flag)  # messages name the flags
    cfg = PruneConfig(**values)
    preflight(cfg)  # the model config, reachability, corpora: before any weights load
    if manifest is not None:
        from .resume import check_resume

        check_resume(args.resume, cfg)  # other settings or another model: refused before any work
    out = Path(args.out).expanduser()
    created = _prepare_out(out)
    store = None
    if not args.no_store:
        from .store import RunStore

        try:
            store = RunStore()
        except (OSError, sqlite3.Error) as exc:
            _remove_empty(created)
            raise StructPruneError(f"cannot open the run store in {data_dir()} ({exc}); set STRUCTPRUNE_DATA "
                                   "to a writable folder or pass --no-store") from None
    try:
        return _prune_and_write(cfg, args, out, store, run_id)
    except BaseException:
        _remove_empty(created)
        raise


def _given_settings(argv: list[str]) -> set[str]:
    """The PruneConfig settings given on the command line of `prune` (the rest of a resumed run's
    settings are its own): parsed again with every setting's default unset."""
    unset = object()
    p = _Parser(add_help=False)
    _add_prune_options(p)
    p.set_defaults(**{f.name: unset for f in fields(PruneConfig)})
    ns, _ = p.parse_known_args(argv[argv.index("prune") + 1:])
    return {f.name for f in fields(PruneConfig) if getattr(ns, f.name) is not unset}


def _start_row(store, cfg: PruneConfig, run_id: str | None) -> str:
    """The run's row in the store: a new one, or the interrupted run's again (resumed)."""
    if run_id is None:
        return store.start(cfg.to_dict())
    row = store.get(run_id)
    if row is None:  # run without the store, or with another one
        return store.start(cfg.to_dict(), run_id=run_id)
    if not store.reopen(run_id):
        raise StructPruneError(f"run {run_id} is {row['status']} in the run store ({store.path}); wait for it to end "
                               "before resuming it")
    return run_id


def _prune_and_write(cfg: PruneConfig, args, out: Path, store, run_id: str | None) -> int:
    """The run, then its outputs: the model (if asked) first and the record last, so a record exists
    only next to a complete model; the store row ends finished or failed, never running. A run whose
    weights stream from disk keeps its journal open (resumable) until both are written."""
    import uuid

    from .checkpoint import save_pruned
    from .jsonio import write_json
    from .paths import data_dir
    from .resume import inspect, run_folder
    from .run import NonFiniteResultError, run_prune
    from .weights import streamed_weights

    resume = args.resume
    if store is not None:
        run_id = _start_row(store, cfg, run_id)
    run_id = run_id or uuid.uuid4().hex[:12]
    layer_dir = None if resume else run_folder(store.folder if store is not None else data_dir(), run_id)
    folder = None
    try:
        with store.heartbeat(run_id) if store is not None else contextlib.nullcontext():
            res = run_prune(cfg, on_event=_progress, layer_dir=layer_dir, resume=resume, run_id=run_id, finish=False,
                            measure_speed=args.speed)
        rec = res.record
        if args.save_model:
            folder = out / f"model-{rec['run_id']}"
            provenance = {"run_id": rec["run_id"], "config": rec["config"]}
            # weights that stayed on disk: the run's layer shards move into the folder
            write = streamed_weights(res.layer_dir, res.model, res.weights) if res.layer_dir is not None else None
            save_pruned(res.model, res.tokenizer, folder, provenance=provenance, record=rec, write_weights=write)
            rec["saved_model"] = str(folder)
        path = write_json(out / f"{rec['run_id']}.json", rec)
        if res.journal is not None:
            res.journal.finish(rec["run_id"])
        if store is not None:
            store.finish(run_id, rec)
    except BaseException as exc:
        if folder is not None and folder.exists():  # a model without its record is not kept
            shutil.rmtree(folder, ignore_errors=True)
        left = inspect(resume or layer_dir)
        if left is not None and isinstance(exc, KeyboardInterrupt):
            _end_progress_line()
            print(f"the run can be resumed: structprune prune --resume {left['folder']}", file=sys.stderr)
        if store is not None:
            msg = _one_line(exc) if not isinstance(exc, KeyboardInterrupt) else "interrupted (Ctrl-C)"
            store.fail(run_id, msg, cancelled=isinstance(exc, KeyboardInterrupt),
                       record=exc.record if isinstance(exc, NonFiniteResultError) else None)
        raise
    for name, r in rec["ppl"]["pruned"].items():
        dense = rec["ppl"]["dense"].get(name, {}).get("value")
        print(f"{name}: ppl dense {dense} -> pruned {r['value']}  ({r['protocol']})")
    sp = rec["sparsity"]
    print(f"sparsity target {sp['target']:.3f}, achieved {sp['achieved_prunable']:.4f} of prunable, "
          f"{sp['achieved_total']:.4f} of all parameters; peak device memory "
          f"{rec['memory']['peak_bytes'] / 2**20:.1f} MiB ({rec['memory']['kind']})")
    if "speedup" in rec.get("speed", {}):
        sp = rec["speed"]
        print(f"size {sp['size']['ratio']:.2f}x of dense; speed vs dense on {sp['device']}: " +
              ", ".join(f"{shape} {x:.2f}x" for shape, x in sp["speedup"].items()))
    if folder is not None:
        print(f"pruned model: {folder}")
    print(f"record: {path}" + (f" (and in the run store {store.path})" if store is not None else ""))
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    folder = export_run(args.run, args.out, overwrite=args.overwrite, store_folder=args.store, on_event=_progress)
    trust = "" if json.loads((folder / "config.json").read_text())["structprune"]["plain_hf_loadable"] else \
        ", trust_remote_code=True"
    print(f"pruned model: {folder}  (load: AutoModelForCausalLM.from_pretrained({str(folder)!r}{trust}))")
    return 0


def cmd_runs(args) -> int:
    """Lists the store's runs (newest first), or deletes the ones named, with their files."""
    from .reports import format_bytes
    from .store import RunStore

    store = RunStore.existing(args.store)
    for run_id in args.delete:
        print(f"deleted {run_id} ({format_bytes(store.delete(run_id))} of files freed)")
    if args.delete:
        return 0
    runs = store.runs()
    for r in runs:
        sp = f"{r['sparsity']:.0%}" if isinstance(r["sparsity"], (int, float)) else "?"
        print(f"{r['run_id']}  {r['created'][:16].replace('T', ' ')}  {r['status']:<9}  {r['model']}  {r['method']}  "
              f"{r['allocation']}  {sp}  files {format_bytes(store.owned_bytes(r['run_id']))}")
    print(f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {store.path}")
    return 0


def cmd_estimate(args) -> int:
    from .estimate import estimate_memory, load_config
    from .jsonio import dumps

    for name in ("nsamples", "seqlen", "batch_size"):
        check_value(name, getattr(args, name), _flag(name))
    config = load_config(args.model)
    est = estimate_memory(config, args.method, args.nsamples, args.seqlen, args.dtype, batch_size=args.batch_size,
                          host_grams=args.device == "cuda", weights=args.weights, on_cpu=args.device == "cpu")
    print(dumps(est, indent=1))
    return 0


def _one_line(exc: BaseException) -> str:
    """An exception as one line (messages of other libraries may span several)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, StructPruneError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


class _Parser(argparse.ArgumentParser):
    """Refusals as one line, `error: ...`, exit status 2 (the library's errors read the same)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    _add_config_options(p)
    p.add_argument("--out", default="runs", help="folder for the record (and the model); checked writable "
                                                  "before the run, left as it was if the run fails")
    p.add_argument("--save-model", action="store_true", help="also save the pruned model: a folder plain transformers "
                   "loads, model-<run_id> (docs/EXPORT.md)")
    p.add_argument("--no-store", action="store_true",
                   help="do not record the run in the run store the app shows (STRUCTPRUNE_DATA; default: recorded)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue an interrupted run whose weights streamed from disk from its last finished layer; "
                        "DIR is its layer folder (printed when it starts: <data>/streamed/<run_id>). Settings not "
                        "given are the run's own; a given one that changes the result and differs is refused. The "
                        "model equals an uninterrupted run's (bitwise on the CPU)")
    p.add_argument("--speed", action="store_true", help="afterwards, time the pruned model against dense on the "
                   "run's device (prefill 1 x 128, decode batch 1; a few seconds): the record's \"speed\"")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="structprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert the built-in model and prepare corpora (idempotent)")
    _config_option(p, "model")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("models", help="list built-in and demo models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", help="perplexity of a model (docs/PROTOCOL.md)")
    _config_option(p, "model")
    corpus = default_for("eval_data")[0]
    _config_option(p, "eval_data", "--data", nargs=None, default=corpus, help=_help("eval_data", default=corpus))
    _config_option(p, "seqlen")
    _config_option(p, "eval_windows", "--windows", help="first N windows (default: all)")
    _config_option(p, "device")
    p.add_argument("--mode", default="auto", choices=("auto", "whole", "streamed"),
                   help="whole model on the device, or one layer at a time (streamed); auto picks by memory")
    _config_option(p, "batch_size")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="prune a model and write its JSON record")
    _add_prune_options(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="write the loadable model folder of a finished run (docs/EXPORT.md)")
    p.add_argument("run", metavar="RUN_OR_RECORD", help="a run id in the run store, or a run's record JSON file")
    p.add_argument("--out", required=True, help="the model folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--store", default=None, help="run store folder (default: STRUCTPRUNE_DATA or the cache's runs/)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("runs", help="list the run store's runs, or delete runs with their files")
    p.add_argument("--delete", nargs="+", default=[], metavar="RUN_ID",
                   help="delete these ended runs: their records, pruned layers and model zips")
    p.add_argument("--store", default=None, help="run store folder (default: STRUCTPRUNE_DATA or the cache's runs/)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("estimate", help="predicted peak device memory for a model config")
    _config_option(p, "model", help=_help("model", "; or a config.json"))
    for name in ("method", "nsamples", "seqlen", "batch_size", "dtype"):
        _config_option(p, name)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="the pipeline keeps Grams in host memory on cuda, on the device on cpu; on cpu the host peak "
                        "includes the device's working set (default: cuda)")
    p.add_argument("--weights", choices=("memory", "disk"), default="memory",
                   help="host memory of the weights: the whole model and the run's copy (memory) or the largest "
                        "module read from disk at a time (disk) (default: memory)")
    p.set_defaults(func=cmd_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a refused option (2, one `error:` line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress line is the only one on stderr
    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except StructPruneError as exc:
        _end_progress_line()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder that went away: what failed, not a traceback
        _end_progress_line()
        log.debug("", exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_line()
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with -v
        _end_progress_line()
        log.info("", exc_info=True)
        print(f"error: internal error, {_one_line(exc)} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
