"""An adapter id is a name, never a path: the one grammar for ids and the one place that turns
them into folders that stay inside `adapter_dir`.

`name`, `org/name` or `org/name@revision` (the Hub's spelling; a base model id uses it too), each
part of letters, digits, '.', '_' and '-', never '..'. A revision is one folder name, so it has no '/'.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterNotFoundError, InvalidParameterError
from .adapter_files import CONFIG_FILE

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


def check_adapter_id(adapter_id: str, field: str = "adapter_id") -> str:
    """Refuse anything but `name`, `org/name` or `org/name@revision`."""
    if match_id(adapter_id) is None:
        raise InvalidParameterError(
            field, f"{adapter_id!r} is not a valid adapter id; use 'name', 'org/name' or 'org/name@revision' with letters, "
                   "digits, '.', '_' and '-' (no '..', leading '/', backslashes or control characters)")
    return adapter_id


def stays_inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every symlink resolved, is `root` (resolved too) or below it."""
    return path.resolve().is_relative_to(root.resolve())


def folder_inside(adapter_dir: Path, adapter_id: str) -> Path:
    """`adapter_dir / adapter_id`, resolved, refused when a symlink leads it outside `adapter_dir`."""
    folder = (adapter_dir / adapter_id).resolve()
    if not stays_inside(adapter_dir, folder):
        raise InvalidParameterError("adapter_id", f"adapter {adapter_id!r} points outside adapter_dir")
    return folder


def adapter_folder(adapter_dir: Path, adapter_id: str) -> Path:
    """The folder of a local adapter, which must stay inside `adapter_dir` after resolving symlinks."""
    folder = folder_inside(adapter_dir, check_adapter_id(adapter_id))
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterNotFoundError(f"unknown adapter '{adapter_id}': no {adapter_id}/{CONFIG_FILE} in adapter_dir")
    return folder


def list_local_adapters(adapter_dir: Path) -> list[str]:
    """Ids of the adapters in `adapter_dir` (one or two levels deep)."""
    if not adapter_dir.is_dir():
        return []
    ids = []
    for config in sorted(adapter_dir.glob(f"*/{CONFIG_FILE}")) + sorted(adapter_dir.glob(f"*/*/{CONFIG_FILE}")):
        adapter_id = config.parent.relative_to(adapter_dir).as_posix()
        if match_id(adapter_id) and stays_inside(adapter_dir, config):
            ids.append(adapter_id)
    return sorted(ids)
