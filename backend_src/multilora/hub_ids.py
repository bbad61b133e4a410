"""The one grammar for ids: `name`, `org/name` or `org/name@revision`, the Hub's spelling.

Each part is letters, digits, '.', '_' and '-', never '..'; a revision is one folder name, so it has
no '/'. Adapter ids (adapters/ids.py) and the base model's Hub id (config.py, models/checkpoint.py)
both follow it. A leaf module: the configuration checks a value here without loading torch.
"""
from __future__ import annotations

import re

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_ID = re.compile(rf"(?P<repo>(?:{_NAME}/)?{_NAME})(?:@(?P<revision>[A-Za-z0-9._-]{{1,128}}))?")


def match_id(value: str) -> re.Match[str] | None:
    """The id's parts (`repo`, `revision`), or None when `value` is not an id; a revision needs an org."""
    match = _ID.fullmatch(value)
    if match is None or ".." in value or (match["revision"] and "/" not in match["repo"]):
        return None
    return match


def is_hub_id(value: str) -> bool:
    """`org/name` or `org/name@revision`, as the Hub names repositories."""
    match = match_id(value)
    return match is not None and "/" in match["repo"]
