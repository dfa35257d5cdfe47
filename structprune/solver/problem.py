"""The per-module structured subproblem: choose which units of one output projection to keep and
refit the kept columns (docs/METHOD.md, "The per-module subproblem", "Closed-form saliency"). This is
the bottom layer of ``structprune.solver``: validation, damping, Cholesky inverses, the problem
object and its quota, losses, the refit on a support and the unit saliencies. The selectors
(``greedy``, ``swaps``, ``admm``) and ``module.solve_module`` build on it; it imports none of them.

Notation (shapes in comments throughout):

- ``Wt``  (d_out, n+1)  the augmented weights ``[W, b]``; the last column is the bias (zeros when
  the module has none).
- ``G``   (n+1, n+1)    the *undamped* augmented input Gram ``P~ P~^T / T`` with ``P~ = [P; 1]``;
  its last row/column belongs to the constant-1 input, ``G[n, n] == 1``.
- ``groups`` (U, g)     column indices of each unit (a head: ``head_dim`` columns; a channel: 1).
- ``blocks`` (U,)       optional block id of each unit (KV groups); every block keeps as many.

The loss of a replacement ``W'`` is ``f(W') = tr((Wt - W') G (Wt - W')^T)``, the mean squared
output error per token. Every solve uses the damped Gram ``Gd = damped(G)`` and minimizes the
damped loss ``tr((Wt - W') Gd (Wt - W')^T)``; i.e. damping pulls kept weights towards their
*original* values (the OBS / SparseGPT convention), not towards zero, so keeping every unit
returns the original weights and greedy-OBS, ADMM and the refit all minimize one objective.
Reported losses always use the undamped ``G``. The bias column is never damped (its diagonal is
exactly 1 and it is always kept), so keeping no unit gives exactly the mean output as the bias.

``allow_bias=False`` holds the bias column fixed at its value in ``Wt`` (zero when the module has
no bias): the problem then lives on the ``n`` weight columns and ``G[:n, :n]``.

Math runs on the weights' device in float64, or in float32 for modules wider than
``FP64_MAX_COLUMNS`` (a 7B model's MLP: 11008 columns), where fp64 copies of the Gram would cost
more device memory than the layer itself. G itself may sit in host memory (on CUDA the structprune
pipeline keeps Grams there between their accumulation and the solves): each solve copies its
damped G to the device, and losses read G in column blocks; with the damping below fp32 Cholesky solves are sound
there (SparseGPT solves in fp32 too). The problem holds one damped copy of G and frees it as soon
as its inverse exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from structprune.errors import StructPruneError
from structprune.memory import all_finite

FP64_MAX_COLUMNS = 4096  # wider problems solve in float32 (memory; see the module docstring)
DAMP_REL = 0.01  # damping lambda = DAMP_REL * mean(diag G), the one default for every solve


class SolverError(StructPruneError, ValueError):
    """Non-finite numbers in a module's weights or Gram, or a solve that lost positive
    definiteness. Raise the damping or check the activations that fed the Gram."""



# --------------------------------------------------------------------------------------------
# validation and shared helpers


def solve_dtype(columns: int) -> torch.dtype:
    return torch.float64 if columns <= FP64_MAX_COLUMNS else torch.float32


def damped(G: Tensor, rel: float = DAMP_REL, dtype: torch.dtype = torch.float64) -> Tensor:
    """``G + lambda I`` on the weight columns, ``lambda = rel * mean(diag G)``; the last (bias)
    diagonal entry is left as is. G: (n+1, n+1) -> a new (n+1, n+1) tensor of `dtype`."""
    Gd = G.to(dtype, copy=True)
    Gd.diagonal()[:-1] += rel * Gd.diagonal().mean()
    return Gd


def check_finite(name: str, t: Tensor) -> None:
    if not all_finite(t):  # memory.all_finite: no mask the size of t
        raise SolverError(f"{name} contains NaN or Inf; check the calibration activations "
                          "(fp16 overflow?) or the weights before pruning")


QUAD_BLOCK = 1024  # columns of G per step of quadratic_form


def quadratic_form(A: Tensor, G: Tensor, block: int | None = None) -> float:
    """tr(A G A^T), summed in float64, on A's device. G on that device: one product (``block``
    None); G elsewhere (host memory: see the module doc): G's columns are copied over
    ``block`` (default QUAD_BLOCK) at a time. A: (d, m), G: (m, m) symmetric -> float"""
    if block is None and G.device == A.device:
        return float(((A @ G.to(A.dtype)) * A).sum(dtype=torch.float64))
    block = block or QUAD_BLOCK
    total = 0.0
    for j in range(0, G.shape[1], block):
        Gb = G[:, j:j + block].to(device=A.device, dtype=A.dtype, non_blocking=True)  # (m, b)
        total += float(((A @ Gb) * A[:, j:j + block]).sum(dtype=torch.float64))
    return total


def cholesky(A: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise SolverError(f"{what} is not positive definite (leading minor {int(info)}); "
                          "increase damp_rel")
    return L


TRANSPOSE_TILE = 512  # tile of the in-place square transpose (two tiles of scratch)


def _transpose_(A: Tensor) -> Tensor:
    """Transposes a square matrix in place, tile pair by tile pair. A: (m, m) -> A (= A^T)."""
    m, t = A.shape[0], TRANSPOSE_TILE
    for i in range(0, m, t):
        d = A[i:i + t, i:i + t]
        d.copy_(d.T.clone())
        for j in range(i + t, m, t):
            upper = A[i:i + t, j:j + t].clone()
            A[i:i + t, j:j + t] = A[j:j + t, i:i + t].T
            A[j:j + t, i:i + t] = upper.T
    return A


def inverse_from_factor(L: Tensor) -> Tensor:
    """(L L^T)^-1 from its Cholesky factor with one m x m buffer (the result) besides L: the two
    triangular solves of ``cholesky_solve(I, L)`` in place on a column-major identity (on the CPU
    bit for bit ``cholesky_solve``'s result, which is several times faster than
    ``cholesky_inverse`` on MKL CPUs), then an in-place transpose back to row-major storage.
    Neither library call is used as such: ``cholesky_solve(I, L)`` holds I, L and its output, and
    on CUDA ``cholesky_inverse`` (cuSOLVER, potrs-based) holds L, its result and a working copy
    of L: three m x m buffers either way, where the memory formulas count two."""
    X = torch.eye(L.shape[0], dtype=L.dtype, device=L.device).mT  # column-major I
    torch.linalg.solve_triangular(L, X, upper=False, out=X)
    torch.linalg.solve_triangular(L.mT, X, upper=True, out=X)
    return _transpose_(X.mT)  # X.mT: row-major storage of X^T; transposed in place -> X


def spd_inverse(A: Tensor, what: str) -> Tensor:
    return inverse_from_factor(cholesky(A, what))


def take_inverse(p: "Problem") -> Tensor:
    """Gd^-1, dropping the problem's reference to Gd first (callers that need only the inverse
    then hold one m x m matrix and the factor, not three)."""
    Gd, p.Gd = p.Gd, None
    L = cholesky(Gd, "damped G")
    del Gd  # the factor replaces it
    return inverse_from_factor(L)


@dataclass
class Problem:
    """A validated float64 problem on its *variable* columns (bias included iff allow_bias)."""

    W: Tensor  # (d_out, m)  m = n+1 with a free bias column, n without
    Gd: Tensor | None  # (m, m) damped; G = Gd - lam on the weight columns' diagonal
    lam: float  # the damping added to the weight columns' diagonal
    groups: Tensor  # (U, g) long, column indices < n
    block_of: Tensor  # (U,) long in 0..B-1
    n_blocks: int
    allow_bias: bool

    @property
    def n_units(self) -> int:
        return self.groups.shape[0]

    def weight_diag(self) -> Tensor:
        """The undamped diagonal of G on the variable columns. -> (m,)"""
        d = self.Gd.diagonal().clone()
        d[: self.W.shape[1] - (1 if self.allow_bias else 0)] -= self.lam
        return d

    def undamped_times(self, D: Tensor) -> Tensor:
        """D @ G without a second m x m matrix. D: (d, m) -> (d, m)"""
        out = D @ self.Gd
        n_w = self.W.shape[1] - (1 if self.allow_bias else 0)
        out[:, :n_w] -= self.lam * D[:, :n_w]
        return out

    def support(self, kept: Tensor) -> Tensor:
        """Variable columns of a kept unit set, sorted, bias column last when free. -> (|S|,)"""
        cols = self.groups[kept].reshape(-1).sort().values
        if self.allow_bias:
            cols = torch.cat([cols, cols.new_tensor([self.W.shape[1] - 1])])
        return cols


def prepare(Wt: Tensor, G: Tensor, groups: Tensor, blocks: Tensor | None = None,
             allow_bias: bool = True, damp_rel: float = DAMP_REL, gram: bool = True) -> Problem:
    """Validates a problem and builds it: the weights in the solve dtype (no copy when Wt already
    is) and the damped Gram (an (m, m) copy; ``gram=False``: none, for callers that need only the
    units, blocks and quota)."""
    if Wt.dim() != 2:
        raise ValueError(f"Wt must be (d_out, n+1), got shape {tuple(Wt.shape)}")
    m1 = Wt.shape[1]
    n = m1 - 1
    if G.shape != (m1, m1):
        raise ValueError(f"G must be ({m1}, {m1}) to match Wt {tuple(Wt.shape)}, got "
                         f"{tuple(G.shape)}")
    if groups.dim() != 2 or groups.dtype not in (torch.int64, torch.int32) or groups.numel() == 0:
        raise ValueError(f"groups must be a non-empty integer (U, g) tensor, got "
                         f"{groups.dtype} {tuple(groups.shape)}")
    groups = groups.to(device=Wt.device, dtype=torch.long)
    if int(groups.min()) < 0 or int(groups.max()) >= n:
        raise ValueError(f"groups hold column indices outside [0, {n}) (the bias column {n} is "
                         "not a unit)")
    if groups.unique().numel() != groups.numel():
        raise ValueError("groups overlap: a column belongs to more than one unit")
    if damp_rel < 0:
        raise ValueError(f"damp_rel must be >= 0, got {damp_rel}")
    U = groups.shape[0]
    if blocks is None:
        block_of, n_blocks = torch.zeros(U, dtype=torch.long, device=Wt.device), 1
    else:
        if blocks.shape != (U,):
            raise ValueError(f"blocks must be ({U},) like groups' first dim, got "
                             f"{tuple(blocks.shape)}")
        _, block_of = torch.unique(blocks.to(Wt.device), return_inverse=True)
        n_blocks = int(block_of.max()) + 1
    dt = solve_dtype(m1)
    W64 = Wt.to(dt)
    check_finite("Wt", W64)
    check_finite("G", G)
    if abs(float(G[n, n]) - 1.0) > 1e-3:
        raise ValueError(f"G[n, n] = {float(G[n, n]):.4g}, expected 1: G must be the augmented "
                         "Gram of [P; 1] (last row/column = the constant input)")
    lam = damp_rel * float(G.diagonal().to(torch.float64).mean())  # as damped(G) computes it
    Gd = None
    if gram:
        Gd = (G if allow_bias else G[:n, :n]).to(device=Wt.device, dtype=dt, copy=True)
        Gd.diagonal()[:n] += lam  # the n weight columns; never the bias column
    if not allow_bias:
        W64 = W64[:, :n]
    return Problem(W64, Gd, lam, groups, block_of, n_blocks, allow_bias)


def block_quota(p: Problem, k_keep: int) -> int:
    """Units kept per block; raises ValueError when k_keep cannot be split evenly."""
    if not 0 <= k_keep <= p.n_units:
        raise ValueError(f"k_keep must be in [0, {p.n_units}], got {k_keep}")
    if k_keep % p.n_blocks:
        raise ValueError(f"k_keep={k_keep} is not divisible by the {p.n_blocks} blocks "
                         "(every block keeps the same number of units)")
    q = k_keep // p.n_blocks
    smallest = int(torch.bincount(p.block_of, minlength=p.n_blocks).min())
    if q > smallest:
        raise ValueError(f"{q} units per block requested but the smallest block has {smallest}")
    return q


def topk_per_block(score: Tensor, block_of: Tensor, n_blocks: int, quota: int) -> Tensor:
    """Ids of the ``quota`` highest-scoring units of every block, sorted. score: (U,) -> (k,)"""
    kept = []
    for b in range(n_blocks):
        ids = (block_of == b).nonzero().squeeze(1)
        kept.append(ids[score[ids].topk(quota).indices])
    return torch.cat(kept).sort().values


def obs_saliency(W: Tensor, Hinv: Tensor, groups: Tensor) -> Tensor:
    """tr(W_J [Hinv_JJ]^-1 W_J^T) per unit. W: (d, m), Hinv: (m, m), groups: (U, g) -> (U,)"""
    if groups.shape[1] == 1:
        c = groups[:, 0]
        return W[:, c].pow(2).sum(0) / Hinv.diagonal()[c]
    HJJ = Hinv[groups[:, :, None], groups[:, None, :]]  # (U, g, g)
    WJ = W[:, groups]  # (d, U, g)
    X = torch.linalg.solve(HJJ, WJ.permute(1, 2, 0))  # (U, g, d) = HJJ^-1 W_J^T
    return torch.einsum("dug,ugd->u", WJ, X)


# --------------------------------------------------------------------------------------------
# public API


def reconstruction_error(Wt: Tensor, W_new: Tensor, G: Tensor) -> float:
    """Mean squared output error per token, ``tr((Wt - W_new) G (Wt - W_new)^T)``, on the
    undamped G (on Wt's device or in host memory). Wt, W_new: (d_out, n+1); G: (n+1, n+1)."""
    D = torch.empty(Wt.shape, dtype=G.dtype, device=Wt.device)  # (d_out, n+1)
    for i in range(0, D.shape[0], 256):  # the fp64 difference by row blocks: no fp64 (d_out, n+1) copies
        D[i:i + 256] = Wt[i:i + 256].to(torch.float64) - W_new[i:i + 256].to(torch.float64)
    err = quadratic_form(D, G)  # no fp64 copy of G; G may be in host memory
    if err != err or err in (float("inf"), float("-inf")):
        raise SolverError("reconstruction error is not finite")
    return max(err, 0.0)


def group_saliency(Wt: Tensor, G: Tensor, groups: Tensor, kind: Literal["obs", "diag"] = "obs",
                   allow_bias: bool = True, damp_rel: float = DAMP_REL) -> Tensor:
    """Cost of removing each unit alone. ``diag``: ||W_J||_F^2 * mean(diag G)_J (undamped G);
    ``obs``: tr(W_J [(Gd^-1)_JJ]^-1 W_J^T), the damped loss increase of removing unit J with the
    optimal compensation by all other columns (bias included iff allow_bias).
    Wt: (d_out, n+1), G: (n+1, n+1), groups: (U, g) -> float64 (U,)"""
    p = prepare(Wt, G, groups, allow_bias=allow_bias, damp_rel=damp_rel)
    if kind == "diag":
        dg = p.weight_diag()[p.groups].mean(1)  # (U,)
        return p.W[:, p.groups].pow(2).sum((0, 2)) * dg
    if kind == "obs":
        return obs_saliency(p.W, take_inverse(p), p.groups)
    raise ValueError(f"kind must be 'obs' or 'diag', got {kind!r}")


def refit_on(p: Problem, kept: Tensor, consume: bool = False) -> Tensor:
    """Damped least squares on the support of ``kept`` in problem space -> (d, m), zero off S.
    ``consume``: drop the problem's Gd once its two blocks are taken (the caller's last use), so
    the kept block and its factor never sit next to the whole (m, m) matrix."""
    S = p.support(kept)
    out = torch.zeros_like(p.W)  # (d, m)
    removed = torch.ones(p.W.shape[1], dtype=torch.bool, device=p.W.device)
    removed[S] = False
    R = removed.nonzero().squeeze(1)
    out[:, S] = p.W[:, S]
    if S.numel() and R.numel():
        # one advanced index per block: no (|S| x m) intermediate copies of the Gram
        rhs = (p.W[:, R] @ p.Gd[R[:, None], S[None, :]]).T  # (|S|, d); off-diagonal: G == Gd there
        GSS = p.Gd[S[:, None], S[None, :]]
        if consume:
            p.Gd = None
        L = cholesky(GSS, "damped G on the kept support")
        del GSS
        out[:, S] += torch.cholesky_solve(rhs, L).T
    elif consume:
        p.Gd = None
    check_finite("refit weights", out)
    return out


def problem_loss(p: Problem, Wn: Tensor, damped_: bool = True) -> float:
    """tr((W - Wn) G (W - Wn)^T) in problem space, damped G by default."""
    D = p.W - Wn  # (d, m)
    return float(((D @ p.Gd if damped_ else p.undamped_times(D)) * D).sum())


def refit(Wt: Tensor, G: Tensor, kept_units: Tensor, groups: Tensor, allow_bias: bool = True,
          damp_rel: float = DAMP_REL) -> Tensor:
    """Exact least squares on the support S (kept columns, plus the bias column iff allow_bias):
    ``W'_S = Wt_S + Wt_R G_RS (Gd_SS)^-1`` (R: removed columns), which is
    ``(Wt Gd)_S (Gd_SS)^-1``; removed columns are zero; with allow_bias=False the bias column
    keeps its value in Wt. An empty kept set with a free bias gives bias = mean output.
    Wt: (d_out, n+1), kept_units: (k,) unit ids -> float64 (d_out, n+1)"""
    p = prepare(Wt, G, groups, allow_bias=allow_bias, damp_rel=damp_rel)
    kept = torch.as_tensor(kept_units, dtype=torch.long, device=p.W.device)
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= p.n_units):
        raise ValueError(f"kept_units must be unit ids in [0, {p.n_units})")
    new = refit_on(p, kept, consume=True)  # (d_out, m)
    if new.shape[1] == Wt.shape[1]:  # a free bias column: the whole result
        return new
    out = Wt.to(p.W.dtype).clone()  # (d_out, n+1); the bias column stays when not free
    out[:, : p.W.shape[1]] = new
    return out



def augmented_weights(W: Tensor, b: Tensor | None) -> Tensor:
    """[W, b] (d_out, n+1) built directly in the solve dtype (or W's / b's, if wider): the values
    the solver converts to, without an fp64 copy of a module that solves in fp32. b None: zeros."""
    wide = W.dtype if b is None else torch.promote_types(W.dtype, b.dtype)
    Wt = W.new_empty((W.shape[0], W.shape[1] + 1), dtype=torch.promote_types(solve_dtype(W.shape[1] + 1), wide))
    Wt[:, :-1] = W
    Wt[:, -1] = 0.0 if b is None else b
    return Wt
