"""What the test session builds once per checkout instead of once per run or per xdist worker.

A build lives in .run/tests/<name>-<fingerprint>/, the fingerprint hashing the code that makes it
and the versions of the packages it depends on: a change to either builds it anew. One process
builds at a time (xdist workers, two pytest runs in one checkout), under a lock file beside it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_DIR = Path(__file__).resolve().parents[2] / ".run" / "tests"


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Held by one process at a time; released when the block ends or the process dies."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def code_fingerprint(function: Callable, packages: tuple[str, ...]) -> str:
    """A hash of every module in `function`'s package folder and of the installed `packages`' versions."""
    digest = hashlib.sha256()
    for source in sorted(Path(sys.modules[function.__module__].__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    for name in packages:
        try:
            digest.update(f"{name}=={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name} missing".encode())
    return digest.hexdigest()[:16]


def cached_build(name: str, fingerprint: str, build: Callable[[Path], object]) -> Path:
    """CACHE_DIR/<name>-<fingerprint>, made by `build(folder)` if it is not there yet (older
    fingerprints of `name` are removed then). Callers must not change it: copy it first."""
    done = CACHE_DIR / f"{name}-{fingerprint}"
    with file_lock(name):
        if not done.is_dir():
            for stale in CACHE_DIR.glob(f"{name}-*"):
                shutil.rmtree(stale)
            partial = CACHE_DIR / f"{name}-{fingerprint}.partial"  # renamed only once complete
            build(partial)
            partial.rename(done)
    return done
