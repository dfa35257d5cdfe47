"""Device memory: measured on CUDA, accounted on CPU, and estimated for any config.

On CUDA the ledger reads `torch.cuda.memory_allocated` / `max_memory_allocated`. On the CPU there is
no separate device, so the pipeline keeps its own accounts of what it would hold on one: every
`hold` names an item and its size from the byte formulas below. `estimate_memory` replays the same
formulas over a config's shapes, which is why the estimate equals the CPU-accounted peak exactly
and why, on CUDA, the gap between the two is what the formulas miss (allocator slack, kernels'
workspaces).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .adapters import AdapterSpec, LayerLayout

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}
GRAM_DTYPE_BYTES = 4  # Grams accumulate in fp32 on the device


def layer_weight_bytes(lay: LayerLayout, dtype_bytes: int) -> int:
    """Parameters of one decoder layer (linear maps + two norms), in bytes."""
    d, hd = lay.hidden, lay.head_dim
    attn = d * hd * (2 * lay.n_heads + 2 * lay.n_kv_heads)
    if lay.attn_bias:
        attn += hd * (lay.n_heads + 2 * lay.n_kv_heads) + d
    mlp = (3 if lay.gated else 2) * d * lay.intermediate
    if lay.mlp_bias:
        mlp += lay.intermediate + d
    norms = 4 * d
    return (attn + mlp + norms) * dtype_bytes


def activation_bytes(batch: int, seqlen: int, hidden: int, dtype_bytes: int) -> int:
    """One batch of residual-stream activations (B, S, d)."""
    return batch * seqlen * hidden * dtype_bytes


def forward_workspace_bytes(lay: LayerLayout, batch: int, seqlen: int, dtype_bytes: int,
                            hooked: bool = True, relative: bool = False) -> int:
    """Transient tensors of one layer forward on one batch (the output included), the largest of
    its phases as measured with structprune.memprobe (benchmarks/cpu_transients.py; SDPA
    attention, which never holds the (S x S) scores):

    - attention: the residual and normalised input, q/k/v and their rotated / reshaped copies
      (2 x the q/k/v columns);
    - MLP: the residual and normalised input, gate, up and act(gate) (OPT: fc1 and its ReLU);
    - ``hooked`` (a Gram hook or input capture on an output projection, as in pass 1 and pass 2):
      the hook's fp32 copy [P; 1] of the module's input next to that input (and, for o_proj,
      q/k/v, still referenced);
    - ``relative`` hooks (gram.relative_weights, run after the projection, whose output the forward
      holds anyway) add the output plus the residual (model dtype; the norm reads it in fp32
      without a copy) and three fp32 scalars per token.
    """
    tokens = batch * seqlen
    h, heads = lay.hidden, lay.n_heads * lay.head_dim
    qkv = lay.head_dim * (lay.n_heads + 2 * lay.n_kv_heads)
    attn = (2 * h + 2 * qkv) * dtype_bytes
    mlp = ((2 * h + 3 * lay.intermediate) if lay.gated else (h + 2 * lay.intermediate)) * dtype_bytes
    hook_mlp = (2 * h + lay.intermediate) * dtype_bytes + (lay.intermediate + 1) * GRAM_DTYPE_BYTES
    hook_attn = (2 * h + qkv + heads) * dtype_bytes + (heads + 1) * GRAM_DTYPE_BYTES
    if relative:
        weights = h * dtype_bytes + 3 * GRAM_DTYPE_BYTES
        hook_mlp, hook_attn = hook_mlp + weights, hook_attn + weights
    return tokens * (max(attn, mlp, hook_mlp, hook_attn) if hooked else max(attn, mlp))


def backprop_saved_bytes(lay: LayerLayout, norm: str, batch: int, seqlen: int, dtype_bytes: int) -> int:
    """What autograd keeps of one decoder layer's forward on one batch until the backward reaches
    it (global-taylor), measured with structprune.memprobe (tests/test_estimator_fit.py) and
    checked against H200 peaks (benchmarks/results/memory/estimator-vs-h200.json). Per token:

    - attention, SDPA's fused kernels (CUDA flash / memory-efficient, the CPU's flash kernel): the
      rotated q, k, v it is called with (k/v at the KV width: transformers passes ``enable_gqa``
      instead of repeating them when there is no mask), its output (also the o-projection's
      input) and the fp32 log-sum-exp per head; never the (S x S) probabilities (the math
      fallback, taken with an explicit mask, would keep those: not modelled);
    - ``norm="rmsnorm"`` (llama family), per RMSNorm (two): the fp32 upcast of its input, the
      normalised input in the model dtype (kept by the weight product) and the output (kept by the
      projections); MLP: gate, act(gate), up and act(gate) * up (the down projection's input);
    - ``norm="layernorm"`` (OPT), per LayerNorm (two): input and output, fp32 mean and rstd; MLP:
      the ReLU output only (ReLU's backward needs its result, fc2 its input: the same tensor).

    ``norm``: the family's `AdapterSpec.norm`.
    """
    tokens = batch * seqlen
    d = lay.hidden
    attn = lay.head_dim * (2 * lay.n_heads + 2 * lay.n_kv_heads) * dtype_bytes + 4 * lay.n_heads
    if norm == "layernorm":
        norms = 2 * (2 * d * dtype_bytes + 8)
        mlp = lay.intermediate * dtype_bytes
    else:
        norms = 2 * norm_saved_bytes(d, dtype_bytes, norm)
        mlp = (4 if lay.gated else 2) * lay.intermediate * dtype_bytes
    return tokens * (norms + attn + mlp)


def refine_bytes(lay: LayerLayout, norm: str, batch: int, seqlen: int, dtype_bytes: int) -> int:
    """The block refit of one layer (refine.fit_layer), besides the layer and its dense copy: in fp32,
    the gradients, Adam's two moments and the best epoch's copy of the parameters (and the working
    copy itself when the model is not fp32); what autograd saves of one batch's forward; and the
    batch's input, target, output and the loss's two temporaries. ``norm``: `AdapterSpec.norm`."""
    w = layer_weight_bytes(lay, 4)
    state = 4 * w + (w if dtype_bytes != 4 else 0)
    return state + backprop_saved_bytes(lay, norm, batch, seqlen, 4) + 5 * activation_bytes(batch, seqlen, lay.hidden, 4)


def norm_saved_bytes(hidden: int, dtype_bytes: int, norm: str) -> int:
    """Per token, what one norm of kind ``norm`` (`AdapterSpec.norm`) keeps for the backward (see
    `backprop_saved_bytes`)."""
    if norm == "layernorm":
        return 2 * hidden * dtype_bytes + 8
    return (4 + 2 * dtype_bytes) * hidden


def loss_head_bytes(batch: int, seqlen: int, vocab: int, dtype_bytes: int) -> int:
    """The LM loss's peak (global_taylor.calibration_loss_gradients), at the log-softmax's
    backward: the fp32 logits of positions 0..S-2, the log-softmax output autograd keeps, its
    gradient and the logits' gradient: four fp32 (B, S-1, V) tensors. In fp32 the model's logits
    are that same tensor, kept whole (S positions) by the slice; the model-dtype logits of a
    bf16 model are freed before the loss."""
    rows = batch * (seqlen - 1)
    return 16 * rows * vocab + (4 * batch * vocab if dtype_bytes == 4 else 0)


def logits_bytes(batch: int, seqlen: int, vocab: int) -> int:
    """Logits and their log-softmax for one batch, in fp32 (the NLL is taken in fp32)."""
    return 2 * batch * seqlen * vocab * 4


def embed_workspace_bytes(spec: AdapterSpec, batch: int, seqlen: int, hidden: int, head_dim: int,
                          dtype_bytes: int) -> int:
    """`LayerStream.embed`'s transients for one batch (the model's base runs with its layers
    replaced by recorders, so the final norm runs on the embeddings), measured with
    structprune.memprobe (tests/test_estimator_fit.py). Per token, by the family's `spec`:

    - the embeddings and the final norm: ``norm="layernorm"`` (OPT) the LayerNorm's output next to
      them; ``norm="rmsnorm"`` (llama family) the RMSNorm's fp32 upcast of its input next to its
      fp32 normalised copy (fp32 models: no upcast; the input, the normalised copy and the output);
    - the positions: ``learned_positions`` (OPT) the position embeddings and their sum with the
      token embeddings; rotary (llama family) the cos / sin tables kept for the layers.
    """
    tokens = batch * seqlen
    if spec.norm == "layernorm":
        norm = 2 * hidden * dtype_bytes
    else:
        norm = max(dtype_bytes + 8, 3 * dtype_bytes) * hidden
    positions = 2 * (hidden if spec.learned_positions else head_dim) * dtype_bytes
    return tokens * (norm + positions)


FINITE_CHECK_ELEMENTS = 1 << 20  # elements per slice of `all_finite`: ~7 MiB of transients


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite, without a mask the size of `t`: ``torch.isfinite`` on
    a whole matrix allocates 7 bytes per element (its absolute value in fp32 and three boolean
    masks, measured with structprune.memprobe), 0.8 GiB for a 7B model's MLP Gram. A NaN or Inf
    anywhere makes the sum non-finite; only when it is (or the sum overflowed) are the rows checked,
    FINITE_CHECK_ELEMENTS at a time (~7 MiB whatever the matrix)."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, FINITE_CHECK_ELEMENTS // max(1, rows.shape[1]))
    return all(bool(torch.isfinite(rows[i:i + step]).all()) for i in range(0, rows.shape[0], step))


MALLOC_MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, held fixed


def return_freed_host_memory() -> bool:
    """Makes every host allocation over MALLOC_MMAP_THRESHOLD its own mapping, handed back to the
    system when freed (glibc's mallopt M_MMAP_THRESHOLD); True where it was set.

    glibc raises that threshold each time a mapped block is freed, up to 32 MiB, so a streamed
    layer's tensors of a few MiB soon come from its heap, which keeps them after they are freed:
    the resident size creeps up layer after layer. Measured on a 4-layer model of the 1B shape
    with the weights on disk: peak resident 1.28 GiB with glibc's default, 1.00 GiB with the
    threshold fixed (benchmarks/results/scale/allocator.json). Process-wide, so only disk-streamed runs set it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MALLOC_MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return False


def finite_check_bytes(n_rows: int, n_cols: int) -> int:
    """The transients of `all_finite` on an n_rows x n_cols matrix: 7 bytes per element of one slice."""
    return 7 * min(n_rows, max(1, FINITE_CHECK_ELEMENTS // max(1, n_cols))) * n_cols


def output_energy_bytes(d_out: int, n: int) -> int:
    """`pipeline.module_output_energy` with the Gram on the device: [W, b] in fp32, its product
    with G (fp32) and the float64 copy the sum takes, 16 bytes per element of d_out x (n+1)
    (measured with structprune.memprobe on wanda-sp's pass 1, tests/test_estimator_fit.py)."""
    return 16 * d_out * (n + 1)


def gram_check_bytes(n: int) -> int:
    """Reading a Gram (`GramHook.gram`): the finite check of the (n+1)^2 fp32 matrix (`all_finite`)."""
    return finite_check_bytes(n + 1, n + 1)


def column_rule_bytes(d_out: int, n: int, dtype_bytes: int) -> int:
    """The column-score baselines' rule (wanda-sp, owl, flap; `_ColumnScoreBaseline.rule`): the
    pruned copy of W (model dtype) and, at the reconstruction error, the fp64 [W, b] and
    [W', b], the fp32 difference and its product with G, and the fp64 copy the sum takes:
    four fp64 d_out x (n+1) matrices' worth (measured with structprune.memprobe)."""
    return d_out * (n + 1) * (32 + dtype_bytes)


def gram_bytes(n: int) -> int:
    """Augmented Gram matrix ((n+1) x (n+1)) in fp32."""
    return (n + 1) * (n + 1) * GRAM_DTYPE_BYTES


FP64_MAX_COLUMNS = 4096  # solver/problem.py: wider problems solve in fp32


def solve_dtype_bytes(n: int) -> int:
    return 8 if n + 1 <= FP64_MAX_COLUMNS else 4


def saliency_bytes(d_out: int, n: int, group: int = 1) -> int:
    """OBS saliencies of one module (`group`: columns per unit, 1 for channels, head_dim for
    heads), the larger of two phases measured with structprune.memprobe (cpu_transients.py):
    the inverse (the weights [W, b], the damped Gram, then its Cholesky factor next to the
    inverse: two (n+1)^2 matrices) and the saliencies (the inverse, the weights, and per head
    W_J, Hinv_JJ^-1 W_J^T and a product: three more d_out x (n+1); per channel two)."""
    m = n + 1
    mm, dm = m * m, d_out * m
    return max(2 * mm + dm, mm + (4 if group > 1 else 3) * dm) * solve_dtype_bytes(n)


def solver_bytes(d_out: int, n: int, group: int = 1) -> int:
    """One module's solve (greedy OBS, swaps on heads, then the refit), measured with
    structprune.memprobe: two (n+1)^2 matrices at a time (damped Gram / factor / inverse; in the
    swap search the damped Gram and the running inverse) and d_out x (n+1) copies: the weights,
    their compensated copy (channels: two); for heads the swap search's weights, residual and
    per-pair updates as well (5.5 on average over the shapes measured))."""
    m = n + 1
    if group > 1:
        return (4 * m * m + 11 * d_out * m) * solve_dtype_bytes(n) // 2
    return (2 * m * m + 2 * d_out * m) * solve_dtype_bytes(n)


def gram_batch_bytes(lay: LayerLayout, batch: int, seqlen: int) -> int:
    """A Gram hook's fp32 copy [P; 1] of one batch of its module's input ((B*S, n+1)), for the
    widest hooked input (the MLP's intermediate or the attention's heads): live in the forward."""
    return batch * seqlen * (max(lay.n_heads * lay.head_dim, lay.intermediate) + 1) * GRAM_DTYPE_BYTES


@dataclass
class MemorySample:
    t: float  # seconds since the ledger started
    bytes: int
    label: str


@dataclass
class DeviceLedger:
    """What the pipeline holds on its compute device, with its peak and a timeline.

    `kind` is "measured-cuda" or "accounted-cpu" (the label every reported figure carries).
    """

    device: torch.device
    items: dict[str, int] = field(default_factory=dict)
    peak_accounted: int = 0
    timeline: list[MemorySample] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.measured:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_cuda = torch.cuda.memory_allocated(self.device)

    @property
    def measured(self) -> bool:
        return self.device.type == "cuda"

    @property
    def kind(self) -> str:
        return "measured-cuda" if self.measured else "accounted-cpu"

    def hold(self, key: str, nbytes: int) -> None:
        self.items[key] = int(nbytes)
        total = sum(self.items.values())
        self.peak_accounted = max(self.peak_accounted, total)
        self._sample(key)

    def release(self, *keys: str) -> None:
        for key in keys:
            self.items.pop(key, None)
        self._sample("release")

    @contextlib.contextmanager
    def held(self, key: str, nbytes: int) -> Iterator[None]:
        """`nbytes` held under `key` for the duration of the block: the scope of a buffer, declared
        where the buffer lives, so no path (an exception included) leaves it counted."""
        self.hold(key, nbytes)
        try:
            yield
        finally:
            self.release(key)

    @property
    def current(self) -> int:
        if self.measured:
            return torch.cuda.memory_allocated(self.device)
        return sum(self.items.values())

    @property
    def peak(self) -> int:
        if self.measured:
            return torch.cuda.max_memory_allocated(self.device)
        return self.peak_accounted

    def _sample(self, label: str) -> None:
        self.timeline.append(MemorySample(time.perf_counter() - self.t0, self.current, label))

    def timeline_records(self, max_points: int = 2000) -> list[dict]:
        step = max(1, len(self.timeline) // max_points)
        return [{"t": round(s.t, 4), "bytes": s.bytes, "label": s.label} for s in self.timeline[::step]]
