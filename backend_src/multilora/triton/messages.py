"""The `messages` field: a chat as OpenAI sends it, checked and normalized for the chat template.

In: JSON text of a non-empty list of `{"role": ..., "content": ...}` objects, where content is a
string or OpenAI's list of `{"type": "text", "text": ...}` parts. Out: a list of
`{"role": str, "content": str}` dicts (parts joined with newlines, as vLLM does), ready for a
Hugging Face chat template. Every problem is an InvalidParameterError naming `messages`, the
message's index and what is allowed.
"""
from __future__ import annotations

from typing import Any

from ..errors import InvalidParameterError
from .json_input import parse_json

ROLES = ("system", "developer", "user", "assistant")  # no tool calling here, so no "tool" messages
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role; templates know "system"
KEYS = ("role", "content", "name")
MAX_MESSAGES = 1024


def parse_messages(text: str) -> list[dict[str, str]]:
    chat = parse_json("messages", text)
    if not isinstance(chat, list) or not chat:
        raise _error('must be a non-empty JSON list of {"role": ..., "content": ...} objects')
    if len(chat) > MAX_MESSAGES:
        raise _error(f"at most {MAX_MESSAGES} messages, got {len(chat)}")
    return [_message(i, message) for i, message in enumerate(chat)]


def _message(index: int, message: Any) -> dict[str, str]:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise _error(f'{where} must be an object with "role" and "content", got {type(message).__name__}')
    unknown = sorted(set(message) - set(KEYS))
    if unknown:
        raise _error(f"{where} has unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    role = message.get("role")
    if role not in ROLES:
        raise _error(f"{where} has role {role!r}; allowed: {', '.join(ROLES)}")
    out = {"role": _ROLE_ALIASES.get(role, role), "content": _content(where, message.get("content"))}
    if "name" in message:
        if not isinstance(message["name"], str):
            raise _error(f'{where}: "name" must be a string')
        out["name"] = message["name"]
    return out


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _error(f'{where}: content parts must be {{"type": "text", "text": "..."}} (only text is '
                             f"supported), got {_short(part)}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _error(f'{where}: "content" must be a string or a list of text parts, got {_short(content)}')


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(message: str) -> InvalidParameterError:
    return InvalidParameterError("messages", message)
