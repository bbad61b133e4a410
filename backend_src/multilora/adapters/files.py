"""Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) and check it fits.

Everything that can be wrong with an adapter is found here, at load time, and reported as an
AdapterLoadError naming the adapter and the exact problem, so a bad adapter never reaches a batch.

Files are read with plain reads into memory and parsed from there, never memory-mapped: a read
that hangs (stalled network storage) then waits in a system call with the interpreter released,
so the engine and every other request go on while the loader's timeout runs; a page fault on a
mapped file would hang holding it. Only regular files inside `adapter_dir` are read (a symlink out
of it, a FIFO or a device node is refused before it is opened).
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..errors import AdapterLoadError
from ..models.families import LoraTargetShape
from .memory import host_buffer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
FilesIdentity = tuple[tuple[int, ...] | None, ...]
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.([\w.]+)\.lora_([AB])\.weight")


@dataclass
class LoraAdapter:
    """One adapter, ready for the LoRA op: per (layer, target) A^T [h_in, r] and scale*B^T [r, h_out]."""

    adapter_id: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    ranks: frozenset[int]
    base_model_name: str | None
    files: FilesIdentity | None = None  # files_identity of the folder it was read from

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def to(self, device: torch.device) -> LoraAdapter:
        """This adapter on `device`, moved in one copy of its packed buffer."""
        first = next(iter(self.weights.values()))[0]
        if first.device == device:
            return self
        flat = first.untyped_storage()
        moved = torch.empty(flat.nbytes() // first.element_size(), dtype=first.dtype, device=device)
        moved.copy_(torch.tensor([], dtype=first.dtype).set_(flat), non_blocking=True)
        weights = {key: tuple(moved[t.storage_offset():t.storage_offset() + t.numel()].view(t.shape) for t in pair)
                   for key, pair in self.weights.items()}
        return LoraAdapter(self.adapter_id, weights, self.ranks, self.base_model_name, self.files)


def files_identity(folder: Path) -> FilesIdentity:
    """What tells one version of an adapter's files from another, from one stat per file: device,
    inode, size, and modification and change times (ns) of adapter_config.json and
    adapter_model.safetensors, None for a missing one. Replacing a file (a rename onto it, a copy)
    changes its inode or times; even a rewrite that keeps the size and resets the mtime moves the
    ctime. Follows symlinks, like the reads do."""
    identity = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            info = os.stat(folder / name)
        except FileNotFoundError:
            identity.append(None)
            continue
        identity.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return tuple(identity)


def read_file(adapter_id: str, path: Path, root: Path | None, max_bytes: int | None) -> bytes:
    """The bytes of one adapter file: a regular file that resolves inside `root`, at most `max_bytes`."""
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise AdapterLoadError(f"adapter '{adapter_id}': {path.name} resolves outside adapter_dir; refused")
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AdapterLoadError(f"adapter '{adapter_id}': {path.name} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise AdapterLoadError(f"adapter '{adapter_id}': {path.name} is not a regular file; refused")
    check_file_size(adapter_id, path.name, info.st_size, max_bytes)
    with open(path, "rb") as f:  # plain reads: a stalled read waits without holding the interpreter
        data = f.read(info.st_size + 1)
    check_file_size(adapter_id, path.name, len(data), max_bytes)  # it may have grown since stat
    return data


def check_file_size(adapter_id: str, name: str, size: int, max_bytes: int | None) -> None:
    """One wording for the size caps, wherever they are checked (Hub download, local read)."""
    if max_bytes is None or size <= max_bytes:
        return
    if name == WEIGHTS_FILE:
        raise AdapterLoadError(f"adapter '{adapter_id}' is {size} bytes, above max_adapter_bytes {max_bytes}")
    raise AdapterLoadError(f"adapter '{adapter_id}': {name} is {size} bytes, above the limit of {max_bytes}")


def read_adapter_config(adapter_id: str, folder: Path, root: Path | None = None) -> dict:
    try:
        config = json.loads(read_file(adapter_id, folder / CONFIG_FILE, root, MAX_CONFIG_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterLoadError(f"adapter '{adapter_id}': {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"adapter '{adapter_id}': {CONFIG_FILE} must hold a JSON object")
    return config


def load_adapter(adapter_id: str, folder: Path, targets: dict[str, LoraTargetShape], num_layers: int,
                 max_rank: int, dtype: torch.dtype, root: Path | None = None,
                 max_bytes: int | None = None) -> LoraAdapter:
    """Load and validate; `targets` maps PEFT target names to their module path and shape in the
    base model; `root` is adapter_dir (files must resolve inside it)."""
    config = read_adapter_config(adapter_id, folder, root)
    _check_config(adapter_id, config)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists() and (folder / "adapter_model.bin").exists():
        raise AdapterLoadError(f"adapter '{adapter_id}': {WEIGHTS_FILE} is missing (only the safetensors format "
                               "is served; re-save with safe_serialization=True)")
    data = read_file(adapter_id, weights_path, root, max_bytes)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"adapter '{adapter_id}': {WEIGHTS_FILE} is unreadable or truncated ({exc})") from None
    del data
    prepared = {}
    for (layer, target), pair in sorted(_pairs(adapter_id, tensors, targets, num_layers).items()):
        prepared[(layer, target)] = _prepare(adapter_id, config, layer, targets[target], target, pair, max_rank)
    if not prepared:
        raise AdapterLoadError(f"adapter '{adapter_id}': {WEIGHTS_FILE} holds no LoRA weights")
    weights = _pack(prepared, dtype)
    return LoraAdapter(adapter_id, weights, frozenset(a.shape[1] for a, _ in weights.values()),
                       config.get("base_model_name_or_path"))


def _pairs(adapter_id: str, tensors: dict[str, torch.Tensor], targets: dict[str, LoraTargetShape],
           num_layers: int) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """The file's tensors by (layer, target) and A/B; anything else is refused by name."""
    by_module = {shape.module: name for name, shape in targets.items()}
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if not match or match[2] not in by_module:
            raise AdapterLoadError(f"adapter '{adapter_id}': tensor {key!r} is not a LoRA A/B weight of a "
                                   f"supported projection ({', '.join(targets)})")
        layer, target, which = int(match[1]), by_module[match[2]], match[3]
        if layer >= num_layers:
            raise AdapterLoadError(f"adapter '{adapter_id}': {key} is for layer {layer}, "
                                   f"but the base model has {num_layers} layers")
        pairs.setdefault((layer, target), {})[which] = tensor
    return pairs


def _prepare(adapter_id: str, config: dict, layer: int, shape: LoraTargetShape, target: str,
             pair: dict[str, torch.Tensor], max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^T, scale * B^T) of one target, after checking it fits the base model."""
    where = f"layers.{layer}.{target}"
    if set(pair) != {"A", "B"}:
        raise AdapterLoadError(f"adapter '{adapter_id}': {where} has lora_{''.join(pair)} without its pair")
    a, b = pair["A"], pair["B"]  # PEFT layout: A [r, h_in], B [h_out, r]
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != shape.h_in or b.shape[0] != shape.h_out or b.shape[1] != r:
        raise AdapterLoadError(
            f"adapter '{adapter_id}' does not fit the base model at {where}: lora_A is {tuple(a.shape)} "
            f"and lora_B is {tuple(b.shape)}, expected ({r}, {shape.h_in}) and ({shape.h_out}, {r})")
    if r > max_rank:
        raise AdapterLoadError(f"adapter '{adapter_id}': rank {r} at {where} is above max_lora_rank {max_rank}")
    return a.t(), b.t().float() * _scale(config, f"model.layers.{layer}.{shape.module}", r)


def _pack(pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
          ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Copy all of an adapter's matrices into one buffer and hand out contiguous views of it.

    One allocation per adapter: evicting it gives the memory back whole (no heap fragments from
    hundreds of small tensors), moving it to a device is a single copy, and a large one sits on
    huge pages (memory.host_buffer).
    """
    total = sum(a.numel() + b.numel() for a, b in pairs.values())
    flat = host_buffer(total, dtype)
    packed, offset = {}, 0
    for key, pair in pairs.items():
        views = []
        for matrix in pair:
            view = flat[offset:offset + matrix.numel()].view(matrix.shape)
            view.copy_(matrix)
            views.append(view)
            offset += matrix.numel()
        packed[key] = (views[0], views[1])
    return packed


def _check_config(adapter_id: str, config: dict) -> None:
    def refuse(what: str) -> AdapterLoadError:
        return AdapterLoadError(f"adapter '{adapter_id}': {what} is not supported")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        raise refuse("use_dora (DoRA)")
    if config.get("bias", "none") != "none":
        raise refuse(f"bias={config['bias']!r} (only 'none')")
    if config.get("modules_to_save"):
        raise refuse(f"modules_to_save {config['modules_to_save']}")
    if config.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, (int, float)) or value <= 0:
            raise AdapterLoadError(f"adapter '{adapter_id}': '{key}' in {CONFIG_FILE} must be a positive number")


def _scale(config: dict, module_path: str, r: int) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern overrides alpha."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module_path):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
