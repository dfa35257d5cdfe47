"""Where a streamed model's weights live between uses: host memory, or a safetensors folder on disk.

The engine's stream (`streaming.LayerStream`) asks its `Residency` to bring a module (the base's
embeddings and norms, one decoder layer, the head) onto the device and to let it go afterwards.
`HostResidency` moves modules between host and device memory (the whole model sits in host
memory). `DiskResidency` reads a module's tensors from safetensors files when it is needed and
drops them afterwards (the parameters go back to the `meta` device), so the host holds a few
layers at most, whatever the model's size: the model itself is a skeleton built without weights
(`load_skeleton`). Pass 2 writes each pruned layer into its own shard (`LayerWriter`) before
letting it go, and the source then reads that layer from the shard.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .adapters import adapter_for
from .errors import ModelLoadError, NonFiniteResultError, OutputWriteError
from .memory import all_finite

INDEX = "model.safetensors.index.json"


class SafetensorsSource:
    """Tensor names -> files of a Hugging Face folder (one `model.safetensors`, or shards listed by
    `model.safetensors.index.json`); tensors are read one at a time, on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {self.folder / f for f in weight_map.values()}
            missing = sorted(f.name for f in files if not f.exists())
            if missing:
                raise ModelLoadError(f"{self.folder}: the shard {missing[0]} listed in {INDEX} is missing; "
                                     "copy the complete model folder")
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(f, "pt") as h:
                    self.files.update({name: f for name in h.keys()})
        if not self.files:
            raise ModelLoadError(f"{self.folder} holds no safetensors weights; disk streaming reads .safetensors files "
                                 "(convert .bin weights with save_pretrained(..., safe_serialization=True))")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], "pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        with safe_open(self.files[name], "pt", device="cpu") as h:
            t = h.get_tensor(name)
        out = t.to(device=device, dtype=dtype or t.dtype)
        # get_tensor's tensor lives in a mapping of the whole file, kept as long as the tensor: a copy
        # frees it (a 7B run under an address-space limit ran out of it reading fp32 pruned layers)
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    def fork(self) -> SafetensorsSource:
        """A copy whose redirects (a run's pruned layers) leave this source as it is."""
        other = copy.copy(self)
        other.files = dict(self.files)
        return other

    def redirect(self, names: list[str], file: Path) -> None:
        """Reads `names` from `file` from now on (a pruned layer's shard)."""
        self.files.update({n: Path(file) for n in names})

    def check(self, model: nn.Module) -> None:
        """Every parameter of the skeleton is in the files with its shape (tied output embeddings
        may be absent); raises a one-line ModelLoadError naming the first tensor that is not,
        before any work."""
        tied = _tied_names(model)
        for name, p in model.named_parameters(remove_duplicate=False):
            src = tied.get(name, name) if name not in self.files else name
            if src not in self.files:
                raise ModelLoadError(f"{self.folder}: tensor {name} is missing from the safetensors files; "
                                     "the folder is incomplete: copy it again")
            shape = self.shape(src)
            if shape != tuple(p.shape):
                raise ModelLoadError(f"{self.folder}: tensor {name} has shape {list(shape)} but the config implies "
                                     f"{list(p.shape)}; the weights do not belong to this config.json")


def _tied_names(model: nn.Module) -> dict[str, str]:
    """The output embeddings' parameter name -> the input embeddings' when the two are tied
    (a tied checkpoint stores the matrix once, under the input embeddings' name)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


class HostResidency:
    """The whole model in host memory: modules move to the device and back."""

    def bring(self, module: nn.Module, device: torch.device) -> None:
        module.to(device)

    def release(self, module: nn.Module) -> None:
        module.to("cpu")


class DiskResidency:
    """Modules read from `source` when brought to the device and dropped (to `meta`) when released.
    Counts what the host holds of the weights: `layers_loaded` decoder layers and `loaded_bytes`
    bytes of tensors right now, and their peaks (the stream brings one module at a time, the
    head two: the final norm and the LM head)."""

    def __init__(self, model: nn.Module, source: SafetensorsSource, dtype: torch.dtype, layers_path: str) -> None:
        self.source, self.dtype = source, dtype
        self.names = {id(m): n for n, m in model.named_modules()}
        self.tied = _tied_names(model)
        self.layer_prefix = layers_path + "."
        self.layers_loaded = self.peak_layers_loaded = 0
        self.loaded_bytes = self.peak_loaded_bytes = 0
        self._brought: dict[int, int] = {}  # module id -> the bytes read for it

    def _is_layer(self, module: nn.Module) -> bool:
        return self.names[id(module)].startswith(self.layer_prefix)

    def bring(self, module: nn.Module, device: torch.device) -> None:
        prefix = self.names[id(module)]
        nbytes = 0
        for pname, p in list(module.named_parameters()):
            name = f"{prefix}.{pname}" if prefix else pname
            if name not in self.source:
                name = self.tied.get(name, name)
            t = self.source.get(name, device, self.dtype)
            _set_parameter(module, pname, t)
            nbytes += t.numel() * t.element_size()
        self._brought[id(module)] = nbytes
        self.loaded_bytes += nbytes
        _move_buffers(module, device)  # rotary tables and the like are real and follow the parameters
        self.layers_loaded += self._is_layer(module)
        self.peak_layers_loaded = max(self.peak_layers_loaded, self.layers_loaded)
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, self.loaded_bytes)

    def release(self, module: nn.Module) -> None:
        """Drops every real parameter of `module` (pass 2 may have pruned or added some since
        `bring`; the decoder layers inside the base are already skeletons when the base goes)."""
        for pname, p in list(module.named_parameters()):
            if p.device.type != "meta":
                _set_parameter(module, pname, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        self.loaded_bytes -= self._brought.pop(id(module))
        _move_buffers(module, "cpu")
        self.layers_loaded -= self._is_layer(module)

    def counts(self) -> dict:
        return {"peak_layers_loaded": self.peak_layers_loaded, "peak_weight_bytes_loaded": self.peak_loaded_bytes}


def _move_buffers(module: nn.Module, device) -> None:
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.device.type != "meta":
                m._buffers[name] = b.to(device)


def _set_parameter(module: nn.Module, pname: str, tensor: torch.Tensor) -> None:
    *path, leaf = pname.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


class LayerWriter:
    """Writes each pruned decoder layer into its own safetensors shard of `folder` as pass 2
    finishes it, and points the source at the shard, so the pruned model streams from disk too.
    A layer whose weights are not finite is refused before it is written (NonFiniteResultError),
    and a failed write (a full disk) raises a one-line OutputWriteError; the shards written before
    stay, so the run can be resumed (resume.py keeps the list of finished layers)."""

    def __init__(self, residency: DiskResidency, layers_path: str, folder: str | Path) -> None:
        self.residency, self.layers_path = residency, layers_path
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def shard(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def __call__(self, index: int, layer: nn.Module) -> Path:
        prefix = f"{self.layers_path}.{index}"
        state = {f"{prefix}.{n}": p.detach().to("cpu").contiguous() for n, p in layer.named_parameters()}
        bad = next((n for n, t in state.items() if not all_finite(t)), None)
        if bad is not None:  # the in-memory path refuses such a run by its perplexity; here before it is kept
            raise NonFiniteResultError(f"the run failed: the pruned weights of layer {index} are not finite (NaN or "
                                       f"inf, first in {bad}); the weights were finite when loaded, so the solve "
                                       "overflowed: try --dtype float32 or a lower --sparsity")
        path = self.shard(index)
        tmp = path.with_suffix(".tmp")
        try:
            save_file(state, tmp)
            tmp.replace(path)  # a shard is there whole or not at all
        except (OSError, SafetensorError) as exc:
            tmp.unlink(missing_ok=True)
            raise OutputWriteError(f"cannot write pruned layer {index} into {self.folder} ({write_reason(exc)}); "
                                   f"the run is incomplete: free space and resume it with --resume {self.folder}"
                                   ) from exc
        self.residency.source.redirect(list(state), path)
        return path


def write_reason(exc: BaseException) -> str:
    """Why a write failed, in a few words (OSError's strerror; safetensors wraps it in its own text)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text.split("I/O error: ", 1)[-1].split(" at path ")[0] or type(exc).__name__


def streamed_weights(layer_dir: str | Path, model: nn.Module, source: SafetensorsSource):
    """For `checkpoint.save_pruned(write_weights=...)`: writes a disk-streamed run's pruned model
    into a folder without loading it: the layer shards `LayerWriter` wrote are linked in (copied
    across file systems; the run's folder stays whole until the save is complete), the
    tensors outside the layers (embeddings, norms, head) copied into `base.safetensors` one at a
    time, and an index of every tensor and the config (with its per-layer shapes) written."""
    layer_dir = Path(layer_dir)

    def write(folder: Path) -> None:
        layers_prefix = adapter_for(model).spec.layers + "."
        tied = _tied_names(model)
        names = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in tied or n in source]
        base = {n: source.get(n).contiguous() for n in names if not n.startswith(layers_prefix)}
        save_file(base, folder / "base.safetensors")
        weight_map = {n: "base.safetensors" if n in base else source.files[n].name for n in names}
        for shard in sorted(set(weight_map.values()) - {"base.safetensors"}):
            _link_or_copy(layer_dir / shard, folder / shard)
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        model.config.save_pretrained(folder)

    return write


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no second copy on the same file system
    except OSError:
        shutil.copyfile(src, dst)


def load_skeleton(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model without weights, the folder's source): the model built from its config.json with
    every parameter on the `meta` device (buffers such as rotary tables are real), checked
    against the safetensors headers."""
    from accelerate import init_empty_weights  # here: the GPU image, which never streams from disk, lacks it

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds
        raise ModelLoadError(f"cannot read the model config in {folder}: {exc}") from exc
    adapter_for(config)  # unsupported architectures fail before anything is read
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    source = SafetensorsSource(folder)
    source.check(model)
    return model, source


__all__ = ["SafetensorsSource", "HostResidency", "DiskResidency", "LayerWriter", "write_reason", "streamed_weights", "load_skeleton"]
