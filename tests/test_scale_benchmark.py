"""The scale benchmark (benchmarks/scale.py) rehearsed on its tiny shape: the model written as
sharded bf16 safetensors, disk and memory runs in child processes with their peak resident memory,
the same kept units both ways, a run under an address-space limit, and that limit really binding."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.scale import SHAPES, main, run_child


def test_scale_benchmark_smoke_measures_disk_memory_and_a_limited_run(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "scale-smoke.json").read_text())
    folder = tmp_path / "models" / "tiny"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == SHAPES["tiny"]["num_hidden_layers"] + 1  # a shard per layer + base
    assert rec["model_bytes"]["tiny"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert index["metadata"]["total_size"] < rec["model_bytes"]["tiny"] < index["metadata"]["total_size"] + 20_000
    disk, memory, limited = rec["runs"]
    assert [(r["mode"], bool(r["limit_bytes"]), r["ok"]) for r in rec["runs"]] == [
        ("disk", False, True), ("memory", False, True), ("disk", True, True)]
    assert disk["weights"]["mode"] == "disk" and disk["weights"]["peak_layers_loaded"] == 1
    assert memory["weights"] == {"mode": "memory"}
    assert disk["kept"] == memory["kept"] and rec["summary"]["kept_units_equal_disk_memory_tiny"] is True
    for r in rec["runs"]:
        assert 0 < r["rss_after_imports_bytes"] <= r["peak_rss_bytes"] <= r["peak_vm_bytes"]
        assert r["wall_s"] >= r["load_s"] > 0
    assert limited["peak_vm_bytes"] <= limited["limit_bytes"]
    assert rec["summary"]["limited_run"] == {"shape": "tiny", "limit_bytes": limited["limit_bytes"],
                                             "model_bytes": rec["model_bytes"]["tiny"], "limit_below_model": False,
                                             "ok": True}
    # the limit binds: far below what torch maps, the child cannot even start
    row = run_child(folder, "disk", Path(tmp_path / "work"), 4, 16, limit=128 << 20)
    assert not row["ok"] and row["stderr_tail"]
