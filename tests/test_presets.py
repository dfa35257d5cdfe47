"""Presets carry the published shapes: parameter counts match the models' published sizes."""

from __future__ import annotations

import pytest

from structprune.estimate import model_params
from structprune.presets import PRESETS, loglog_slope, preset_config, scaling_rows

# parameter counts of the published checkpoints (safetensors metadata / model cards)
PUBLISHED = {"opt-125m": 125_239_296, "opt-1.3b": 1_315_758_080, "llama-2-7b": 6_738_415_616,
             "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192, "llama-3-8b": 8_030_261_248,
             "qwen2.5-7b": 7_615_616_512, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_sizes_match_the_published_models(name):
    # within 5e-4: the estimator counts 4d of norm parameters per layer (OPT's two LayerNorms with
    # biases), 2d more than Llama's two RMSNorms; Qwen2's q/k/v biases are not in its layout
    assert model_params(preset_config(name)) == pytest.approx(PUBLISHED[name], rel=5e-4)


def test_every_preset_builds_and_one_layer_shrinks_relative_to_n():
    rows = scaling_rows()
    assert [r["preset"] for r in rows] == sorted(PRESETS, key=lambda n: model_params(preset_config(n)))
    opt = [r for r in rows if r["family"] == "OPT"]
    slope = loglog_slope([r["n_params"] for r in opt], [r["layer_params"] for r in opt])
    assert 0.5 < slope < 1.0  # one layer grows slower than the model (sqrt-like, not linear)
    assert loglog_slope([1, 10, 100], [1, 10, 100]) == pytest.approx(1.0)


def test_time_estimate_counts_the_block_refit_per_epoch():
    from structprune.config import PruneConfig
    from structprune.models import tiny_config
    from structprune.planning import estimate_seconds

    cfg = tiny_config("tiny-llama")
    t = [estimate_seconds(cfg, PruneConfig(refine_epochs=e), "cpu", fp32_flops=1e10, fp64_flops=1e9) for e in (0, 1, 2, 3)]
    assert "refine" not in t[0]["phases"]
    r = [x["phases"]["refine"] for x in t[1:]]
    # each epoch adds the same cost: forward + backward on 7/8 of the windows, a forward on 1/8
    assert r[2] - r[1] == pytest.approx(r[1] - r[0]) and r[1] - r[0] > 0
    assert t[3]["total_s"] > t[0]["total_s"]
