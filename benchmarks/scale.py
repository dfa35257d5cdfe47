"""Scale benchmark (issue 20): the host memory and wall time of pruning with the weights on disk.

    PYTHONPATH=. nice -n 19 .venv/bin/python -m benchmarks.scale                 # 1B, 3B, 7B (hours on a CPU)
    PYTHONPATH=. nice -n 19 .venv/bin/python -m benchmarks.scale --shapes 1b     # one shape
    PYTHONPATH=. nice -n 19 .venv/bin/python -m benchmarks.scale --smoke --out /tmp/scale   # seconds: tiny shape
    PYTHONPATH=. .venv/bin/python -m benchmarks.scale --shapes 1b,1b-4l --memory-at none --largest-limited-only \
        --limit-bytes 3221225472 --nsamples 8 --seqlen 128 --out /tmp/depth   # the depth check (~10 min), kept as depth.json

Models: random-weight Llama-family models written to disk as bf16 safetensors, one shard per
decoder layer plus one for the embeddings, final norm and head, with an index: the shapes of
TinyLlama-1.1B (1b), OpenLLaMA-3B (3b) and Llama-2-7B at full depth (7b), all with Llama-2's 32000-
token vocabulary, so the embeddings and head (the largest modules besides a layer) grow with the
width only. Weights ~ N(0, 0.02) (norms 1) from a seeded generator, written one shard at a time; a
folder already written for the same shape is reused. Memory does not depend on the weights' values.

Runs, each in its own child process (`--child`), on the CPU (float32 compute), with the cheapest
solver settings (structprune, uniform allocation, one-shot diagonal saliency, plain Grams, refit)
and small calibration (random tokens, --nsamples x --seqlen), no dense evaluation, one pruned window:
- `disk` at every shape: the weights streamed from the files (PruneConfig.weights = "disk");
- `memory` at the 1b shape: the whole model loaded first, for the wall-time ratio;
- `disk` again at the largest shape under an address-space limit (RLIMIT_AS, set in the child
  before it imports anything) smaller than the model's bytes (--limit-bytes, default half of
  them). RLIMIT_AS rather than a cgroup: it needs no privileges nor a systemd instance (this VM
  runs none), and it bounds virtual memory, which is never below the resident memory, so a run
  that fits under it fits in that much RAM. Everything the run maps counts (the libraries, the
  safetensors file being read, spilled activations). With --largest-limited-only the largest
  shape runs only this way, and its peak is this run's.
Each run writes its pruned layers into the work folder, removed afterwards.
Measured in the child: peak resident memory (VmHWM of /proc/self/status, or the largest sample
above it; also VmPeak, the peak
virtual size), the resident size after the imports (what Python and torch hold before any model),
the wall time of loading plus pruning, and the resident size every 0.25 s with the run's stage (where
the peak happens); next to it, the estimator's prediction of the host peak (what the Prune page
shows). Records: benchmarks/results/scale/scale.json (smoke runs: scale-smoke.json in --out), with
the machine's load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "scale"

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)
SHAPES = {  # copied from each model's config.json on the Hugging Face hub (SOURCES)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, **_LLAMA2),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, **{**_LLAMA2, "rms_norm_eps": 1e-6}),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, **{**_LLAMA2, "max_position_embeddings": 4096}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False),
}
SHAPES["1b-4l"] = {**SHAPES["1b"], "num_hidden_layers": 4}  # the depth check (and scale_allocator)
SOURCES = {"1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "3b": "openlm-research/open_llama_3b",
           "7b": "meta-llama/Llama-2-7b-hf", "1b-4l": "TinyLlama's width at 4 layers (the depth check)",
           "tiny": "a smoke-test shape"}
SETTINGS = dict(method="structprune", allocation="uniform", selector="saliency", saliency="diag",
                relative_error=False, sparsity=0.3, device="cpu", dtype="float32", eval_windows=1)
SMOKE_LIMIT = 2 << 30  # the smoke run's limit: torch and the run map ~0.9 GiB; the tiny model is far below it


# --- the models on disk ---------------------------------------------------------------------------

def write_model(shape: str, folder: Path, seed: int = 0) -> int:
    """Writes the shape's random-weight model (bf16, one shard per layer + one for the rest, an
    index) unless `folder` already holds it; returns its weights' bytes on disk."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    done = folder / ".scale-complete"
    spec = json.dumps({"shape": SHAPES[shape], "seed": seed}, sort_keys=True)
    if not (done.exists() and done.read_text() == spec):
        folder.mkdir(parents=True, exist_ok=True)
        cfg = LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16")
        with torch.device("meta"):
            names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).named_parameters()}
        groups: dict[str, list[str]] = {}
        for n in names:
            part = n.split(".")
            shard = f"model-layer-{int(part[2]):05d}.safetensors" if part[1:2] == ["layers"] else "model-base.safetensors"
            groups.setdefault(shard, []).append(n)
        gen = torch.Generator().manual_seed(seed)
        weight_map, total = {}, 0
        for shard, members in sorted(groups.items()):
            state = {}
            for n in members:  # one tensor at a time in fp32, then bf16
                t = torch.ones(names[n]) if n.endswith("norm.weight") else torch.randn(names[n], generator=gen) * 0.02
                state[n] = t.to(torch.bfloat16)
            save_file(state, folder / shard, metadata={"format": "pt"})
            total += sum(t.numel() * 2 for t in state.values())
            weight_map.update({n: shard for n in members})
            del state
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(folder)
        done.write_text(spec)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --- one run, in a child process ------------------------------------------------------------------

def _status() -> dict[str, int]:
    """VmHWM, VmPeak, VmRSS of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmPeak", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


class RssSampler:
    """Samples this process's resident size every `every` seconds in a thread, with the run's stage
    at that moment (run_prune's progress events), to say where the peak happens."""

    def __init__(self, every: float = 0.25) -> None:
        import threading

        self.every, self.stage, self.samples = every, "load", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()

    def on_event(self, event) -> None:
        self.stage = event.stage

    def _sample(self) -> None:
        self.samples.append((time.perf_counter() - self._t0, _status()["VmRSS"], self.stage))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # a run shorter than `every` still has one

    def by_stage(self) -> dict[str, int]:
        """The largest sampled resident size in each stage."""
        out: dict[str, int] = {}
        for _, rss, stage in self.samples:
            out[stage] = max(out.get(stage, 0), rss)
        return out

    def timeline(self, points: int = 300) -> list[list]:
        """[seconds, resident bytes, stage], thinned to about `points` (each kept sample the
        largest of its stretch, so the peak survives)."""
        step = max(1, len(self.samples) // points)
        out = []
        for i in range(0, len(self.samples), step):
            chunk = self.samples[i:i + step]
            top = max(chunk, key=lambda s: s[1])
            out.append([round(top[0], 2), top[1], top[2]])
        return out


def child(spec_path: str) -> None:
    """Runs one pruning run as `spec` says and writes what it measured to spec["result"]."""
    spec = json.loads(Path(spec_path).read_text())
    import torch  # the imports' resident size is measured before any model

    from structprune.config import PruneConfig
    from structprune.models import load_model
    from structprune.run import run_prune

    after_imports = _status()["VmRSS"]
    sampler = RssSampler()
    cfg = PruneConfig(model=spec["folder"], weights=spec["mode"], nsamples=spec["nsamples"], seqlen=spec["seqlen"],
                      **SETTINGS)
    t = time.perf_counter()
    if spec["mode"] == "disk":
        loaded = load_model(spec["folder"], on_disk=True)
    else:  # the whole model in host memory (load_model would also want a tokenizer; random tokens here)
        from transformers import AutoModelForCausalLM

        from structprune.models import LoadedModel

        model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32, attn_implementation="sdpa")
        loaded = LoadedModel(spec["folder"], model.eval(), None, "folder", spec["folder"])
    load_s = time.perf_counter() - t
    with sampler:
        res = run_prune(cfg, loaded, on_event=sampler.on_event, evaluate_dense=False, layer_dir=spec["layers"],
                        activation_budget=spec.get("activation_budget"))
    wall = time.perf_counter() - t
    rec = res.record
    status = _status()
    # the kernel updates VmHWM lazily (per-thread RSS counters): a sample can be a few pages above it
    peak = max([status["VmHWM"]] + [rss for _, rss, _ in sampler.samples])
    out = {"wall_s": wall, "load_s": load_s, "peak_rss_bytes": peak, "peak_vm_bytes": status["VmPeak"],
           "rss_after_imports_bytes": after_imports, "timing": rec["timing"], "weights": rec["weights"],
           "kept": [m["kept"] for m in rec["modules"]], "achieved_prunable": rec["sparsity"]["achieved_prunable"],
           "ppl_pruned": rec["ppl"]["pruned"]["random"]["value"], "cpus": rec["environment"]["cpus"],
           "accounted_peak_bytes": rec["memory"]["peak_bytes"], "rss_by_stage": sampler.by_stage(),
           "rss_timeline": sampler.timeline()}
    Path(spec["result"]).write_text(json.dumps(out))


def run_child(folder: Path, mode: str, work: Path, nsamples: int, seqlen: int, limit: int | None = None,
              activation_budget: int | None = None, timeout: float | None = None) -> dict:
    """One run in a child process (under RLIMIT_AS = `limit` bytes when given): what it measured,
    or ok False with the end of its stderr."""
    tag = f"{folder.name}-{mode}{'-limited' if limit else ''}"
    spec = {"folder": str(folder), "mode": mode, "nsamples": nsamples, "seqlen": seqlen,
            "result": str(work / f"{tag}.result.json"), "activation_budget": activation_budget,
            "layers": str(work / f"{tag}-layers")}  # the pruned layers: removed after the run
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)

    def limit_memory():  # in the child, before it imports anything
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    load = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child", str(spec_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=limit_memory,
                          capture_output=True, text=True, timeout=timeout)
    row = {"shape_folder": folder.name, "mode": mode, "limit_bytes": limit, "process_s": time.perf_counter() - t,
           "loadavg_before": load, "loadavg_after": os.getloadavg(), "ok": proc.returncode == 0}
    shutil.rmtree(spec["layers"], ignore_errors=True)
    if proc.returncode == 0:
        row.update(json.loads(Path(spec["result"]).read_text()))
    else:
        row.update(returncode=proc.returncode, stderr_tail=proc.stderr[-2000:])
    return row


# --- the benchmark --------------------------------------------------------------------------------

def predicted_host_peak(shape: str, mode: str, nsamples: int, seqlen: int) -> int:
    """The estimator's host peak for a run of this benchmark (estimate_memory on the CPU, the
    process's own HOST_PROCESS_BYTES included): what the app's Prune page shows before it."""
    from transformers import LlamaConfig

    from structprune.estimate import estimate_memory

    est = estimate_memory(LlamaConfig(**SHAPES[shape]), SETTINGS["method"], nsamples, seqlen, "float32",
                          sensitivity=False, relative=SETTINGS["relative_error"], weights=mode, on_cpu=True)
    return est["host_peak_bytes"] + est["host_process_bytes"]


def depth_pairs(disk: dict[str, dict], shapes: list[str]) -> dict[str, float]:
    """Shapes of one width at different depths (1b and 1b-4l): the deeper one's peak over the
    shallower one's, which is 1 when the host holds one layer at a time whatever the depth."""
    width = {k: (SHAPES[k]["hidden_size"], SHAPES[k]["intermediate_size"]) for k in shapes if k in disk}
    out = {}
    for a in width:
        for b in width:
            la, lb = SHAPES[a]["num_hidden_layers"], SHAPES[b]["num_hidden_layers"]
            if width[a] == width[b] and la < lb:
                out[f"{b} ({lb} layers) / {a} ({la} layers)"] = disk[b]["peak_rss_bytes"] / disk[a]["peak_rss_bytes"]
    return out


def summarize(runs: list[dict], model_bytes: dict[str, int], shapes: list[str]) -> dict:
    """The issue's criteria from the runs: host peak over model bytes (7b: at most 0.25), flat
    from the smallest to the largest shape (within 20%), disk over memory wall time (1b: at most
    1.2), a model larger than the limit it ran under pruned. A shape run only under the limit
    (--largest-limited-only) takes its peak from that run (peak_from says so)."""
    disk = {r["shape"]: r for r in runs if r["mode"] == "disk" and not r["limit_bytes"] and r["ok"]}
    peak_from = {k: "unlimited disk run" for k in disk}
    for r in runs:
        if r["limit_bytes"] and r["ok"] and r["shape"] not in disk:
            disk[r["shape"]], peak_from[r["shape"]] = r, "the run under the address-space limit"
    mem = {r["shape"]: r for r in runs if r["mode"] == "memory" and r["ok"]}
    limited = [r for r in runs if r["limit_bytes"]]
    s: dict = {"peak_rss_over_model_bytes": {k: r["peak_rss_bytes"] / model_bytes[k] for k, r in disk.items()},
               "peak_rss_over_predicted": {f"{r['shape']}-{r['mode']}{'-limited' if r['limit_bytes'] else ''}":
                                           r["peak_rss_bytes"] / r["predicted_host_peak_bytes"]
                                           for r in runs if r["ok"] and r.get("predicted_host_peak_bytes")}}
    s["peak_from"] = peak_from
    peaks = [disk[k]["peak_rss_bytes"] for k in shapes if k in disk]
    if len(peaks) > 1:
        s["peak_rss_largest_over_smallest"] = peaks[-1] / peaks[0]
    depth = depth_pairs(disk, shapes)
    if depth:
        s["peak_rss_deeper_over_shallower"] = depth
    for k in mem:
        if k in disk:
            s[f"wall_disk_over_memory_{k}"] = disk[k]["wall_s"] / mem[k]["wall_s"]
            s[f"kept_units_equal_disk_memory_{k}"] = disk[k]["kept"] == mem[k]["kept"]
    if limited:
        r = limited[-1]
        s["limited_run"] = {"shape": r["shape"], "limit_bytes": r["limit_bytes"], "model_bytes": model_bytes[r["shape"]],
                            "limit_below_model": r["limit_bytes"] < model_bytes[r["shape"]], "ok": r["ok"]}
    if "7b" in disk:
        s["done_when"] = {
            "peak_7b_at_most_0.25_model": s["peak_rss_over_model_bytes"]["7b"] <= 0.25,
            "flat_within_20pct": "peak_rss_largest_over_smallest" in s and s["peak_rss_largest_over_smallest"] <= 1.2,
            "disk_time_at_most_1.2x_at_1b": s.get("wall_disk_over_memory_1b", float("inf")) <= 1.2,
            "pruned_a_model_larger_than_its_limit": bool(limited) and s["limited_run"]["limit_below_model"]
            and s["limited_run"]["ok"],
        }
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,3b,7b",
                   help="comma-separated: 1b, 3b, 7b, 1b-4l (1b's width at 4 layers; default: 1b,3b,7b)")
    p.add_argument("--smoke", action="store_true", help="the tiny shape only, 4 x 16 calibration: seconds")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--memory-at", default="1b", help="the shape also run with the whole model in memory")
    p.add_argument("--limit-bytes", type=int, default=None,
                   help="RLIMIT_AS of the limited run at the largest shape (default: half the model's bytes)")
    p.add_argument("--largest-limited-only", action="store_true",
                   help="run the largest shape only under the address-space limit (its peak is that run's): "
                        "saves one run of the largest shape")
    p.add_argument("--models", default=None, help="where the model folders are written (default: --out/models)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    from structprune.jsonio import write_json
    from structprune.run import environment

    shapes = ["tiny"] if args.smoke else [s.strip() for s in args.shapes.split(",")]
    nsamples, seqlen = (4, 16) if args.smoke else (args.nsamples, args.seqlen)
    memory_at = "tiny" if args.smoke else args.memory_at
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    models = Path(args.models) if args.models else out / "models"
    runs, model_bytes = [], {}
    for shape in shapes:
        t = time.perf_counter()
        model_bytes[shape] = write_model(shape, models / shape)
        print(f"{shape}: {model_bytes[shape] / 2**30:.2f} GiB of bf16 weights ({time.perf_counter() - t:.0f} s to write)",
              flush=True)
        modes = ["disk", "memory"] if shape == memory_at else ["disk"]
        if args.largest_limited_only and shape == shapes[-1]:
            modes.remove("disk")
        for mode in modes:
            row = {"shape": shape, "predicted_host_peak_bytes": predicted_host_peak(shape, mode, nsamples, seqlen),
                   **run_child(models / shape, mode, work, nsamples, seqlen)}
            runs.append(row)
            print(f"  {mode}: ok {row['ok']}, peak RSS {row.get('peak_rss_bytes', 0) / 2**30:.2f} GiB, "
                  f"wall {row.get('wall_s', float('nan')):.1f} s", flush=True)
    largest = shapes[-1]
    limit = SMOKE_LIMIT if args.smoke else (args.limit_bytes or model_bytes[largest] // 2)
    row = {"shape": largest, "predicted_host_peak_bytes": predicted_host_peak(largest, "disk", nsamples, seqlen),
           **run_child(models / largest, "disk", work, nsamples, seqlen, limit=limit, activation_budget=64 << 20)}
    runs.append(row)
    print(f"  disk under RLIMIT_AS {limit / 2**30:.2f} GiB (model {model_bytes[largest] / 2**30:.2f} GiB): "
          f"ok {row['ok']}, peak RSS {row.get('peak_rss_bytes', 0) / 2**30:.2f} GiB", flush=True)
    record = {
        "schema": "structprune.scale/1",
        "protocol": (f"random-weight Llama-family models ({', '.join(f'{s}: {SOURCES[s]}' for s in shapes)} shapes), "
                     "bf16 safetensors, one shard per layer; CPU, float32 compute; "
                     f"{json.dumps(SETTINGS, sort_keys=True)}; calibration {nsamples} x {seqlen} random tokens, "
                     "no dense evaluation; each run in its own process, peak RSS = VmHWM"),
        "smoke": args.smoke, "shapes": {s: SHAPES[s] for s in shapes}, "model_bytes": model_bytes,
        "runs": runs, "summary": summarize(runs, model_bytes, shapes), "environment": environment(),
    }
    path = write_json(out / ("scale-smoke.json" if args.smoke else "scale.json"), record)
    print(json.dumps(record["summary"], indent=1))
    print(f"record: {path}")
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
