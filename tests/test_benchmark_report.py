"""The benchmark report's choice of the default allocation, on synthetic records."""

from benchmarks.compare import sweep_variants
from benchmarks.report import sweep_markdown, sweep_summary


def _record(variant, sparsity: float, heldout: float | None, in_sample: float) -> dict:
    cfg = variant.config(sparsity=sparsity).to_dict()
    calib = {"pruned": in_sample, "pruned_windows": 8}
    if heldout is not None:
        calib.update(heldout=heldout, heldout_windows=16)
    return {"method": "structprune", "config": cfg, "sparsity": {"target": sparsity}, "calib_loss": calib,
            "ppl": {"pruned": {"sotu": {"value": 10 * in_sample}}}, "model": {"name": "m"},
            "benchmark": {"dense_heldout_nll": 3.0}}


def test_sweep_chooses_by_heldout_loss_and_recommends_one_energy_temperature_pair():
    variants = {v.label: v for v in sweep_variants((1.0, 2.0), ("residual", "sensitivity"))}
    # in-sample losses favour residual T=1 (over-fitting); held-out losses favour sensitivity T=2
    losses = {"structprune softmax residual T=1": (3.9, 3.50), "structprune softmax residual T=2": (3.8, 3.60),
              "structprune softmax sensitivity T=1": (3.85, 3.70), "structprune softmax sensitivity T=2": (3.7, 3.65),
              "structprune threshold residual": (4.2, 3.9), "structprune threshold sensitivity": (4.1, 3.8),
              "structprune alloc=uniform": (3.95, 3.75)}
    recs = [_record(variants[label], s, held + s, ins + s) for s in (0.3, 0.5) for label, (held, ins) in losses.items()]
    summary = sweep_summary(recs, (1.0, 2.0), ("residual", "sensitivity"))
    assert summary["criterion"].startswith("calib_loss.heldout")
    assert summary["chosen"]["0.3"]["label"] == "structprune softmax sensitivity T=2"
    assert (summary["recommended_energy"], summary["recommended_temperature"]) == ("sensitivity", 2.0)
    assert summary["recommended_beats_uniform"] == {"0.3": True, "0.5": True}
    assert len(summary["rows"]) == 14
    md = sweep_markdown(summary, recs)
    assert "energy `sensitivity`, T = 2" in md and "(chosen)" in md


def test_sweep_falls_back_to_in_sample_loss_for_old_records():
    v = {v.label: v for v in sweep_variants((1.0,), ("residual",))}
    recs = [_record(v["structprune softmax residual T=1"], 0.3, None, 3.4),
            _record(v["structprune alloc=uniform"], 0.3, None, 3.3)]
    summary = sweep_summary(recs, (1.0,), ("residual",))
    assert summary["criterion"] == "calib_loss.pruned (nats/token)"
    assert summary["chosen"]["0.3"]["label"] == "structprune alloc=uniform"
    assert summary["recommended_beats_uniform"] == {"0.3": False}
