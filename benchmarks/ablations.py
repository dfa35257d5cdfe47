"""One change at a time against structprune's default: what moves the held-out calibration loss.

    .venv/bin/python -m benchmarks.ablations                        # every ablation at 30%
    .venv/bin/python -m benchmarks.ablations --sparsities 0.3 0.5 --only damp=0.001
    .venv/bin/python -m benchmarks.ablations --report-only

Each ablation is the default run with one change: either a `PruneConfig` override or a *variant*,
a subclass of `StructPruneMethod` run through `run_prune(..., method=...)` (the engine's extension
point): an idea that did not earn a place in the library, kept here so its numbers can be
reproduced. Judged as the allocation sweep is: by the pruned model's loss on the 16 held-out
calibration windows (never by test perplexity); test perplexities on 16 `sotu` and 16 `brown`
windows are recorded for information. `smollm2-135m`, 64 x 512 calibration, seed 0.

Records: one JSON line per (ablation, sparsity) in `benchmarks/results/ablations/ablations.jsonl`
(resumable: finished pairs are skipped), and ABLATIONS.md next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from structprune.config import PruneConfig
from structprune.gram import relative_weights
from structprune.methods import Method
from structprune.methods.structprune import StructPruneMethod
from structprune.models import LoadedModel, load_model
from structprune.run import run_prune

RESULTS = Path(__file__).parent / "results" / "ablations"
EVAL_WINDOWS = 16

Variant = Callable[[LoadedModel, PruneConfig], Method]  # the method a run uses instead of the default


@dataclass(frozen=True)
class Ablation:
    name: str
    what: str
    overrides: dict = field(default_factory=dict)
    variant: Variant | None = None  # a structprune variant for the run
    finding: str = ""  # what the numbers were traced to, printed under the table


# --------------------------------------------------------------------------------------------- variants


class AttentionFrozen(StructPruneMethod):
    """No head is pruned: the allocation may only take MLP channels (is the heads/channels split right?)."""

    def allocate(self, specs, stats):
        specs = [dataclasses.replace(s, min_keep=s.n_units) if s.kind == "attn" else s for s in specs]
        return super().allocate(specs, stats)


def attention_frozen(_loaded: LoadedModel, cfg: PruneConfig) -> Method:
    return AttentionFrozen(cfg)


def token_weight_power(p: float) -> Variant:
    """Token weights 1 / ‖h + y‖^(2p): p = 1 is the relative error, p = 0 the plain one."""
    class TokenWeightPower(StructPruneMethod):
        def token_weights(self):
            return lambda y, residual: relative_weights(y, residual).pow_(p)

    return lambda _loaded, cfg: TokenWeightPower(cfg)


def pass2_damping(d: float) -> Variant:
    """The module solves at damping d while pass 1's saliencies (hence the energies and the
    allocation) keep the default: separates damping's effect on the selection and refit from its
    effect on the allocation, which `--damp` changes together."""
    class Pass2Damping(StructPruneMethod):
        def rule(self, *args, **kw):
            cfg, self.cfg = self.cfg, dataclasses.replace(self.cfg, damp=d)
            try:
                return super().rule(*args, **kw)
            finally:
                self.cfg = cfg

    return lambda _loaded, cfg: Pass2Damping(cfg)


def _output_metric(loaded: LoadedModel, mode: str) -> dict[tuple[int, str], torch.Tensor]:
    """Per module, sqrt of a diagonal metric on its output dimensions, mean 1: how strongly the RMSNorms
    downstream of the module (the rest of its layer, every later layer, the final norm) amplify each
    residual dimension, as gain^2 (`gain`) or gain^2 x the squared column norms of the weights that
    read the norm's output (`read`). Each reader's term is normalised to mean 1 before averaging."""
    body = loaded.model.model
    layers = body.layers

    def term(norm, readers) -> torch.Tensor:
        g2 = norm.weight.detach().double().pow(2)
        if mode == "read":
            g2 = g2 * torch.cat([r.weight.detach().double() for r in readers]).pow(2).sum(0)
        return g2 / g2.mean()

    def attn_in(j):
        a = layers[j].self_attn
        return term(layers[j].input_layernorm, (a.q_proj, a.k_proj, a.v_proj))

    def mlp_in(j):
        m = layers[j].mlp
        return term(layers[j].post_attention_layernorm, (m.gate_proj, m.up_proj))

    n = len(layers)
    attn_terms, mlp_terms = [attn_in(j) for j in range(n)], [mlp_in(j) for j in range(n)]  # each once
    final = term(body.norm, (loaded.model.lm_head,))
    out = {}
    for i in range(n):
        later = [t for j in range(i + 1, n) for t in (attn_terms[j], mlp_terms[j])] + [final]
        for kind, terms in (("attn", [mlp_terms[i]] + later), ("mlp", later)):
            m = torch.stack(terms).mean(0)
            out[(i, kind)] = (m / m.mean()).sqrt()
    return out


def output_metric(mode: str) -> Variant:
    """Weigh each output dimension's error by how much the downstream norms amplify it: the module's
    rows are scaled by sqrt(metric) for the saliencies and the solve, and the solution scaled back (the
    refit is row-separable, so only the selection and the energies change)."""
    def variant(loaded: LoadedModel, cfg: PruneConfig) -> Method:
        metric = _output_metric(loaded, mode)
        n_layers = len(loaded.model.model.layers)

        class OutputMetric(StructPruneMethod):
            calls = 0  # pass 1 scores attn then mlp, layer by layer

            def score(self, kind, W, b, G, lay):
                i = (self.calls // 2) % n_layers
                self.calls += 1
                s = metric[(i, kind)].to(W.dtype)
                return super().score(kind, W * s[:, None], None if b is None else b * s, G, lay)

            def rule(self, kind, layer, W, b, G, lay, k_keep, selector=None):
                s = metric[(layer, kind)].to(W.dtype)
                res = super().rule(kind, layer, W * s[:, None], None if b is None else b * s, G, lay, k_keep, selector)
                res.W = res.W / s[:, None].to(res.W.dtype)
                if res.b is not None:
                    res.b = res.b / s.to(res.b.dtype)
                return res

        return OutputMetric(cfg)

    return variant


ABLATIONS = (
    Ablation("default", "structprune's defaults (relative error, softmax relative T = 1, greedy OBS, local)"),
    Ablation("target=dense", "fit each module to the dense model's activations (cross-Gram)", {"target": "dense"}),
    Ablation("selector=admm", "ADMM selection (greedy start) instead of greedy OBS", {"selector": "admm"}),
    Ablation("energy=sensitivity", "measured calibration-loss sensitivity (4 windows) as the energy, T = 1",
             {"energy": "sensitivity"}),
    Ablation("energy=module", "module-normalized costs (each module's cost over its own output energy) as the "
             "energy, T = 1", {"energy": "module"},
             finding="Under the relative error a module's own output energy is its share of the residual stream "
             "it writes (mean ||y||^2 / ||h + y||^2), so dividing by it makes the modules that write most of the "
             "stream look cheapest. `benchmarks/stream_shares.py` (4 calibration windows) gives the largest "
             "shares to layer 0's MLP (0.998: it writes nearly all of layer 0's output), layer 29's MLP (0.383) "
             "and the attention of layers 0, 1 and 24 (0.687, 0.278, 0.196); the allocation of this ablation "
             "pruned exactly those five modules hardest (both MLPs to the 90% cap, the three attentions to 3 of "
             "9 heads) and nothing else that far."),
    Ablation("energy=residual", "costs over the residual stream's mean energy as the energy, T = 1",
             {"energy": "residual"},
             finding="The mean energy of the residual stream jumps 60x at layer 12 (1.88e4 to 1.13e6, pass 1 of the "
             "default 30% record) while the typical token's (the harmonic mean the relative energy uses) does not "
             "move (1.75e4 to 1.73e4): from layer 12 on one attention-sink token dominates the mean. Dividing by "
             "it makes layers 12-19 look 60x cheaper, and this allocation pruned their MLPs by 51-84% (every "
             "other MLP at most 41%). Under the plain error (session 2's default) the saliencies were dominated "
             "by the same token, so the mean matched them; under the relative error it no longer does."),
    Ablation("damp=0.1", "10x the solver damping (pass 1's saliencies and pass 2)", {"damp": 0.1}),
    Ablation("damp=0.001", "1/10 the solver damping (pass 1's saliencies and pass 2)", {"damp": 0.001}),
    Ablation("pass-2 damp=0.1", "10x the damping in pass 2's solves only (pass 1 and the allocation as default)",
             variant=pass2_damping(0.1)),
    Ablation("pass-2 damp=0.001", "1/10 the damping in pass 2's solves only", variant=pass2_damping(0.001)),
    Ablation("attention frozen", "no head pruned; the budget comes from MLP channels only", variant=attention_frozen),
    Ablation("token weight power 0.5", "token weights 1 / ‖h + y‖ (half-way to the plain error)",
             variant=token_weight_power(0.5)),
    Ablation("output metric gain", "errors weighted by the downstream norms' gain^2 per dimension",
             variant=output_metric("gain")),
    Ablation("output metric read", "errors weighted by gain^2 x the reading weights' column norms",
             variant=output_metric("read")),
    Ablation("block refit 2 ep lr 1e-4", "each pruned layer fit to the dense layer's output through its "
             "nonlinearities, constant learning rate (`--refine-epochs 2 --refine-lr 1e-4 --refine-schedule constant`)",
             {"refine_epochs": 2, "refine_lr": 1e-4, "refine_schedule": "constant"}),
    Ablation("block refit 3 ep lr 3e-4", "as above at lr 3e-4, 3 epochs",
             {"refine_epochs": 3, "refine_lr": 3e-4, "refine_schedule": "constant"}),
    Ablation("block refit 6 ep cosine", "as above, 6 epochs, lr 1e-3 decayed by a half cosine (`--refine-epochs 6`)",
             {"refine_epochs": 6}),
)


# --------------------------------------------------------------------------------------------- runs


def run_one(ab: Ablation, sparsity: float, loaded: LoadedModel, cache: dict) -> dict:
    cfg = PruneConfig(sparsity=sparsity, eval_data=("sotu", "brown"), eval_windows=EVAL_WINDOWS, **ab.overrides)
    t0 = time.perf_counter()
    method = ab.variant(loaded, cfg) if ab.variant else None
    # a variant may change pass 1's statistics: never share them
    rec = run_prune(cfg, loaded, evaluate_dense=False, stats_cache=None if ab.variant else cache, method=method).record
    alloc = rec["allocation"]
    return {
        "ablation": ab.name, "what": ab.what, "sparsity": sparsity, "config": cfg.to_dict(),
        "heldout_loss": rec["calib_loss"].get("heldout"), "insample_loss": rec["calib_loss"]["pruned"],
        "ppl": {name: r["value"] for name, r in rec["ppl"]["pruned"].items()},
        "protocol": {name: r["protocol"] for name, r in rec["ppl"]["pruned"].items()},
        "attn_heads_kept": [a["units_kept"] for a in alloc if a["module"] == "attn"],
        "mlp_sparsity": [round(a["sparsity"], 4) for a in alloc if a["module"] == "mlp"],
        "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
        "commit": rec["environment"]["git_commit"],
    }


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(rows: list[dict]) -> str:
    sparsities = sorted({r["sparsity"] for r in rows})
    base = {r["sparsity"]: r["heldout_loss"] for r in rows if r["ablation"] == "default"}
    head = "| ablation | " + " | ".join(
        f"held-out {s:.0%} | vs default | sotu ppl {s:.0%} | brown ppl {s:.0%}" for s in sparsities) + " |"
    lines = ["# Ablations of structprune's defaults (smollm2-135m, 64 x 512 calibration, seed 0)", "",
             "Held-out calibration loss (nats/token, 16 windows of the calibration split that share no token "
             "with the calibration windows) decides; lower is better. Test perplexities for information: "
             f"`sotu-test · seqlen 512 · {EVAL_WINDOWS} windows` and `brown-test · seqlen 512 · {EVAL_WINDOWS} "
             "windows`. Written by `benchmarks/ablations.py`.", "",
             head, "|---|" + "---:|" * (4 * len(sparsities))]
    for ab in ABLATIONS:
        cells = []
        for s in sparsities:
            r = next((r for r in rows if r["ablation"] == ab.name and r["sparsity"] == s), None)
            if r is None:
                cells += ["–"] * 4
                continue
            delta = r["heldout_loss"] - base[s] if s in base and ab.name != "default" else None
            cells += [f"{r['heldout_loss']:.4f}", "" if delta is None else f"{delta:+.4f}",
                      f"{r['ppl']['sotu']:.2f}", f"{r['ppl']['brown']:.2f}"]
        if any(c not in ("–", "") for c in cells):
            lines.append(f"| {ab.name}: {ab.what} | " + " | ".join(cells) + " |")
    findings = [f"- **{ab.name}**: {ab.finding}" for ab in ABLATIONS
                if ab.finding and any(r["ablation"] == ab.name for r in rows)]
    if findings:
        lines += ["", "## Findings", ""] + findings
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3])
    p.add_argument("--only", nargs="+", metavar="NAME", help="ablation names (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "ablations.jsonl"
    known = {a.name for a in ABLATIONS}
    unknown = set(args.only or ()) - known
    if unknown:
        p.error(f"unknown ablation(s) {', '.join(sorted(unknown))}; choose from: {', '.join(sorted(known))}")
    if not args.report_only:
        done = {(r["ablation"], r["sparsity"]) for r in load_rows(path)}
        todo = [(a, s) for s in args.sparsities for a in ABLATIONS
                if (not args.only or a.name in args.only) and (a.name, s) not in done]
        loaded = load_model("smollm2-135m") if todo else None
        cache: dict = {}
        for ab, s in todo:
            row = run_one(ab, s, loaded, cache)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{ab.name:28s} {s:.0%}: held-out {row['heldout_loss']:.4f}  sotu {row['ppl']['sotu']:.2f}  "
                  f"brown {row['ppl']['brown']:.2f}  ({row['seconds']:.0f} s)", flush=True)
    (args.results / "ABLATIONS.md").write_text(report(load_rows(path)))
    print(f"wrote {args.results / 'ABLATIONS.md'}")


if __name__ == "__main__":
    main()
