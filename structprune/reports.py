"""Run records (run.py's JSON, docs/PROTOCOL.md) as tidy DataFrames for plots, tables and CSV export,
and the benchmark records under `benchmarks/results/`.

Every perplexity row keeps its protocol string; `eval_protocol` is the part that decides whether
two numbers are comparable (eval split, seqlen, windows), the rest (calibration) describes the run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

RUN_SCHEMA_PREFIX = "structprune.run/"
MIB = 2**20


def format_bytes(n: float | None) -> str:
    """Bytes for people: three digits in the largest binary unit (GiB, MiB, KiB), "n/a" when unknown."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def allocation_frame(record: dict) -> pd.DataFrame:
    """One row per module: layer, module, units and parameters total/kept/pruned, sparsity, energy."""
    df = pd.DataFrame(record.get("allocation") or [])
    if df.empty:
        return df
    sens = {(r["layer"], r["module"]): r["delta_loss"] for r in record.get("energies", {}).get("sensitivity", [])}
    df["sensitivity"] = [sens.get((la, m)) for la, m in zip(df["layer"], df["module"])]
    return df


def ppl_frame(record: dict) -> pd.DataFrame:
    """Rows (corpus, label, model = dense | pruned, value, protocol, windows, seqlen)."""
    rows = []
    for which in ("dense", "pruned"):
        for corpus, r in (record.get("ppl", {}).get(which) or {}).items():
            value = r.get("value")
            rows.append({"corpus": corpus, "label": r.get("label", corpus), "model": which,
                         "value": value if value is not None else math.inf, "protocol": r.get("protocol", ""),
                         "windows": r.get("windows"), "seqlen": r.get("seqlen")})
    return pd.DataFrame(rows)


def params_frame(record: dict) -> pd.DataFrame:
    """Rows (count = all | prunable, model = dense | pruned, params)."""
    p = record.get("params", {})
    rows = []
    for which, key in (("dense", "before"), ("pruned", "after")):
        for count in ("total", "prunable"):
            rows.append({"count": "all parameters" if count == "total" else "prunable (heads + channels)",
                         "model": which, "params": p.get(key, {}).get(count)})
    return pd.DataFrame(rows)


def timeline_frame(record: dict, bins: int = 150) -> pd.DataFrame:
    """The run's device-memory timeline: t (s), mib, peak_mib (running maximum), label; plus the
    kind (measured / accounted). Long timelines are reduced to the maximum per time bin (the
    envelope a reader needs: hold/release pairs every few milliseconds are unreadable)."""
    mem = record.get("memory", {})
    df = pd.DataFrame(mem.get("timeline") or [], columns=["t", "bytes", "label"])
    if len(df) > bins:
        b = pd.cut(df["t"], bins, labels=False)
        df = df.loc[df.groupby(b)["bytes"].idxmax().dropna().astype(int)].sort_values("t")
    df = df.reset_index(drop=True)
    df["mib"] = df["bytes"] / MIB
    df["peak_mib"] = df["mib"].cummax()
    df["kind"] = mem.get("kind", "")
    return df


def refit_frame(record: dict) -> pd.DataFrame:
    """Per pruned module: reconstruction error of the kept units before (masked) and after the
    least-squares refit, as logged by the solver (mean squared output error per token)."""
    rows = [{"layer": m["layer"], "module": m["module"], "kept": m.get("kept"),
             "err_no_refit": m["err_no_refit"], "err_after_refit": m["err_after_refit"]}
            for m in record.get("modules", []) if "err_no_refit" in m and "err_after_refit" in m]
    return pd.DataFrame(rows, columns=["layer", "module", "kept", "err_no_refit", "err_after_refit"])


def admm_frame(record: dict) -> pd.DataFrame:
    """Long rows (layer, module, iteration, rho, primal_residual, dual_residual, support_changes)
    of every module solved by ADMM (selector="admm")."""
    rows = []
    for m in record.get("modules", []):
        tr = m.get("trace")
        if not tr:
            continue
        for it, (rho, pr, du, ch) in enumerate(zip(tr["rho"], tr["primal_residual"], tr["dual_residual"],
                                                   tr["support_changes"]), start=1):
            rows.append({"layer": m["layer"], "module": m["module"], "iteration": it, "rho": rho,
                         "primal_residual": pr, "dual_residual": du, "support_changes": ch,
                         "converged": tr.get("converged"), "kept_from": tr.get("kept_from")})
    return pd.DataFrame(rows, columns=["layer", "module", "iteration", "rho", "primal_residual", "dual_residual",
                                       "support_changes", "converged", "kept_from"])


OVERLAY_COLUMNS = ["run", "method", "scheme", "layer", "module", "sparsity"]


def allocation_overlay_frame(records: dict[str, dict]) -> pd.DataFrame:
    """Long frame (run, method, scheme, layer, module, sparsity) of several runs, keyed by a display label."""
    frames = []
    for label, rec in records.items():
        df = allocation_frame(rec)
        if not df.empty:
            scheme = rec.get("allocation_scheme") or (rec.get("config") or {}).get("allocation")
            frames.append(df.assign(run=label, method=rec.get("method"), scheme=scheme)[OVERLAY_COLUMNS])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OVERLAY_COLUMNS)


# what a recorded allocation scheme is called on screen (the record keeps the short name)
SCHEME_LABELS = {"al-am": "FLAP's own (AL-AM: across layers and modules)",
                 "global-taylor": "global Taylor ranking"}


def scheme_label(scheme: str | None) -> str:
    return SCHEME_LABELS.get(scheme or "", scheme or "?")


def run_choice_label(row: dict) -> str:
    """How a run is named when runs are picked by what they are, not by hash:
    'structprune · softmax T=1 (relative) · s=30% · seed 0 · 2024-05-01 12:00'."""
    scheme = scheme_label(row.get("allocation"))
    t = row.get("temperature")
    if scheme == "softmax" and t is not None and not (isinstance(t, float) and math.isnan(t)):
        scheme = f"softmax T={'inf' if math.isinf(float(t)) else f'{float(t):g}'} ({row.get('energy')})"
    s = row.get("sparsity_target")
    s = f"s={s:.0%}" if isinstance(s, (int, float)) and not math.isnan(s) else "s=?"
    when = str(row.get("created") or "")[:16].replace("T", " ")
    return " · ".join(x for x in (str(row.get("method")), scheme, s, f"seed {row.get('seed')}", when) if x)


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 run', '2 runs'."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def eval_protocol(protocol: str) -> str:
    """'sotu-test · seqlen 512 · 4 windows · calib ...' -> 'sotu-test · seqlen 512 · 4 windows'."""
    return protocol.split(" · calib")[0]


def _temperature(cfg: dict, scheme: str) -> float:
    if scheme != "softmax":
        return math.nan
    t = cfg.get("temperature", math.nan)
    return math.inf if t in ("inf", None) else float(t)


RUN_COLUMNS = ["run_id", "source", "created", "model", "method", "allocation", "method_allocation", "energy",
               "temperature", "selector", "seed", "sparsity_target", "sparsity_achieved", "sparsity_total",
               "calib_loss_pruned", "calib_loss_heldout", "peak_mib", "memory_kind", "device", "total_s", "corpus", "corpus_label",
               "ppl_pruned", "ppl_dense", "eval_protocol", "protocol", "speedup_prefill", "speedup_decode", "speed_shapes",
               "size_ratio", "speed_device"]


def speed_columns(rec: dict) -> dict:
    """A record's measured speed (its "speed", `speed.speed_section`): the prefill and decode speed-ups
    against dense at batch 1 (the first such shape measured), the shapes they come from, the size ratio."""
    speed = rec.get("speed") or {}
    ups = speed.get("speedup") or {}
    prefill = next((k for k in ups if k.startswith("prefill 1x")), None)
    decode = next((k for k in ups if k.startswith("decode b1 ")), None)
    return {"speedup_prefill": ups.get(prefill, math.nan), "speedup_decode": ups.get(decode, math.nan),
            "speed_shapes": " · ".join(k for k in (prefill, decode) if k) or None,
            "size_ratio": (speed.get("size") or {}).get("ratio", math.nan),
            "speed_device": f"{speed['device']} {speed.get('dtype', '')}".strip() if ups else None}


def speed_frame(rec: dict) -> pd.DataFrame:
    """One row per (shape, model) of a record's measured speed: shape, model, tokens_per_s, speedup."""
    return pd.DataFrame((rec.get("speed") or {}).get("rows") or [], columns=["shape", "model", "tokens_per_s", "speedup"])


def runs_frame(records: list[dict], source: str = "app") -> pd.DataFrame:
    """One row per (run, evaluation corpus): the settings, sparsity, perplexities and protocol
    (columns RUN_COLUMNS, also when there are no records)."""
    rows = []
    for rec in records:
        cfg = rec.get("config", {})
        scheme = rec.get("allocation_scheme") or cfg.get("allocation")
        label = scheme_label(scheme) if scheme != "softmax" else f"softmax ({cfg.get('energy', '')})"
        base = {
            "run_id": rec.get("run_id"), "source": source, "created": rec.get("created"),
            "model": (rec.get("model") or {}).get("name"), "method": rec.get("method"),
            "allocation": scheme, "method_allocation": f"{rec.get('method')} · {label}",
            "energy": cfg.get("energy"), "temperature": _temperature(cfg, scheme), "selector": cfg.get("selector"),
            "seed": cfg.get("seed"), "sparsity_target": rec.get("sparsity", {}).get("target"),
            "sparsity_achieved": rec.get("sparsity", {}).get("achieved_prunable"),
            "sparsity_total": rec.get("sparsity", {}).get("achieved_total"),
            "calib_loss_pruned": (rec.get("calib_loss") or {}).get("pruned"),
            "calib_loss_heldout": (rec.get("calib_loss") or {}).get("heldout"),  # absent in older records
            "peak_mib": (rec.get("memory") or {}).get("peak_bytes", 0) / MIB,
            "memory_kind": (rec.get("memory") or {}).get("kind"), "device": rec.get("device"),
            "total_s": (rec.get("timing") or {}).get("total_s"),
            **speed_columns(rec),
        }
        pruned = (rec.get("ppl") or {}).get("pruned") or {}
        dense = (rec.get("ppl") or {}).get("dense") or {}
        for corpus, r in pruned.items():
            proto = r.get("protocol", "")
            d = dense.get(corpus, {})
            rows.append({**base, "corpus": corpus, "corpus_label": r.get("label", corpus),
                         "ppl_pruned": r.get("value") if r.get("value") is not None else math.inf,
                         "ppl_dense": d.get("value"), "eval_protocol": eval_protocol(proto), "protocol": proto})
        if not pruned:
            rows.append({**base, "corpus": None, "corpus_label": None, "ppl_pruned": None, "ppl_dense": None,
                         "eval_protocol": None, "protocol": None})
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for col in NUMERIC_RUN_COLUMNS:  # floats also with no rows (a concat with an empty frame stays numeric)
        df[col] = pd.to_numeric(df[col].replace({"inf": math.inf}), errors="coerce").astype(float)
    return df


NUMERIC_RUN_COLUMNS = ["temperature", "sparsity_target", "sparsity_achieved", "sparsity_total", "calib_loss_pruned",
                       "calib_loss_heldout", "peak_mib", "total_s", "ppl_pruned", "ppl_dense", "speedup_prefill",
                       "speedup_decode", "size_ratio"]


def load_result_records(folder: str | Path) -> tuple[list[dict], list[dict]]:
    """(run records, gpu-scaling records) from every *.json under `folder` (a file may hold one
    record or a list). Unreadable files are skipped with a warning."""
    runs, gpu = [], []
    folder = Path(folder)
    if not folder.is_dir():
        return runs, gpu
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        for rec in data if isinstance(data, list) else [data]:
            if not isinstance(rec, dict):
                continue
            if str(rec.get("schema", "")).startswith(RUN_SCHEMA_PREFIX):
                runs.append(rec)
            elif rec.get("kind") == "gpu-scaling":
                gpu.append({**rec, "file": path.name})
    return runs, gpu


def gpu_frame(records: list[dict]) -> pd.DataFrame:
    """Measured GPU peaks (kind "gpu-scaling"): config_name, n_params, method, peak/estimate GiB,
    nsamples x seqlen, oom; rows without a peak (skipped, out of memory) keep peak NaN."""
    rows = []
    for r in records:
        peak, est = r.get("peak_bytes"), r.get("estimate_bytes")
        rows.append({"config_name": r.get("config_name"), "n_params": r.get("n_params"), "method": r.get("method"),
                     "peak_gib": peak / 2**30 if peak else math.nan, "estimate_gib": est / 2**30 if est else math.nan,
                     "nsamples": r.get("nsamples"), "seqlen": r.get("seqlen"),
                     "oom": bool(r.get("oom") or r.get("status") == "oom"), "status": r.get("status"),
                     "memory_kind": r.get("memory_kind"), "file": r.get("file")})
    return pd.DataFrame(rows, columns=["config_name", "n_params", "method", "peak_gib", "estimate_gib", "nsamples",
                                       "seqlen", "oom", "status", "memory_kind", "file"])


__all__ = ["allocation_frame", "allocation_overlay_frame", "ppl_frame", "params_frame", "timeline_frame", "refit_frame", "admm_frame",
           "runs_frame", "speed_columns", "speed_frame", "load_result_records", "gpu_frame", "eval_protocol", "run_choice_label", "plural",
           "scheme_label"]
