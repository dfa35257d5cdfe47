"""Exported folders load with plain transformers, in a fresh interpreter where structprune cannot be
imported, and give the logits of `load_pruned`; folders are complete or absent (docs/EXPORT.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

from structprune.adapters import adapter_for, set_output_bias
from structprune.atomic import MARK, IncompleteFolderError, OutputFolderError
from structprune.checkpoint import MODELING_FILE, load_pruned, save_pruned
from structprune.cli import main
from structprune.config import PruneConfig
from structprune.models import build_tiny, load_model
from structprune.run import run_prune

# Runs in a subprocess: structprune blocked by a meta-path finder, the repository not on the path.
PLAIN_LOADER = textwrap.dedent('''
    import importlib.abc, json, sys

    class BlockStructprune(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "structprune" or name.startswith("structprune."):
                raise ModuleNotFoundError(f"structprune is blocked in this interpreter: {name}")
            return None

    sys.meta_path.insert(0, BlockStructprune())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jobs = json.loads(sys.argv[1])
    out = {}
    for job in jobs:
        kw = {"trust_remote_code": True} if job["trust"] else {}
        model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32, **kw).eval()
        ids = torch.tensor(job["ids"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        gen = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        text = None
        if job["tokenizer"]:
            tok = AutoTokenizer.from_pretrained(job["folder"])
            text = tok.decode(gen[0])
        out[job["folder"]] = {"logits": logits.tolist(), "generated": gen.tolist(), "class": type(model).__name__,
                              "text": text}
    leaked = sorted(m for m in sys.modules if m == "structprune" or m.startswith("structprune."))
    print(json.dumps({"results": out, "structprune_modules": leaked}))
''')


def load_plain(tmp_path: Path, jobs: list[dict]) -> dict:
    """Loads every folder with `AutoModelForCausalLM.from_pretrained` in a fresh interpreter."""
    script = tmp_path / "plain_loader.py"
    script.write_text(PLAIN_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, str(script), json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"results\"")]
    assert lines, f"{len(proc.stdout)} {proc.stdout[:300]!r} {proc.stdout[-300:]!r}"
    out = json.loads(lines[-1])
    assert out["structprune_modules"] == []  # loaded without structprune
    return out["results"]


def _tiny_llama_like(config_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=8, vocab_size=512, max_position_embeddings=256,
                     tie_word_embeddings=False, **kw)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()


BUILDERS = {
    "tiny-llama": lambda: build_tiny("tiny-llama"),
    "tiny-llama-mha": lambda: build_tiny("tiny-llama-mha"),
    "tiny-gemma3": lambda: build_tiny("tiny-gemma3"),
    "tiny-opt": lambda: build_tiny("tiny-opt"),
    "mistral": lambda: _tiny_llama_like(MistralConfig, sliding_window=None),
    "qwen2": lambda: _tiny_llama_like(Qwen2Config),  # q/k/v carry biases
    "qwen3": lambda: _tiny_llama_like(Qwen3Config),  # q/k norms
}


def prune_physically(model) -> None:
    """Different heads and channels in every layer, random output biases on some (as the refit adds)."""
    ad = adapter_for(model)
    gen = torch.Generator().manual_seed(1)
    for i, layer in enumerate(ad.layers(model)):
        lay = ad.layout(layer)
        if lay.mha:
            heads = torch.randperm(lay.n_heads, generator=gen)[: lay.n_heads - 1 - i % 2]
        else:  # equal per KV group: 3, 2, 1, 3, ... of 4 per group
            per = lay.n_heads // lay.n_kv_heads
            keep = max(1, per - 1 - i % per)
            heads = (torch.arange(lay.n_kv_heads)[:, None] * per + torch.arange(keep)).reshape(-1)
        ad.keep_heads(layer, heads.sort().values)
        ad.keep_channels(layer, torch.randperm(lay.intermediate, generator=gen)[: lay.intermediate - 9 * (i + 1)])
        if i % 2 == 0:
            set_output_bias(ad.out_proj(layer, "mlp"), torch.randn(lay.hidden, generator=gen) * 0.1)
        if i == 1:
            set_output_bias(ad.out_proj(layer, "attn"), torch.randn(lay.hidden, generator=gen) * 0.1)


def _ids(vocab: int = 384) -> list:
    return torch.randint(0, vocab, (2, 14), generator=torch.Generator().manual_seed(2)).tolist()


def _reference(folder: Path, ids: list) -> tuple[torch.Tensor, torch.Tensor]:
    model, _ = load_pruned(folder)
    t = torch.tensor(ids)
    with torch.no_grad():
        logits = model(input_ids=t).logits
    return logits, model.generate(t[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """Every kind of exported folder, loaded in ONE fresh interpreter (its start-up dominates):
    non-uniform models of every family, a CLI run saved and exported from its record, a uniform one."""
    tmp = tmp_path_factory.mktemp("export")
    jobs = {}
    for name, build in BUILDERS.items():
        model = build()
        prune_physically(model)
        save_pruned(model, tiny_tokenizer if name == "tiny-llama" else None, tmp / name)
        jobs[name] = {"folder": str(tmp / name), "trust": True, "ids": _ids(), "tokenizer": name == "tiny-llama"}
    runs = tmp / "runs"
    argv = ["prune", "--model", "tiny-gemma3", "--nsamples", "4", "--seqlen", "16", "--eval-windows", "1",
            "--device", "cpu", "--allocation", "softmax", "--sparsity", "0.4", "--out", str(runs), "--save-model"]
    assert main(argv) == 0
    (record,) = runs.glob("*.json")
    rec = json.loads(record.read_text())
    saved = runs / f"model-{rec['run_id']}"
    saved_logits = _reference(saved, _ids())[0]
    # the store keeps no weights: export repeats the run from the record and checks its kept units
    (saved / MARK).unlink()  # the saved folder no longer counts: export must not use it
    assert main(["export", str(record), "--out", str(tmp / "cli-export")]) == 0
    jobs["cli-export"] = {"folder": str(tmp / "cli-export"), "trust": True, "ids": _ids(), "tokenizer": False}
    # align 1: the tiny MLPs (96) have only 3 aligned steps, so a uniform 50% would mix widths to meet the budget
    res = run_prune(PruneConfig(model="tiny-llama", sparsity=0.5, allocation="uniform", bias=False, nsamples=4,
                                seqlen=24, eval_windows=1, device="cpu", align_channels=1), evaluate_dense=False)
    save_pruned(res.model, None, tmp / "uniform")
    jobs["uniform"] = {"folder": str(tmp / "uniform"), "trust": False, "ids": _ids(), "tokenizer": False}
    results = load_plain(tmp, list(jobs.values()))
    return {"jobs": jobs, "results": {name: results[job["folder"]] for name, job in jobs.items()}, "record": rec,
            "saved": saved, "saved_logits": saved_logits}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_non_uniform_models_of_every_family_load_with_plain_transformers(exported, name):
    job, res = exported["jobs"][name], exported["results"][name]
    folder = Path(job["folder"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == cfg["structprune"]["base_model_type"]  # AutoConfig/AutoTokenizer need no code
    assert "AutoModelForCausalLM" in cfg["auto_map"] and (folder / MODELING_FILE).is_file()
    shapes = cfg["structprune"]["layer_shapes"]
    assert len({(s["n_heads"], s["intermediate"]) for s in shapes}) == len(shapes)  # every layer differs
    assert res["class"].startswith("StructPruned") and res["class"].endswith("ForCausalLM")
    logits, generated = _reference(folder, job["ids"])
    torch.testing.assert_close(torch.tensor(res["logits"]), logits, rtol=1e-5, atol=1e-5)
    assert res["generated"] == generated.tolist() and len(res["generated"][0]) == 11
    if name == "tiny-llama":
        assert res["text"]  # the tokenizer travelled with the folder
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # never silently re-initialised
            AutoModelForCausalLM.from_pretrained(folder)


def test_a_run_saved_by_the_cli_and_exported_from_its_record_loads_with_plain_transformers(exported):
    rec, saved = exported["record"], exported["saved"]
    shapes = json.loads((saved / "config.json").read_text())["structprune"]["layer_shapes"]
    assert len({(s["n_heads"], s["intermediate"]) for s in shapes}) > 1  # non-uniform: the hard case
    card = (saved / "README.md").read_text()
    assert rec["ppl"]["pruned"]["random"]["protocol"] in card and "tiny-gemma3" in card
    job, res = exported["jobs"]["cli-export"], exported["results"]["cli-export"]
    logits, _ = _reference(Path(job["folder"]), job["ids"])
    torch.testing.assert_close(torch.tensor(res["logits"]), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, exported["saved_logits"], rtol=0, atol=0)  # the repeated run is the recorded one


def test_export_of_a_run_in_the_store(tmp_path):
    from structprune.export import export_run
    from structprune.store import RunStore

    cfg = PruneConfig(model="tiny-opt", sparsity=0.3, nsamples=4, seqlen=16, eval_windows=1, device="cpu")
    res = run_prune(cfg, evaluate_dense=False)
    store = RunStore(tmp_path / "store")
    run_id = store.start(cfg.to_dict())
    store.finish(run_id, res.record)
    folder = export_run(run_id, tmp_path / "opt", store_folder=tmp_path / "store")
    loaded, _ = load_pruned(folder)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits, rtol=0, atol=0)
    failed = store.start(cfg.to_dict())
    store.fail(failed, "boom")
    with pytest.raises(Exception, match="is failed; only finished runs"):
        export_run(failed, tmp_path / "x", store_folder=tmp_path / "store")
    assert not (tmp_path / "x").exists()


def test_uniform_shapes_load_without_remote_code(exported):
    job, res = exported["jobs"]["uniform"], exported["results"]["uniform"]
    folder = Path(job["folder"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and not (folder / MODELING_FILE).exists()
    assert res["class"] == "LlamaForCausalLM"
    logits, _ = _reference(folder, job["ids"])
    torch.testing.assert_close(torch.tensor(res["logits"]), logits, rtol=1e-5, atol=1e-5)


def _pruned(name: str = "tiny-llama"):
    model = build_tiny(name)
    prune_physically(model)
    return model


def test_a_non_empty_folder_is_refused_unless_overwrite(tmp_path, capsys):
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="exists and is not empty.*--overwrite"):
        save_pruned(_pruned(), None, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert main(["export", "nosuchrun", "--out", str(target)]) == 2  # refused before the run is looked up
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "not empty" in err and err.count("\n") == 1
    save_pruned(_pruned(), None, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / MARK).is_file()
    (tmp_path / "empty").mkdir()
    save_pruned(_pruned(), None, tmp_path / "empty")  # an empty folder is fine
    assert load_pruned(tmp_path / "empty")[0] is not None


@pytest.mark.parametrize("fault", [RuntimeError("interrupted"), OSError(28, "No space left on device")])
def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch, fault):
    import structprune.checkpoint as checkpoint

    def broken_card(*args, **kwargs):  # after the weights and config are written
        raise fault

    monkeypatch.setattr(checkpoint, "model_card", broken_card)
    with pytest.raises(type(fault)):
        save_pruned(_pruned(), None, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    # overwriting: the old folder stays as it was
    monkeypatch.undo()
    save_pruned(_pruned("tiny-opt"), None, tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    monkeypatch.setattr(checkpoint, "model_card", broken_card)
    with pytest.raises(type(fault)):
        save_pruned(_pruned(), None, tmp_path / "m", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    assert adapter_for(load_pruned(tmp_path / "m")[0]).spec.family == "opt"


def test_a_folder_without_its_completion_mark_is_refused(tmp_path, capsys):
    folder = save_pruned(_pruned(), None, tmp_path / "m")
    (folder / MARK).unlink()
    with pytest.raises(IncompleteFolderError, match="no completion mark"):
        load_pruned(folder)
    with pytest.raises(IncompleteFolderError):
        load_model(str(folder))
    assert main(["eval", "--model", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no completion mark" in err and err.count("\n") == 1


def test_a_truncated_weights_file_is_refused(tmp_path):
    folder = save_pruned(_pruned(), None, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(IncompleteFolderError, match="model.safetensors is missing or truncated"):
        load_pruned(folder)


def test_a_killed_writers_leftovers_are_hidden_and_cleared(tmp_path):
    partial = tmp_path / ".m.partial-deadbeef"  # what kill -9 mid-write leaves
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    save_pruned(_pruned(), None, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
