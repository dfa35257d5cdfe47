"""The model card (README.md) of an exported folder, generated from the run's record.

It says what the model is (base model, method, sparsity, allocation, per-layer widths), how well
it does (perplexity with its protocol string, dense next to pruned), how fast (only when the record
carries a measured speed; nothing is invented), and how to load it.
"""

from __future__ import annotations


def _fmt(x, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _load_snippet(remote_code: bool) -> str:
    trust = ", trust_remote_code=True" if remote_code else ""
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\"{trust})\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n```\n")


def model_card(record: dict | None, shapes: list[dict], remote_code: bool, base_model_type: str) -> str:
    """Markdown for README.md. `record`: the run's `structprune.run/1` record (None: shapes only)."""
    rec = record or {}
    model = rec.get("model") or {}
    cfg = rec.get("config") or {}
    name = model.get("name") or cfg.get("model") or "unknown"
    lines = ["---", "library_name: transformers", "tags: [structprune, pruned, structured-pruning]", "---", "",
             f"# {name}, structurally pruned", ""]
    sp = rec.get("sparsity") or {}
    lines += ["| | |", "|---|---|",
              f"| base model | {name}" + (f" ({model['description']})" if model.get("description") else "") + " |",
              f"| architecture | {base_model_type} |"]
    if model.get("weights_note"):
        lines.append(f"| base weights | {model['weights_note']} |")
    if rec:
        lines += [f"| method | {rec.get('method')} (structprune run {rec.get('run_id')}) |",
                  f"| allocation | {rec.get('allocation_scheme')} |",
                  f"| sparsity | target {_fmt(sp.get('target'), '.0%')}, achieved {_fmt(sp.get('achieved_prunable'), '.2%')} "
                  f"of prunable, {_fmt(sp.get('achieved_total'), '.2%')} of all parameters |",
                  f"| parameters | {(rec.get('params') or {}).get('before', {}).get('total', 'n/a')} dense -> "
                  f"{(rec.get('params') or {}).get('after', {}).get('total', 'n/a')} pruned |"]
    lines.append("")
    ppl = rec.get("ppl") or {}
    if ppl.get("pruned"):
        lines += ["## Perplexity", "", "| eval set | dense | pruned | protocol |", "|---|---|---|---|"]
        for eval_name, r in ppl["pruned"].items():
            dense = (ppl.get("dense") or {}).get(eval_name, {}).get("value")
            lines.append(f"| {r.get('label', eval_name)} | {_fmt(dense)} | {_fmt(r.get('value'))} | {r.get('protocol')} |")
        lines += ["", "The protocol names the evaluation windows and the calibration data (structprune's "
                  "docs/PROTOCOL.md: non-overlapping windows of the test split).", ""]
    speed = rec.get("speed")
    lines += ["## Speed", ""]
    if speed and speed.get("rows"):
        lines += [f"Measured by structprune on the machine that ran the pruning ({speed['device']}, "
                  f"{speed.get('dtype', '')}, load average {speed['loadavg'][0]:.1f} on {speed['cpu_count']} cores); "
                  f"{speed.get('protocol', '')}. Size: {_fmt(speed['size']['ratio'], '.2f')}x of the dense model.", "",
                  "| shape | dense tokens/s | pruned tokens/s | speed-up |", "|---|---|---|---|"]
        by = {(r["shape"], r["model"]): r for r in speed["rows"]}
        for shape in dict.fromkeys(r["shape"] for r in speed["rows"]):
            d, q = by.get((shape, "dense"), {}), by.get((shape, "pruned"), {})
            lines.append(f"| {shape} | {_fmt(d.get('tokens_per_s'))} | {_fmt(q.get('tokens_per_s'))} | "
                         f"{_fmt(q.get('speedup'), '.2f')}x |")
        lines.append("")
    else:
        lines += [(speed or {}).get("skipped") or "Not measured for this run (`structprune prune --speed` measures "
                  "it).", ""]
    lines += ["## Per-layer shapes", "", "| layer | query heads | KV heads | MLP channels | output biases |",
              "|---|---|---|---|---|"]
    for i, s in enumerate(shapes):
        bias = ", ".join(k for k, flag in (("attention", s["o_bias"]), ("MLP", s["mlp_out_bias"])) if flag) or "-"
        lines.append(f"| {i} | {s['n_heads']} | {s['n_kv_heads']} | {s['intermediate']} | {bias} |")
    lines += ["", "## Loading", "", _load_snippet(remote_code)]
    if remote_code:
        lines += ["Layers differ in shape (or gained output biases), which the family's own config cannot "
                  "express, so this folder ships `modeling_structprune.py`: the family's own model classes with "
                  "each layer's projections given their pruned widths (config.json, `structprune.layer_shapes`). "
                  "`trust_remote_code=True` lets transformers import that file from this folder; it imports only "
                  "torch and transformers and makes no network access. structprune itself is not needed.", ""]
    else:
        lines += ["Every layer has the same shape, so the family's own config describes it: no remote code.", ""]
    return "\n".join(lines)


__all__ = ["model_card"]
