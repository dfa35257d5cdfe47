"""The benchmark reports (comparison grid, allocation sweep, calibration size), on synthetic records."""

import json

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


def _grid_record(variant, sparsity: float, ppl: float, heldout: float, method: str | None = None) -> dict:
    cfg = variant.config(sparsity=sparsity).to_dict()
    proto = "sotu-test · seqlen 512 · 340 windows · calib sotu-calib 64x512 seed 0"
    return {"schema": "structprune.run/1", "method": method or variant.method, "config": cfg,
            "sparsity": {"target": sparsity}, "device": "cpu", "dtype": "float32",
            "calib_loss": {"pruned": heldout - 0.05, "pruned_windows": 8, "heldout": heldout, "heldout_windows": 16},
            "ppl": {"pruned": {"sotu": {"value": ppl, "protocol": proto, "label": "SOTU"}},
                    "dense": {"sotu": {"value": 23.6}}},
            "model": {"name": "m", "description": "d"}, "memory": {"peak_bytes": 2**20, "kind": "accounted-cpu"},
            "timing": {"pass1_s": 1.0, "pass2_s": 2.0},
            "environment": {"git_commit": "abc", "cpus": 2, "torch": "t", "transformers": "tf"},
            "benchmark": {"estimated_peak_bytes": 2**20, "prune_over_floor": 3.0, "pass1_shared": False, "forward_floor_s": 1.0,
                          "dense_calib_nll": 3.27, "dense_heldout_nll": 3.19}}


def test_summary_states_the_bar_ratios_and_the_held_out_gap_to_uniform():
    from benchmarks.compare import GRID
    from benchmarks.report import summary_markdown

    v = {g.label: g for g in GRID}
    recs = [_grid_record(v["structprune"], 0.3, 36.0, 3.50), _grid_record(v["structprune alloc=uniform"], 0.3, 40.0, 3.62),
            _grid_record(v["flap"], 0.3, 45.0, 3.78), _grid_record(v["structprune block refit 12ep"], 0.3, 31.5, 3.43)]
    md = summary_markdown(recs)
    row = next(line for line in md.splitlines() if line.startswith("| 30% | sotu |"))
    # 36 / 45 = 0.8 of FLAP, 36 / 40 = 0.9 of uniform, the lowest, 0.12 nats below uniform held out
    assert row == "| 30% | sotu | 0.800 | – | 0.900 | yes | -0.1200 |"
    # the refit has its own table (it is not the default): 31.5 / 45 = 0.7, 0.07 nats below the default
    assert "| structprune block refit 12ep | 30% | sotu | 0.700 | – | -0.0700 |" in md.splitlines()
    assert "3.5000 / 3.4500" in md and "dense 3.1923" not in md and "dense 3.1900)" in md


def test_records_from_before_the_refit_settings_match_their_variants():
    """Records written before refine_lr's default moved (1e-4 -> 1e-3) and refine_schedule existed
    (they ran a constant rate) still land in their rows, and a refit setting without refit epochs
    neither renames a run nor splits a row."""
    from benchmarks.compare import GRID, EvalSpec, run_key
    from benchmarks.report import matches
    from structprune.config import PruneConfig

    v = {x.label: x for x in GRID}
    old_default = {**v["structprune"].config().to_dict(), "refine_lr": 1e-4}
    old_default.pop("refine_schedule")
    old_refit = {**old_default, "refine_epochs": 2}
    rec = lambda cfg: {"method": "structprune", "config": cfg}  # noqa: E731
    assert matches(rec(old_default), v["structprune"])
    assert not matches(rec(old_default), v["structprune block refit 6ep"])
    assert matches(rec(old_refit), v["structprune block refit 2ep constant lr 1e-4"])
    assert not matches(rec(old_refit), v["structprune block refit 6ep"])
    assert not matches(rec({**old_refit, "refine_schedule": "cosine"}), v["structprune block refit 2ep constant lr 1e-4"])
    ev = EvalSpec((("sotu", None),))
    assert run_key(PruneConfig(refine_lr=5e-4, refine_schedule="constant"), ev) == run_key(PruneConfig(), ev)
    assert "refine_schedule=constant" in run_key(PruneConfig(refine_epochs=2, refine_schedule="constant"), ev)


def test_summary_pairs_seeds_and_reports_the_worst_ratio_to_flap():
    """The bar over seeds: ratios between runs on the same calibration draw, the worst one shown,
    and 'lowest' fails when any other method beats structprune at any shared seed."""
    from benchmarks.compare import GRID
    from benchmarks.report import summary_markdown

    v = {g.label: g for g in GRID}

    def seeded(label: str, s: float, ppl: float, seed: int) -> dict:
        rec = _grid_record(v[label], s, ppl, 3.5)
        rec["config"]["seed"] = seed
        sotu = rec["ppl"]["pruned"]["sotu"]
        sotu["protocol"] = sotu["protocol"].replace("seed 0", f"seed {seed}")
        return rec

    sp = {0: 30.0, 1: 33.0, 2: 36.0}
    flap = {0: 50.0, 1: 44.0, 2: 60.0}
    wanda = {0: 40.0, 1: 34.0, 2: 35.0}  # beats structprune at seed 2 only
    recs = ([seeded("structprune", 0.3, p, k) for k, p in sp.items()]
            + [seeded("flap", 0.3, p, k) for k, p in flap.items()]
            + [seeded("wanda-sp", 0.3, p, k) for k, p in wanda.items()]
            + [seeded("structprune", 0.5, 90.0, 0)])  # one seed: no row
    lines = summary_markdown(recs).splitlines()
    assert "Protocol: `sotu-test · seqlen 512 · 340 windows · calib sotu-calib 64x512 seeds 0, 1, 2`" in lines
    rows = [line for line in lines if line.startswith("| structprune | 30% | sotu | 0, ")]
    # mean 33 (30-36); 30/50, 33/44, 36/60; worst 0.75; worst / wanda-sp 36/35
    assert rows == ["| structprune | 30% | sotu | 0, 1, 2 | 33.00 (30.00–36.00) | 0.600, 0.750, 0.600 | 0.750 | 1.03 | no |"]
    assert not any(line.startswith("| structprune | 50% |") for line in lines)
    recs = [r for r in recs if not (r["method"] == "wanda-sp" and r["config"]["seed"] == 2)]
    rows = [line for line in summary_markdown(recs).splitlines() if line.startswith("| structprune | 30% | sotu | 0, ")]
    assert rows[0].endswith("| 0.750 | 0.971 | yes |")


def test_calibration_size_table_pairs_runs_of_one_size_and_reports_damage_over_dense(tmp_path, monkeypatch):
    from benchmarks import calibration_size as cs
    from benchmarks.compare import GRID

    v = {x.label: x for x in GRID}
    folders = {32: tmp_path / "n32", 64: tmp_path / "grid"}
    for n, (sp_ppl, flap_ppl) in {32: (40.0, 50.0), 64: (33.0, 45.0)}.items():
        folders[n].mkdir()
        for label, ppl in (("structprune", sp_ppl), ("flap", flap_ppl)):
            rec = _grid_record(v[label], 0.3, ppl, heldout=3.19 + ppl / 100)
            rec["config"]["nsamples"] = n
            rec["ppl"]["pruned"]["brown"] = {"value": 2 * ppl}
            (folders[n] / f"{label}.json").write_text(json.dumps(rec))
        # structprune variants at the same size must not be taken for the default
        for label, name in (("structprune alloc=uniform", "uniform"), ("structprune target=dense", "dense")):
            other = _grid_record(v[label], 0.3, 1.0 if n == 32 else 66.0, heldout=3.2)
            other["config"]["nsamples"] = n
            other["ppl"]["pruned"]["brown"] = {"value": 99.0}
            (folders[n] / f"{name}.json").write_text(json.dumps(other))
    monkeypatch.setattr(cs, "folder", folders.__getitem__)
    md = cs.table([32, 64], [0.3])
    main_table, dense_table = md.split("## Dense targets")
    rows = [line for line in main_table.splitlines() if line.startswith("| 30%")]
    assert len(rows) == 2
    assert rows[0].startswith("| 30% | 32 x 512 (16,384 tokens) | 40.00 / 80.00 | 50.00 / 100.0 | 0.800 / 0.800 ")
    assert "| 0.4000 / 0.5000 |" in rows[0]  # held-out loss minus the dense 3.19
    assert "| 33.00 / 66.00 | 45.00 / 90.00 | 0.733 / 0.733 | 0.3300 / 0.4500 | 3 (3.0x) / 3 (3.0x) |" in rows[1]
    dense_rows = [line for line in dense_table.splitlines() if line.startswith("| 30%")]
    assert dense_rows[1] == ("| 30% | 64 x 512 (32,768 tokens) | 66.00 / 99.00 | 33.00 / 66.00 | 2.000 / 1.500 "
                             "| 0.0100 / 0.3300 | 3 (3.0x) |")


def test_calibration_size_runs_each_size_once_and_leaves_the_grid_s_own_records_to_compare(monkeypatch):
    from benchmarks import calibration_size as cs

    calls = []
    monkeypatch.setattr(cs.compare, "main", lambda argv: calls.append(argv))
    cs.run_missing([32, 64], [0.3], dense_target_sizes=[64, 256])
    runs = {argv[argv.index("--nsamples") + 1]: argv[argv.index("--methods") + 1:argv.index("--sparsities")]
            for argv in calls}
    assert runs == {"32": ["structprune", "flap"], "64": ["structprune target=dense"],
                    "256": ["structprune target=dense"]}
    grid = next(argv for argv in calls if "64" in argv)
    assert grid[grid.index("--results") + 1] == str(cs.compare.RESULTS)
