"""The per-module structured subproblem: choose which units of one output projection to keep and
refit the kept columns (docs/METHOD.md, "The per-module subproblem"). Layers, each importing only the
ones before it:

    problem   notation, damping, validation, Cholesky inverses, losses, refit, saliencies
    greedy    greedy group-OBS selection                      (imports problem)
    swaps     swap local search on a kept set                 (imports problem)
    admm      ADMM selection and its trace                    (imports problem, greedy)
    module    solve_module: select, swap, refit               (imports all of the above)

This file re-exports the public API.
"""

from .admm import AdmmTrace, admm_select
from .greedy import greedy_obs_select
from .module import LOCAL_SWAPS, ModuleSolution, solve_module
from .problem import (
    DAMP_REL,
    FP64_MAX_COLUMNS,
    SolverError,
    augmented_weights,
    check_finite,
    damped,
    group_saliency,
    quadratic_form,
    reconstruction_error,
    refit,
    solve_dtype,
    topk_per_block,
)
from .swaps import local_search

__all__ = [
    "DAMP_REL",
    "FP64_MAX_COLUMNS",
    "LOCAL_SWAPS",
    "AdmmTrace",
    "ModuleSolution",
    "SolverError",
    "admm_select",
    "augmented_weights",
    "check_finite",
    "damped",
    "greedy_obs_select",
    "group_saliency",
    "local_search",
    "quadratic_form",
    "reconstruction_error",
    "refit",
    "solve_dtype",
    "solve_module",
    "topk_per_block",
]
