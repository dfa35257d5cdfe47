"""Why `energy=module` fails under the relative error: each module's share of the residual stream.

    .venv/bin/python -m benchmarks.stream_shares [--model smollm2-135m] [--windows 4]

Under the relative error a module's output energy (the denominator of `energy=module`) is
mean_t ||y_t||^2 / ||h_t + y_t||^2: the share of the residual stream the module writes. Dividing a
unit's cost by it makes the modules that write most of the stream look cheapest, and those are the
ones the model can least afford to lose (the first MLP writes almost all of layer 0's output).
This prints and records that share per module, next to the allocation `energy=module` produced.

Pre-norm decoders whose modules add their output projection's output to the stream (the Llama
family, pre-norm OPT); Gemma3's post-norms rescale the output first and are refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from structprune.adapters import adapter_for
from structprune.data.windows import calibration_windows, corpus_token_ids
from structprune.models import load_model

OUT = Path(__file__).parent / "results" / "ablations" / "stream_shares.json"


@torch.no_grad()
def stream_shares(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, list[float]]:
    """Per kind, per layer: mean over tokens of ||y_t||^2 / ||stream_t after the module||^2."""
    adapter = adapter_for(model)
    if adapter.spec.family == "gemma3":
        raise SystemExit("gemma3 rescales module outputs by post-norms; the share is not defined here")
    layers = adapter.layers(model)
    seen: dict[str, torch.Tensor] = {}
    sums = {k: [0.0] * len(layers) for k in ("attn", "mlp")}
    hooks = []
    for i, layer in enumerate(layers):
        def layer_in(_m, args, kwargs, i=i):
            seen[f"h{i}"] = (args[0] if args else kwargs["hidden_states"]).float()

        def out(kind, i):
            def f(_m, _inp, y):
                y = y.float()
                h = seen[f"h{i}"]
                stream = h + y
                sums[kind][i] += float((y.pow(2).sum(-1) / stream.pow(2).sum(-1).clamp_min(1e-30)).mean())
                if kind == "attn":
                    seen[f"h{i}"] = stream  # the MLP writes into the stream after attention
            return f

        hooks.append(layer.register_forward_pre_hook(layer_in, with_kwargs=True))
        for kind in ("attn", "mlp"):
            hooks.append(adapter.out_proj(layer, kind).register_forward_hook(out(kind, i)))
    try:
        for w in ids:
            model(w[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: [s / len(ids) for s in v] for k, v in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4, help="calibration windows (sotu calib, seqlen 512, seed 0)")
    args = p.parse_args()
    lm = load_model(args.model)
    ids = calibration_windows(corpus_token_ids(lm.tokenizer, "sotu", "calib"), args.windows, 512, 0)
    shares = stream_shares(lm.model.eval(), ids)
    for kind, v in shares.items():
        top = sorted(range(len(v)), key=lambda i: -v[i])[:4]
        print(f"{kind}: " + " ".join(f"{s:.3f}" for s in v))
        print(f"  largest shares: " + ", ".join(f"layer {i} ({v[i]:.3f})" for i in top))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": args.model, "windows": args.windows, "seqlen": 512,
                               "calib": "sotu-calib seed 0", "share": shares}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
