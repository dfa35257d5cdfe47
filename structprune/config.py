"""The one source of truth for run settings: defaults, allowed values, bounds and help strings.

Every `PruneConfig` field carries its help and, where it has them, its choices and bounds in its
metadata: `min` / `max` (inclusive), `gt` (an open lower bound), `step` and, for an open lower
bound, `smallest` (the least value a form offers). `PruneConfig.validate()` checks those bounds,
the CLI builds its options from them and the app its widgets, so a default or a bound changed here
changes everywhere. Help strings say what an option does, never measured figures.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields

from .errors import InvalidConfigError

METHODS = ("structprune", "magnitude", "wanda-sp", "flap", "owl", "global-taylor")
ALLOCATIONS = ("uniform", "threshold", "softmax", "owl")
ENERGIES = ("relative", "residual", "sensitivity", "module")
SELECTORS = ("admm", "greedy", "saliency")
SALIENCIES = ("obs", "diag")
TARGETS = ("local", "dense")
REFINE_SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS = ("auto", "memory", "disk")
MAX_SPARSITY = 0.9  # the one cap: on the target sparsity and on any one module's
MAX_REFINE_EPOCHS = 100
MAX_SEED = 2**31 - 1
ALIGN_DEFAULT = 64  # MLP widths in multiples of 64: faster than dense on CPU at every sparsity (docs/RESULTS.md "Speed")
MAX_ALIGN = 1024

_BOUND_KEYS = ("min", "max", "gt", "step", "smallest")


def _f(default, help: str, **kw):
    unknown = set(kw) - {"choices", *_BOUND_KEYS}
    assert not unknown, unknown
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneConfig:
    """Everything that defines one pruning run (docs/METHOD.md, docs/PROTOCOL.md)."""

    model: str = _f("smollm2-135m", "built-in name, tiny-* demo config, local HF folder, or hub id")
    sparsity: float = _f(0.3, "fraction of prunable parameters (attention heads + MLP channels) to remove",
                         min=0.0, max=MAX_SPARSITY, step=0.05)
    method: str = _f("structprune", "pruning method", choices=METHODS)
    allocation: str = _f("softmax", "how the budget is split across modules", choices=ALLOCATIONS)
    temperature: float = _f(
        1.0, "softmax temperature (dimensionless; energies are z-scored logs); inf = uniform",
        gt=0.0, smallest=0.01, step=0.1)
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
              "(OBS / SparseGPT's percdamp); kept weights are pulled towards their original values",
        gt=0.0, max=1.0, smallest=0.0001, step=0.001)
    refine_epochs: int = _f(
        0, "block refit after each layer is pruned (structprune): epochs of Adam on all of the layer's remaining "
           "weights, fit through its nonlinearities to the dense layer's output on the same inputs, the best epoch "
           "kept by held-out windows; 0 = off. Each epoch adds about one more pass over the calibration windows "
           "per layer",
        min=0, max=MAX_REFINE_EPOCHS, step=1)
    refine_lr: float = _f(1e-3, "block refit: Adam's initial learning rate", gt=0.0, max=0.1, smallest=1e-6,
                          step=1e-5)
    refine_schedule: str = _f("cosine", "block refit: learning rate decayed to 0 over all steps by a half cosine, "
                                        "or constant", choices=REFINE_SCHEDULES)
    align_channels: int = _f(
        ALIGN_DEFAULT, "every MLP keeps a multiple of this many channels (matrix widths that fast GEMM kernels "
                       "tile; attention keeps whole heads, multiples of head_dim already); 1 = no alignment",
        min=1, max=MAX_ALIGN, step=1)
    s_max: float = _f(0.9, "largest sparsity any one module may receive", gt=0.0, max=MAX_SPARSITY, smallest=0.05,
                      step=0.05)
    owl_lambda: float = _f(0.08, "OWL: half-width of the sparsity range around the target", min=0.0, max=0.3,
                           step=0.01)
    owl_m: float = _f(5.0, "OWL: outlier threshold, multiples of the layer's mean score", gt=0.0, smallest=0.5,
                      step=0.5)
    sensitivity_windows: int = _f(4, "calibration windows used to measure module sensitivities", min=1, step=1)
    nsamples: int = _f(64, "calibration windows", min=1, step=1)
    seqlen: int = _f(512, "tokens per calibration / evaluation window", min=2, step=1)
    seed: int = _f(0, "seed of the calibration sampler", min=0, max=MAX_SEED, step=1)
    calib_data: str = _f("sotu", "calibration corpus (its calibration split)")
    eval_data: tuple[str, ...] = _f(("sotu",), "evaluation corpora (their test splits)")
    eval_windows: int | None = _f(None, "evaluation windows per corpus (None = all)", min=1, step=1)
    device: str = _f("auto", "compute device: auto, cuda (or cuda:N) or cpu")
    dtype: str = _f("float32", "model dtype on the device: float32 (CPU), bfloat16 / float16 allowed on CUDA",
                    choices=DTYPES)
    batch_size: int = _f(1, "windows per forward batch", min=1, step=1)
    weights: str = _f(
        "auto", "where the weights stay between uses: memory (the whole model in host RAM), disk (each layer read "
                "from the model folder's safetensors when needed, pruned layers written out as they finish; the "
                "host holds a few layers) or auto (disk when the model would fill more than half the free host "
                "memory)", choices=WEIGHTS)

    def __post_init__(self) -> None:
        if isinstance(self.eval_data, str):
            self.eval_data = (self.eval_data,)
        self.eval_data = tuple(self.eval_data)
        self.validate()

    def validate(self) -> None:
        """Every field against its metadata (choices, bounds), then the rules between fields."""
        check_settings({f.name: getattr(self, f.name) for f in fields(self)})
        if self.weights == "disk" and self.method in ("global-taylor", "magnitude"):
            raise InvalidConfigError(f"{self.method} needs the whole model in memory; use weights memory (or auto)")

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


def check_settings(values: dict, label: Callable[[str], str] | None = None) -> None:
    """Checks run settings (PruneConfig field -> value) one by one, then the rules between them,
    before anything is built. `label` names a setting in messages (the CLI passes its flags);
    missing settings take their defaults."""
    label = label or (lambda name: name)
    v = {f.name: default_for(f.name) for f in fields(PruneConfig)} | dict(values)
    for name in (f.name for f in fields(PruneConfig)):
        check_value(name, v[name], label(name))
    if v["refine_epochs"] and v["method"] != "structprune":
        raise InvalidConfigError(f"{label('refine_epochs')} is a structprune setting; set it to 0 for {v['method']}")
    if v["sparsity"] > v["s_max"]:
        raise InvalidConfigError(f"{label('sparsity')} {v['sparsity']} is above {label('s_max')} {v['s_max']}; "
                                 f"lower it or raise {label('s_max')}")
    device = v["device"]
    if not isinstance(device, str) or (device not in ("auto", "cpu", "cuda") and not _is_cuda_index(device)):
        raise InvalidConfigError(f"{label('device')} must be auto, cpu, cuda or cuda:N (got {device!r})")
    for name in ("model", "calib_data"):
        if not isinstance(v[name], str) or not v[name].strip():
            raise InvalidConfigError(f"{label(name)} must name a model / corpus (got {v[name]!r})")
    eval_data = v["eval_data"]
    # () is a run evaluated by its caller (benchmarks/compare.py); the CLI always names one or more
    if isinstance(eval_data, str) or not all(isinstance(e, str) and e.strip() for e in eval_data):
        raise InvalidConfigError(f"{label('eval_data')} must name one or more corpora (got {eval_data!r})")


def _is_cuda_index(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


def config_field(name: str) -> Field:
    """The dataclass field of one run setting (KeyError-free: an unknown name is a programming error)."""
    return next(f for f in fields(PruneConfig) if f.name == name)


def default_for(name: str):
    f = config_field(name)
    return f.default if f.default is not MISSING else f.default_factory()


def help_for(name: str) -> str:
    return config_field(name).metadata["help"]


def choices_for(name: str) -> tuple[str, ...] | None:
    return config_field(name).metadata.get("choices")


def bounds_for(name: str) -> dict:
    """{min, max, gt, step, smallest} of a setting (absent keys: no such bound)."""
    meta = config_field(name).metadata
    return {k: meta[k] for k in _BOUND_KEYS if k in meta}


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def range_text(name: str) -> str:
    """The allowed numbers in words, e.g. '0 to 0.9', 'above 0, at most 1', 'at least 1' ('' if unbounded)."""
    b = bounds_for(name)
    if "max" in b:
        if "min" in b:
            return f"{_num(b['min'])} to {_num(b['max'])}"
        return (f"above {_num(b['gt'])}, " if "gt" in b else "") + f"at most {_num(b['max'])}"
    if "min" in b:
        return f"at least {_num(b['min'])}"
    if "gt" in b:
        return "positive" if b["gt"] == 0 else f"above {_num(b['gt'])}"
    return ""


def check_value(name: str, value, label: str | None = None) -> None:
    """Raises InvalidConfigError when `value` is outside the setting's choices or bounds. `label` names
    it in the message (e.g. a CLI flag); the setting's own name by default."""
    label = label or name
    f = config_field(name)
    if value is None and f.default is None:
        return  # optional setting left unset (e.g. eval_windows: all)
    choices = f.metadata.get("choices")
    if choices is not None:
        if value not in choices:
            raise InvalidConfigError(f"{label} must be one of {', '.join(choices)} (got {value!r})")
        return
    b = bounds_for(name)
    if not b:
        return
    whole = f.type in ("int", "int | None")  # annotations are strings here (postponed evaluation)
    if whole and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        raise InvalidConfigError(f"{label} must be a whole number, {range_text(name)} (got {value!r})")
    if not whole and not isinstance(value, numbers.Real):
        raise InvalidConfigError(f"{label} must be a number, {range_text(name)} (got {value!r})")
    ok = (("min" not in b or value >= b["min"]) and ("gt" not in b or value > b["gt"])
          and ("max" not in b or value <= b["max"]))
    if ok:
        return
    if "min" in b and "max" in b:
        msg = f"between {_num(b['min'])} and {_num(b['max'])}"
    elif "gt" in b and "max" in b:
        msg = f"in ({_num(b['gt'])}, {_num(b['max'])}]"
    else:
        msg = range_text(name)
    raise InvalidConfigError(f"{label} must be {msg} (got {value})")
