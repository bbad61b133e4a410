"""Sampling parameters of one request, validated where they enter the engine."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidParameterError

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 1_000_000:
            raise InvalidParameterError("max_tokens", f"must be an integer >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidParameterError("temperature", f"must be in [0, 100] (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidParameterError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidParameterError("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidParameterError("seed", f"must be in [0, 2^64), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidParameterError("stop", f"at most {MAX_STOP_STRINGS} non-empty strings")
