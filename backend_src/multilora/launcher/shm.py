"""The python backend's shared-memory regions in /dev/shm: named so that we know which are ours.

Each model instance of the python backend talks to its stub through one region named
`<prefix><uuid>`; tritonserver removes it on a clean unload, and a crash (of the server or of a
stub killed with the server) leaves it behind, tens of MB each. The default prefix is shared by
every server on the machine, so the launcher gives each server it starts its own prefix
(`--backend-config=python,shm-region-prefix-name=...`) and removes exactly those files after the
server is gone. The prefix carries the launcher's pid, so regions left by a launcher that was
itself killed can be told apart from those of launchers still running.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX_HEAD = "multilora_"
_OURS = re.compile(rf"^{PREFIX_HEAD}(\d+)_[0-9a-f]+_")


def new_prefix() -> str:
    """A region prefix no other server uses: this launcher's pid and a random tag."""
    return f"{PREFIX_HEAD}{os.getpid()}_{secrets.token_hex(4)}_"


def backend_config_arg(prefix: str) -> str:
    return f"--backend-config=python,shm-region-prefix-name={prefix}"


def remove_regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Delete the regions named `prefix*`; returns what was deleted."""
    removed = []
    for path in shm_dir.glob(f"{prefix}*"):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass  # the server removed it itself meanwhile
    if removed:
        log.info("removed %d shared-memory region(s) left by tritonserver: %s",
                 len(removed), ", ".join(p.name for p in removed))
    return removed


def remove_orphaned_regions(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Delete regions of launchers that no longer run (killed before they could clean up).

    Only files with our naming, owned by this user, whose launcher pid is gone: another
    launcher's regions stay while it runs, and regions of other servers are never touched.
    """
    removed = []
    for path in shm_dir.glob(f"{PREFIX_HEAD}*"):
        match = _OURS.match(path.name)
        try:
            if match is None or path.stat().st_uid != os.getuid() or _alive(int(match.group(1))):
                continue
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d shared-memory region(s) of launchers that are gone", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
