"""CPU measurement of the transient device memory the byte formulas account for.

Each region runs under `structprune.memprobe.probe` (the allocator's events replayed in time order:
what `torch.cuda.max_memory_allocated` would report above the region's start) and is compared with
the figure `structprune.memory` accounts for it:

- ``saliency``: pass 1's unit scores of one module (`StructPruneMethod.score`: group OBS) vs
  `saliency_bytes`;
- ``solve``: one module's solve (`StructPruneMethod.rule`: greedy group-OBS, swaps on heads, refit;
  pass 1's sensitivity and pass 2) vs `solver_bytes`;
- ``gram-batch``: one batch through a `GramHook` (its fp32 augmented copy and the update) vs
  `gram_batch_bytes`;
- ``forward``: one decoder layer's forward on one batch (output included), without hooks and
  with pass 1's two Gram hooks (plain and relative), vs `forward_workspace_bytes` (hooked=False /
  True, relative=False / True).

Random data; shapes of real modules (d_out = hidden, n input columns). Writes
benchmarks/results/memory/cpu-transients.json. Run with OMP_NUM_THREADS=1 on a busy machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_transients.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from structprune.adapters import LayerLayout  # noqa: E402
from structprune.config import PruneConfig  # noqa: E402
from structprune.gram import GramHook  # noqa: E402
from structprune.memory import (forward_workspace_bytes, gram_batch_bytes, saliency_bytes,  # noqa: E402
                                solver_bytes)
from structprune.memprobe import probe  # noqa: E402
from structprune.methods.structprune import StructPruneMethod  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "memory" / "cpu-transients.json"
HEAD_DIM = 128
# (kind, d_out, n): attention output projections (d_out = hidden = heads x 128) and MLP down
# projections (n = intermediate, about 2.7 x hidden as in Llama); 4096+ columns solve in fp32
SOLVER_SHAPES = [("attn", 1024, 1024), ("attn", 2048, 2048), ("attn", 4096, 4096),
                 ("mlp", 384, 1024), ("mlp", 768, 2048), ("mlp", 1536, 4096), ("mlp", 2048, 5504)]
QUICK_SHAPES = [("attn", 1024, 1024), ("mlp", 768, 2048), ("mlp", 1536, 4096)]


def _row(region: str, measured: int, accounted: int, **kw) -> dict:
    return {"region": region, **kw, "measured_bytes": int(measured), "accounted_bytes": int(accounted),
            "measured_over_accounted": round(measured / accounted, 4)}


def _problem(d: int, n: int, seed: int = 0):
    """W (d, n) bf16 and the augmented Gram of 2n random tokens with uneven column scales."""
    g = torch.Generator().manual_seed(seed)
    T = 2 * n
    X = torch.randn(T, n, generator=g) * torch.rand(n, generator=g)
    Xa = torch.cat([X, torch.ones(T, 1)], 1)
    G = Xa.T @ Xa / T
    W = (torch.randn(d, n, generator=g) / n ** 0.5).to(torch.bfloat16)
    return W, G


def solver_rows(shapes, sparsity: float = 0.3) -> list[dict]:
    method = StructPruneMethod(PruneConfig(sparsity=sparsity))
    rows = []
    for kind, d, n in shapes:
        W, G = _problem(d, n)
        heads = n // HEAD_DIM
        inter = n if kind == "mlp" else 4 * d
        lay = LayerLayout(d, heads, heads, HEAD_DIM, inter, True, False, False)
        units = heads if kind == "attn" else n
        k_keep = int(round((1 - sparsity) * units))
        group = HEAD_DIM if kind == "attn" else 1
        t0 = time.perf_counter()
        with probe() as r:
            method.score(kind, W, None, G, lay)
        t1 = time.perf_counter()
        rows.append(_row("saliency", r.peak, saliency_bytes(d, n, group), kind=kind, d_out=d, n=n,
                         seconds=round(t1 - t0, 2)))
        with probe() as r:
            method.rule(kind, 0, W, None, G, lay, k_keep)
        rows.append(_row("solve", r.peak, solver_bytes(d, n, group), kind=kind, d_out=d, n=n, k_keep=k_keep,
                         seconds=round(time.perf_counter() - t1, 2)))
        print(rows[-2], "\n", rows[-1], flush=True)
    return rows


def gram_rows(widths, tokens: int = 2048) -> list[dict]:
    rows = []
    for n in widths:
        lin = torch.nn.Linear(n, 8, bias=False)
        x = torch.randn(1, tokens, n).to(torch.bfloat16)
        hook = GramHook(lin)
        with probe() as r:
            hook._pre_hook(lin, (x,))
        lay = LayerLayout(1024, 8, 8, HEAD_DIM, n, True, False, False)  # the hooked width: n
        rows.append(_row("gram-batch", r.peak, gram_batch_bytes(lay, 1, tokens), n=n, tokens=tokens))
        print(rows[-1], flush=True)
    return rows


def _layer_configs():
    from transformers import LlamaConfig, OPTConfig

    llama = LlamaConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                        intermediate_size=2816, vocab_size=512, max_position_embeddings=4096)
    gqa = LlamaConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=2816, vocab_size=512, max_position_embeddings=4096)
    opt = OPTConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, ffn_dim=4096,
                    vocab_size=512, max_position_embeddings=4096, word_embed_proj_dim=1024)
    return {"llama-1024": llama, "llama-gqa-1024": gqa, "opt-1024": opt}


def forward_rows(seqlens=(512, 2048), dtype=torch.bfloat16) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from structprune.adapters import adapter_for
    from structprune.memory import DTYPE_BYTES
    from structprune.streaming import LayerStream

    rows = []
    for name, cfg in _layer_configs().items():
        cfg._attn_implementation = "sdpa"
        cfg.use_cache = False
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
        ad = adapter_for(model)
        stream = LayerStream(model, ad, "cpu", batch_size=1)
        layer = ad.layers(model)[0]
        lay = ad.layout(layer)
        for S in seqlens:
            ids = torch.randint(0, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(0))
            x = stream.embed(ids).tensors[0]
            kwargs = stream.layer_kwargs(0, x)
            work = forward_workspace_bytes(lay, 1, S, DTYPE_BYTES[dtype], hooked=False)
            work_hooked = forward_workspace_bytes(lay, 1, S, DTYPE_BYTES[dtype], hooked=True)
            with torch.no_grad():
                layer(x, **kwargs)  # warm-up (lazy buffers)
                with probe() as r:
                    y = layer(x, **kwargs)
                del y
                rows.append(_row("forward", r.peak, work, config=name, seqlen=S, batch=1, hooks="none",
                                 dtype=str(dtype).removeprefix("torch.")))
                hooks = [GramHook(ad.out_proj(layer, k)) for k in ("attn", "mlp")]
                with hooks[0], hooks[1], probe() as r:
                    y = layer(x, **kwargs)
                del y, hooks
                rows.append(_row("forward", r.peak, work_hooked, config=name, seqlen=S,
                                 batch=1, hooks="pass-1 grams", dtype=str(dtype).removeprefix("torch.")))
                work_rel = forward_workspace_bytes(lay, 1, S, DTYPE_BYTES[dtype], hooked=True, relative=True)
                hooks = [GramHook(ad.out_proj(layer, k), residual=lambda: x) for k in ("attn", "mlp")]
                with hooks[0], hooks[1], probe() as r:
                    y = layer(x, **kwargs)
                del y, hooks
                rows.append(_row("forward", r.peak, work_rel, config=name, seqlen=S,
                                 batch=1, hooks="pass-1 relative grams", dtype=str(dtype).removeprefix("torch.")))
            print(*rows[-3:], sep="\n", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three solver shapes, one sequence length")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = solver_rows(QUICK_SHAPES if args.quick else SOLVER_SHAPES)
    rows += gram_rows([1024, 2816, 4096])
    rows += forward_rows((512,) if args.quick else (512, 2048))
    worst = max(abs(r["measured_over_accounted"] - 1) for r in rows)
    rec = {
        "kind": "cpu-transients", "schema": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "method": "torch.profiler profile_memory: [memory] events replayed in time order, peak of the "
                  "running sum above the region's start (structprune/memprobe.py)",
        "rows": rows, "worst_relative_gap": round(worst, 4), "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out} ({rec['seconds']} s); worst |measured/accounted - 1| = {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
