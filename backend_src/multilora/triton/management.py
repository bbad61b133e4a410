"""Who may use `adapter_command`: the decision, as a pure function of the command and the policy.

Management is opt-in (issue 10, item 10): by default anyone may `list` (the gateway needs it) and
nobody may `load` or `unload`, which let one client force reloads on everyone else. An operator
turns them on with the `management` parameter and can require a token, read once at start from
the environment variable that `management_token_env` names, so it never sits in config.pbtxt.
"""
from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import EngineConfig
from ..errors import ConfigError, InvalidParameterError
from .request_parsing import AdapterCommand

READ_COMMANDS = ("list",)


@dataclass(frozen=True)
class ManagementPolicy:
    level: str = "read"       # off: no command; read: list only; on: list, load and unload
    token: str | None = None  # load and unload must carry it when set

    @classmethod
    def from_config(cls, config: EngineConfig, environ: Mapping[str, str] = os.environ) -> ManagementPolicy:
        token = None
        if config.management_token_env:
            token = environ.get(config.management_token_env, "")
            if not token:
                raise ConfigError(f"parameter 'management_token_env': environment variable "
                                  f"{config.management_token_env!r} is not set or empty")
        return cls(config.management, token)


def authorize(request: AdapterCommand, policy: ManagementPolicy) -> None:
    """Return if the command may run; otherwise say why, and what would allow it."""
    command, token = request.command, request.token
    if policy.level == "off":
        raise InvalidParameterError("adapter_command", "adapter management is disabled on this server "
                                                       "(config.pbtxt parameter 'management' is 'off')")
    if command in READ_COMMANDS:
        return
    if policy.level == "read":
        raise InvalidParameterError(
            "adapter_command", f"'{command}' is disabled on this server: its 'management' parameter is 'read' "
                               f"(list only); 'on' allows load and unload")
    if policy.token is not None and not _same(token, policy.token):
        reason = "missing" if not token else "wrong"
        raise InvalidParameterError("management_token", f"{reason}: this server requires its management token "
                                                        f"for adapter_command '{command}'")


def _same(given: str | None, expected: str) -> bool:
    # Constant time, so the answer's timing does not reveal how much of a guess was right.
    return hmac.compare_digest((given or "").encode(), expected.encode())
