"""An adapter id is a name, never a path: the one place that checks ids and turns them into
folders that stay inside `adapter_dir`.

An id is `name`, `org/name` or `org/name@revision` (the grammar: multilora/hub_ids.py).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import AdapterNotFoundError, InvalidParameterError
from ..hub_ids import match_id
from .files import CONFIG_FILE


def check_adapter_id(adapter_id: str, field: str = "adapter_id") -> str:
    """Refuse anything but `name`, `org/name` or `org/name@revision`."""
    if match_id(adapter_id) is None:
        raise InvalidParameterError(
            field, f"{adapter_id!r} is not a valid adapter id; use 'name', 'org/name' or 'org/name@revision' "
                   "with letters, digits, '.', '_' and '-' (no '..', leading '/', backslashes or control characters)")
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
