"""Engine configuration, built once from `config.pbtxt` parameters and validated at start."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError
from .hub_ids import is_hub_id

log = logging.getLogger(__name__)

CUDA_KERNEL_MODES = ("auto", "on", "off")  # parameter cuda_kernels
CUDA_GRAPH_MODES = ("auto", "on", "off")  # parameter cuda_graphs
# Parameters renamed: old name -> new name. The old name is still accepted, with one warning.
RENAMED = {"lora_kernels": "cuda_kernels"}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class EngineConfig:
    base_model: str
    """Local folder of a Hugging Face checkpoint, or a Hub id (`org/name[@revision]`)."""
    adapter_dir: str = ""
    """Folder holding adapters by id (`name` or `org/name`); empty: base model only."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda[:N]`."""
    dtype: str = "auto"
    """`auto` (float32 on CPU, bfloat16 on GPU), `float32`, `float16`, `bfloat16`."""
    max_num_seqs: int = 32
    """Rows (sequences) in one engine step."""
    max_num_batched_tokens: int = 512
    """Tokens in one engine step; longer prompts are prefilled in chunks of this size."""
    max_model_len: int = 0
    """Longest prompt + completion; 0: the model's `max_position_embeddings` (capped at 8192)."""
    kv_cache_memory: str = "0.25"
    """KV cache budget: bytes (`512MiB`, `2GB`, `1073741824`) or a fraction of device memory."""
    kv_block_size: int = 16
    """Tokens per KV cache block."""
    max_lora_rank: int = 64
    max_loras: str = "auto"
    """Adapters resident in the device's slot table at once: a number, or `auto` (on CPU one slot per
    running row, max_num_seqs, since a slot is a view of host memory; on a GPU as many as half the
    memory left after the model and the KV cache holds at max_lora_rank, up to max_cpu_loras)."""
    max_cpu_loras: int = 64
    """The host tier's capacity: adapters kept loaded in host memory (least recently used evicted first)."""
    adapter_load_timeout_s: float = 60.0
    """A request waiting longer for its adapter's load fails; the load is abandoned."""
    adapter_allowlist: str = ""
    """Comma-separated adapter ids that may be served; empty: any adapter in adapter_dir."""
    max_adapter_bytes: str = "2GiB"
    """Adapters whose weights file is larger are refused (a size like 512MiB, or bytes)."""
    allow_hub_download: bool = False
    """Fetch base model / adapters from the Hugging Face Hub when not found locally."""
    default_max_tokens: int = 16
    request_timeout_s: float = 600.0
    """A request still unfinished this long after it arrived is ended with an error (0: never): bounds
    the work of clients that went away without cancelling (HTTP /generate is not cancelled by Triton)."""
    max_adapter_loads: int = 4
    """Adapter loads running at once (each in its own thread)."""
    adapter_loads_per_s: float = 100.0
    """Adapter loads started per second at most (0: no limit), so churn through cold adapters cannot
    starve the requests of resident ones."""
    adapter_load_stall_s: float = 5.0
    """A load still running this long counts as stalled: it goes on, but gives its place among
    max_adapter_loads to the next load, so loads stuck on hung storage cannot starve healthy ones."""
    max_stalled_adapter_loads: int = 16
    """Stalled or abandoned load threads excused from max_adapter_loads at most (0: none); beyond,
    they hold their places again, so load threads never exceed the sum of the two."""
    adapter_check_interval_s: float = 1.0
    """A request for an adapter in host memory looks at its files (a stat) when they were last looked
    at longer ago than this; deleted or replaced files are then read again (0: never look)."""
    cuda_kernels: str = "auto"
    """Our CUDA kernels, for LoRA and decode attention: `auto` (if they cannot load, one logged error
    and the PyTorch path), `on` (the model fails to load without them), `off` (the PyTorch path).
    Its old name `lora_kernels` is still accepted, with a warning."""
    cuda_graphs: str = "auto"
    """CUDA graphs for decode steps (one per batch-size bucket, captured at start): `auto` (if they
    cannot be used or captured, one logged line and eager decode), `on` (the model fails to load
    without them), `off`. They need our CUDA kernels; no effect on a CPU device."""
    management: str = "read"
    """Who may send adapter_command: `off` (nobody), `read` (list only), `on` (list, load, unload)."""
    management_token_env: str = ""
    """Environment variable holding the token that load and unload must carry; empty: no token."""

    @classmethod
    def from_parameters(cls, params: dict[str, str], base_dir: str | Path = ".") -> EngineConfig:
        """Parse Triton's string parameters; relative paths are relative to `base_dir`.

        Unknown keys are refused so that a typo does not silently fall back to a default; a renamed
        parameter's old name is read as the new one, with a warning (both names at once are refused).
        """
        params = _renamed(params)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
        if not params.get("base_model"):
            raise ConfigError("parameter 'base_model' is required: a local checkpoint folder or a Hub id")
        values: dict[str, object] = {}
        for name, raw in params.items():
            kind = known[name].type
            raw = raw.strip()
            try:
                if kind == "int":
                    values[name] = int(raw)
                elif kind == "float":
                    values[name] = float(raw)
                elif kind == "bool":
                    values[name] = _parse_bool(raw)
                else:
                    values[name] = raw
            except ValueError as exc:
                raise ConfigError(f"parameter '{name}': {raw!r} is not a valid {kind}") from exc
        for name in ("base_model", "adapter_dir"):
            value = str(values.get(name, ""))
            if value and not Path(value).is_absolute():
                candidate = Path(base_dir) / value
                if candidate.exists() or not is_hub_id(value):
                    values[name] = str(candidate.resolve())
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        positive = ("max_num_seqs", "max_num_batched_tokens", "kv_block_size", "max_lora_rank",
                    "max_cpu_loras", "default_max_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"parameter '{name}' must be >= 1, got {getattr(self, name)}")
        if self.max_model_len < 0:
            raise ConfigError("parameter 'max_model_len' must be >= 0 (0: the model's own limit)")
        if self.request_timeout_s < 0:
            raise ConfigError("parameter 'request_timeout_s' must be >= 0 (0: no limit)")
        if self.max_adapter_loads < 1:
            raise ConfigError(f"parameter 'max_adapter_loads' must be >= 1, got {self.max_adapter_loads}")
        if self.adapter_loads_per_s < 0:
            raise ConfigError("parameter 'adapter_loads_per_s' must be >= 0 (0: no limit)")
        if self.adapter_load_timeout_s <= 0:
            raise ConfigError("parameter 'adapter_load_timeout_s' must be > 0")
        if self.adapter_load_stall_s <= 0:
            raise ConfigError("parameter 'adapter_load_stall_s' must be > 0")
        if self.max_stalled_adapter_loads < 0:
            raise ConfigError(
                f"parameter 'max_stalled_adapter_loads' must be >= 0, got {self.max_stalled_adapter_loads}")
        if self.adapter_check_interval_s < 0:
            raise ConfigError("parameter 'adapter_check_interval_s' must be >= 0 (0: never look)")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"parameter 'dtype' must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"parameter 'device' must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.cuda_kernels not in CUDA_KERNEL_MODES:
            raise ConfigError(f"parameter 'cuda_kernels' must be auto, on or off, got {self.cuda_kernels!r}")
        if self.cuda_graphs not in CUDA_GRAPH_MODES:
            raise ConfigError(f"parameter 'cuda_graphs' must be auto, on or off, got {self.cuda_graphs!r}")
        if self.cuda_graphs == "on" and self.cuda_kernels == "off":
            raise ConfigError("parameter 'cuda_graphs' on needs our CUDA kernels: set 'cuda_kernels' to auto or on "
                              "(or 'cuda_graphs' to auto or off)")
        if self.allow_hub_download and not self.adapter_dir:
            raise ConfigError("parameter 'allow_hub_download' needs 'adapter_dir': Hub adapters are stored there")
        if self.fixed_max_loras is not None and self.max_cpu_loras < self.fixed_max_loras:
            raise ConfigError("parameter 'max_cpu_loras' must be >= 'max_loras' (host cache holds the device's)")
        if self.management not in ("off", "read", "on"):
            raise ConfigError(f"parameter 'management' must be off, read or on, got {self.management!r}")
        if self.management_token_env and self.management != "on":
            raise ConfigError("parameter 'management_token_env' guards load and unload, which need 'management' 'on'")
        if self.management_token_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.management_token_env):
            raise ConfigError(f"parameter 'management_token_env' must name an environment variable, "
                              f"got {self.management_token_env!r}")
        kv_cache_budget(self.kv_cache_memory, total_bytes=1)  # raises on a malformed value
        parse_size(self.max_adapter_bytes, "max_adapter_bytes")

    @property
    def fixed_max_loras(self) -> int | None:
        """max_loras as a number, or None for `auto` (validated: `auto` or an integer >= 1)."""
        value = str(self.max_loras).strip()
        if value == "auto":
            return None
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"parameter 'max_loras' must be auto or an integer >= 1, got {self.max_loras!r}")
        return int(value)

    @property
    def allowed_adapters(self) -> frozenset[str] | None:
        ids = frozenset(i.strip() for i in self.adapter_allowlist.split(",") if i.strip())
        return ids or None


def _renamed(params: dict[str, str]) -> dict[str, str]:
    """`params` with each renamed parameter under its new name, said once in the log."""
    params = dict(params)
    for old, new in RENAMED.items():
        if old not in params:
            continue
        if new in params:
            raise ConfigError(f"parameters '{old}' and '{new}' are both set; '{old}' is the old name of "
                              f"'{new}': set only '{new}'")
        log.warning("parameter '%s' is deprecated: it is now called '%s' (same values); rename it in "
                    "config.pbtxt", old, new)
        params[new] = params.pop(old)
    return params


def kv_cache_budget(spec: str, total_bytes: int) -> int:
    """Bytes for the KV cache: a fraction (0, 1] of `total_bytes`, or an absolute size."""
    number, unit = _split_size(spec, "kv_cache_memory", "a fraction like 0.3 or ")
    if not unit and number <= 1.0:
        if number <= 0:
            raise ConfigError("parameter 'kv_cache_memory' must be > 0")
        return int(number * total_bytes)
    return int(number * _SIZE_UNITS[unit])


def parse_size(spec: str, name: str) -> int:
    number, unit = _split_size(spec, name, "")
    return int(number * _SIZE_UNITS[unit])


def _split_size(spec: str, name: str, alternative: str) -> tuple[float, str]:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", spec.strip().lower().replace(" ", ""))
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ConfigError(f"parameter '{name}': {spec!r} is not {alternative}a size like 512MiB / 2GB / 1073741824")
    return float(match.group(1)), match.group(2)


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)
