"""The comparison's variants (compare.py runs them, report.py matches records to them): each is a
method with some settings changed from PruneConfig's defaults; `GRID` is the full comparison and
`sweep_variants` the allocation sweep's candidates. `ignored_fields` says which settings do not
change a structprune run, for run keys (compare.run_key) and record matching (report.matches) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from structprune.config import PruneConfig

SWEEP_TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Variant:
    """One line of the comparison: a method with some settings changed from PruneConfig's defaults."""

    label: str
    method: str
    overrides: tuple[tuple[str, object], ...] = ()
    main: bool = False  # also run the extra seeds

    def config(self, **kw) -> PruneConfig:
        return PruneConfig(method=self.method, **{**dict(self.overrides), **kw})


PLAIN = (("relative_error", False), ("energy", "residual"), ("temperature", 3.0))
GRID: tuple[Variant, ...] = (
    Variant("magnitude", "magnitude"),
    Variant("wanda-sp", "wanda-sp", main=True),
    Variant("flap", "flap", main=True),
    Variant("owl", "owl"),
    Variant("global-taylor", "global-taylor"),
    Variant("structprune", "structprune", main=True),
    Variant("structprune alloc=uniform", "structprune", (("allocation", "uniform"),)),
    Variant("structprune alloc=threshold", "structprune", (("allocation", "threshold"),)),
    Variant("structprune selector=admm", "structprune", (("selector", "admm"),)),
    Variant("structprune selector=saliency", "structprune", (("selector", "saliency"),)),
    Variant("structprune target=dense", "structprune", (("target", "dense"),)),
    Variant("structprune saliency=diag", "structprune", (("saliency", "diag"),)),
    Variant("structprune block refit 6ep", "structprune", (("refine_epochs", 6),)),  # lr 1e-3, cosine
    Variant("structprune block refit 12ep", "structprune", (("refine_epochs", 12),)),
    Variant("structprune block refit 2ep constant lr 1e-4", "structprune",
            (("refine_epochs", 2), ("refine_lr", 1e-4), ("refine_schedule", "constant"))),
    Variant("structprune block refit 3ep constant lr 3e-4", "structprune",
            (("refine_epochs", 3), ("refine_lr", 3e-4), ("refine_schedule", "constant"))),
    # session 2's default (plain squared error, residual energy by the mean, T=3) and its ablations
    Variant("structprune plain error", "structprune", PLAIN),
    Variant("structprune plain error alloc=uniform", "structprune", (("relative_error", False), ("allocation", "uniform"))),
    Variant("structprune plain error selector=admm", "structprune", PLAIN + (("selector", "admm"),)),
    Variant("structprune plain error target=dense", "structprune", PLAIN + (("target", "dense"),)),
)
QUICK = ("wanda-sp", "flap", "structprune")


SWEEP_ENERGIES = ("relative", "residual", "sensitivity")


def sweep_variants(temperatures=SWEEP_TEMPERATURES, energies=SWEEP_ENERGIES) -> tuple[Variant, ...]:
    """softmax at every (energy, T), threshold per energy, and uniform: the candidates the default
    allocation is chosen from."""
    soft = tuple(Variant(f"structprune softmax {e} T={t:g}", "structprune",
                         (("allocation", "softmax"), ("temperature", float(t)), ("energy", e)))
                 for e in energies for t in temperatures)
    thresh = tuple(Variant(f"structprune threshold {e}", "structprune", (("allocation", "threshold"), ("energy", e)))
                   for e in energies)
    return soft + thresh + (Variant("structprune alloc=uniform", "structprune", (("allocation", "uniform"),)),)


def ignored_fields(cfg: dict) -> set[str]:
    """Settings that do not change a structprune run with these settings (a config as a dict)."""
    out = set()
    if cfg["allocation"] != "softmax":
        out.add("temperature")
    if cfg["allocation"] not in ("softmax", "threshold"):
        out.add("energy")
    if not cfg.get("refine_epochs"):
        out |= {"refine_lr", "refine_schedule"}
    return out
