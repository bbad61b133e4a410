"""User-facing error kinds.

Each is raised where the problem is found and turned into a Triton error response in one place
(`multilora.triton.responses`); the message is what the user reads, so it says what was wrong,
which field, and what is allowed.
"""
from __future__ import annotations


class UserError(Exception):
    """A request or configuration problem the caller can fix; never a server bug."""

    triton_code = "INVALID_ARG"


class InvalidParameterError(UserError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid '{field}': {message}")
        self.field = field


class AdapterNotFoundError(UserError):
    triton_code = "NOT_FOUND"


class AdapterLoadError(UserError):
    """The adapter exists but cannot be served: bad files, or not made for this base model."""


class RequestTooLongError(UserError):
    pass


class RequestTimeoutError(UserError):
    """The request ran past request_timeout_s (e.g. its client went away and nobody cancelled it)."""

    triton_code = "UNAVAILABLE"


class GenerationError(Exception):
    """One request could not go on (e.g. its logits are not finite); the others are unaffected."""


class ConfigError(Exception):
    """A bad `config.pbtxt` parameter; raised once at start so the model fails to load, loudly."""
