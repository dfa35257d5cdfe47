"""Weights streamed from safetensors files (weights.py): the same pruned model as in memory, with
the host holding one module's tensors at a time, and bad folders refused before any work."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from structprune.adapters import adapter_for
from structprune.config import PruneConfig
from structprune.errors import ModelLoadError
from structprune.models import LoadedModel, build_tiny, load_model
from structprune.run import run_prune
from structprune.weights import SafetensorsSource

FAMILIES = ["tiny-llama", "tiny-llama-mha", "tiny-opt", "tiny-gemma3"]


def _folder(tmp_path, name, shards: bool = False):
    model = build_tiny(name)
    folder = tmp_path / name
    model.save_pretrained(folder, max_shard_size="40KB" if shards else "10GB")
    return model, folder


@pytest.mark.parametrize("name", FAMILIES)
def test_disk_streaming_equals_in_memory_pruning(tmp_path, name):
    model, folder = _folder(tmp_path, name, shards=name == "tiny-llama")
    cfg = PruneConfig(model=name, sparsity=0.4, nsamples=4, seqlen=24, eval_windows=2, energy="sensitivity",
                      sensitivity_windows=2)
    mem = run_prune(cfg, LoadedModel(name, model, None, "tiny"))
    on_disk = load_model(str(folder), on_disk=True)
    assert all(p.device.type == "meta" for p in on_disk.model.parameters())
    disk = run_prune(cfg, on_disk, layer_dir=tmp_path / "out")
    assert [m["kept"] for m in disk.record["modules"]] == [m["kept"] for m in mem.record["modules"]]
    assert disk.record["ppl"] == mem.record["ppl"]
    assert disk.record["calib_loss"] == pytest.approx(mem.record["calib_loss"], rel=1e-9)
    # every pruned layer was written out, and equals the in-memory run's layer
    ad = adapter_for(mem.model)
    state = {}
    for f in sorted((tmp_path / "out").glob("layer-*.safetensors")):
        state.update(load_file(f))
    assert len(list((tmp_path / "out").glob("layer-*.safetensors"))) == len(ad.layers(mem.model))
    mem_state = {k: v for k, v in mem.model.state_dict().items() if f"{ad.spec.layers}." in k}
    assert state.keys() == mem_state.keys()
    for k, v in mem_state.items():
        assert torch.equal(state[k], v), k
    # the host held one decoder layer at a time, and never more weights than the largest of the
    # base (embeddings, norms), one layer, and the head (final norm + LM head)
    w = disk.record["weights"]
    assert w["mode"] == "disk" and w["peak_layers_loaded"] == 1
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    dense = build_tiny(name)
    dad = adapter_for(dense)
    base = nbytes(p for n, p in dense.named_parameters() if f"{dad.spec.layers}." not in n and "lm_head" not in n)
    head = nbytes([p for m in dad.final_modules(dense) + [dad.lm_head(dense)] for p in m.parameters()])
    largest_layer = max(nbytes(layer.parameters()) for layer in dad.layers(dense))
    assert w["peak_weight_bytes_loaded"] == max(base, largest_layer, head)
    assert w["peak_weight_bytes_loaded"] < nbytes(dense.parameters()) / 2
    assert all(p.device.type == "meta" for p in disk.model.parameters())
    assert mem.record["weights"] == {"mode": "memory"}


def test_a_missing_tensor_or_a_wrong_shape_is_named_before_any_work(tmp_path):
    _, folder = _folder(tmp_path, "tiny-llama")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in state.items() if k != name}, weights)
    with pytest.raises(ModelLoadError, match=f"tensor {name} is missing"):
        load_model(str(folder), on_disk=True)
    state[name] = state[name][:, :10].contiguous()
    save_file(state, weights)
    with pytest.raises(ModelLoadError, match=f"tensor {name} has shape"):
        load_model(str(folder), on_disk=True)


def test_a_shard_listed_in_the_index_but_missing_is_refused(tmp_path):
    _, folder = _folder(tmp_path, "tiny-llama", shards=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"the shard {shard} listed"):
        SafetensorsSource(folder)


def test_tiny_models_and_whole_model_methods_cannot_stream_from_disk(tmp_path):
    with pytest.raises(ModelLoadError, match="no files to stream from"):
        load_model("tiny-llama", on_disk=True)
    with pytest.raises(Exception, match="needs the whole model in memory"):
        PruneConfig(model="tiny-llama", method="global-taylor", weights="disk")


def test_cli_prunes_from_disk_and_saves_a_folder_load_pruned_reads(tmp_path):
    from structprune.checkpoint import load_pruned
    from structprune.cli import main

    model, folder = _folder(tmp_path, "tiny-llama")
    args = ["prune", "--model", str(folder), "--weights", "disk", "--sparsity", "0.4", "--nsamples", "4",
            "--seqlen", "24", "--eval-windows", "2", "--out", str(tmp_path / "runs"), "--save-model"]
    assert main(args) == 0
    (saved,) = (tmp_path / "runs").glob("model-*")
    (record,) = (tmp_path / "runs").glob("*.json")
    rec = json.loads(record.read_text())
    assert rec["weights"]["mode"] == "disk" and rec["weights"]["peak_layers_loaded"] == 1
    pruned, _ = load_pruned(saved)
    cfg = PruneConfig(model="tiny-llama", sparsity=0.4, nsamples=4, seqlen=24, eval_windows=2)
    mem = run_prune(cfg, LoadedModel("tiny-llama", model, None, "tiny"))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, mem.model(input_ids=ids).logits, atol=1e-5)
    assert [m["kept"] for m in rec["modules"]] == [m["kept"] for m in mem.record["modules"]]


def test_the_estimator_predicts_the_hosts_weight_peak_of_a_disk_run(tmp_path):
    from structprune.estimate import estimate_memory
    from structprune.models import tiny_config

    for name in ("tiny-llama", "tiny-opt"):
        _, folder = _folder(tmp_path, name)
        cfg = PruneConfig(model=name, sparsity=0.4, nsamples=4, seqlen=24, eval_windows=1)
        rec = run_prune(cfg, load_model(str(folder), on_disk=True), layer_dir=tmp_path / f"{name}-out").record
        disk = estimate_memory(tiny_config(name), nsamples=4, seqlen=24, sensitivity=False, weights="disk")
        mem = estimate_memory(tiny_config(name), nsamples=4, seqlen=24, sensitivity=False)
        assert disk["host_weight_bytes"] == rec["weights"]["peak_weight_bytes_loaded"]
        assert mem["host_weight_bytes"] == 2 * mem["model_weight_bytes"] > disk["host_weight_bytes"]
        assert disk["host_peak_bytes"] == disk["host_weight_bytes"] + disk["host_activation_bytes"]
        # on the CPU the device is the host: its working set (which holds the layer read) adds
        cpu = estimate_memory(tiny_config(name), nsamples=4, seqlen=24, sensitivity=False, weights="disk", on_cpu=True)
        assert cpu["host_terms"] == {"activations": cpu["host_activation_bytes"], "device_working_set": cpu["peak_bytes"]}
        assert cpu["peak_bytes"] == rec["memory"]["peak_bytes"]  # the accounted peak of the run above
        cpu_mem = estimate_memory(tiny_config(name), nsamples=4, seqlen=24, sensitivity=False, on_cpu=True)
        assert mem["host_peak_bytes"] < cpu_mem["host_peak_bytes"] < mem["host_peak_bytes"] + cpu_mem["peak_bytes"]
        # on a GPU structprune's Grams wait on the host for their solves
        gpu = estimate_memory(tiny_config(name), nsamples=4, seqlen=24, host_grams=True, weights="disk")
        assert gpu["host_terms"]["grams"] > 0 and "grams" not in disk["host_terms"]


def test_activations_past_the_budget_go_to_mapped_files_and_change_nothing(tmp_path):
    _, folder = _folder(tmp_path, "tiny-llama")
    cfg = PruneConfig(model="tiny-llama", sparsity=0.4, nsamples=4, seqlen=24, eval_windows=2)
    kept = run_prune(cfg, load_model(str(folder), on_disk=True), layer_dir=tmp_path / "a").record
    spilled = run_prune(cfg, load_model(str(folder), on_disk=True), layer_dir=tmp_path / "b",
                        activation_budget=0).record
    assert kept["weights"]["activations_spilled_bytes"] == 0
    # every calibration batch of every layer's inputs and outputs went to a file, and was read back
    assert spilled["weights"]["activations_spilled_bytes"] > 4 * 24 * 64 * 4 * 2 * 4
    assert [m["kept"] for m in spilled["modules"]] == [m["kept"] for m in kept["modules"]]
    assert spilled["ppl"] == kept["ppl"] and spilled["calib_loss"] == kept["calib_loss"]
    assert list((tmp_path / "b" / "activations").iterdir()) == []  # the mapped files are unlinked


def test_a_tensor_read_from_disk_does_not_keep_its_file_mapped(tmp_path):
    """safetensors maps the whole file and its tensors live in that mapping: a layer read at its own
    dtype kept one mapping of the whole shard per tensor (a 7B run under RLIMIT_AS failed on it)."""
    from safetensors.torch import save_file

    from structprune.weights import SafetensorsSource

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(8)}, path)
    source = SafetensorsSource(tmp_path)
    same, converted = source.get("a"), source.get("b", dtype=torch.bfloat16)
    assert same.dtype == torch.float32 and converted.dtype == torch.bfloat16
    assert str(path) not in Path("/proc/self/maps").read_text()


def test_a_hub_id_streams_from_its_hugging_face_cache_snapshot(tmp_path, monkeypatch):
    """The cache's layout: snapshot files are symbolic links to content-addressed blobs."""
    import os

    import huggingface_hub.constants as hc

    model, folder = _folder(tmp_path, "tiny-llama", shards=True)
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        f.rename(blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    on_disk = load_model("acme/tiny-llama", on_disk=True)
    assert on_disk.source == "hub" and Path(on_disk.path) == snapshot
    assert all(p.device.type == "meta" for p in on_disk.model.parameters())
    cfg = PruneConfig(model="tiny-llama", sparsity=0.4, nsamples=4, seqlen=24, eval_windows=2)
    mem = run_prune(cfg, LoadedModel("tiny-llama", model, None, "tiny"))
    disk = run_prune(cfg, on_disk, layer_dir=tmp_path / "out")
    assert [m["kept"] for m in disk.record["modules"]] == [m["kept"] for m in mem.record["modules"]]
    assert disk.record["weights"]["peak_layers_loaded"] == 1
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("acme/absent", on_disk=True)
