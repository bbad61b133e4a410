"""An adapter id is a name, never a path: the one place that turns ids into folders."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterNotFoundError, InvalidParameterError
from .adapter_files import CONFIG_FILE

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._-]{1,128})?)?")


def check_adapter_id(adapter_id: str, field: str = "adapter_id") -> str:
    """Refuse anything but `name` or `org/name` made of letters, digits, '.', '_' and '-'."""
    if not _ID.fullmatch(adapter_id) or ".." in adapter_id:
        raise InvalidParameterError(
            field, f"{adapter_id!r} is not a valid adapter id; use 'name', 'org/name' or 'org/name@revision' with letters, "
                   "digits, '.', '_' and '-' (no '..', leading '/', backslashes or control characters)")
    return adapter_id


def adapter_folder(adapter_dir: Path, adapter_id: str) -> Path:
    """The folder of a local adapter, which must stay inside `adapter_dir` after resolving symlinks."""
    check_adapter_id(adapter_id)
    root = adapter_dir.resolve()
    folder = (root / adapter_id).resolve()
    if not folder.is_relative_to(root):
        raise InvalidParameterError("adapter_id", f"adapter {adapter_id!r} points outside adapter_dir")
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
        if _ID.fullmatch(adapter_id) and config.resolve().is_relative_to(adapter_dir.resolve()):
            ids.append(adapter_id)
    return sorted(ids)
